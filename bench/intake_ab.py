"""Intake A/B between two checkouts: msg/s, engine CPU per message and syncs (group commits) per message.

Each checkout is a directory with its own venv (``.venv``); the engine runs from there (``sluice run`` on
the intake config of ``engine_bench.py``: SQLite WAL, ``synchronous=FULL``, commit before ACK, passthrough →
file destination with fsync) and this checkout's ``mllp_load.py`` drives both, so the generator is the same.
Sides alternate round by round (A B, B A, ...), each run on a fresh engine.  Per run:

* msg/s and ACK p50/p99 (the load generator, after a 1 s warm-up);
* the engine process's CPU (user + system, /proc) per stored message, from start of the load until every
  message is delivered (intake, processing records and delivery: the whole engine process);
* syncs per message: the engine's ``fdatasync``/``fsync`` calls, counted per file (``perf trace``, kernel
  tracepoints, no ptrace), so the store's WAL syncs give the messages per group commit.

    python bench/intake_ab.py --a /work/wt/perf-base --b . --rounds 3 --seconds 5 --json out.json

    python bench/intake_ab.py --a /work/wt/perf-base --b . --instructions 200 700 --connections 1

``--instructions SMALL LARGE`` counts instead the engine process's instructions under valgrind (callgrind)
for SMALL and LARGE messages delivered; the difference over LARGE - SMALL cancels start-up (but not what the
engine does per second while valgrind slows it ~50x, so prefer the in-process loops for small differences).
``AB_PYSPY=/path/to/py-spy AB_PYSPY_OUT=/tmp/prefix`` also records py-spy profiles (collapsed stacks) of the
engine during the load and while it drains.  The machine's load average is recorded with each run.
Nothing here is a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.engine import basic_channel, free_port, write_config  # noqa: E402

LOAD = [sys.executable, str(ROOT / "bench" / "mllp_load.py")]
# Every run's files stay until the whole A/B ends: on this machine's ext4 (no journal) creating files within
# minutes of deleting many costs the kernel ~0.6 ms each (engine_bench.py: _scratch), which would charge one
# run's clean-up to the next run's engine (its file destination), i.e. to the other side.
_KEEP: list[Path] = []
SETTLE = 6.0  # seconds between the engine's port opening and the load
SYNC = re.compile(r"\b(fdatasync|fsync|syncfs)\(fd: (\d+)")


def _cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_port(
    port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60, poll: float = 0.05
) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"engine exited:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(poll)
    raise RuntimeError(f"engine did not start listening:\n{log.read_text()[-3000:]}")


def _setup(prefix: str, pure: bool) -> tuple[Path, int, Path, dict[str, str]]:
    """A scratch directory with the intake config (a channel on a free port, passthrough to a file
    destination with fsync): (directory, port, config file, the engine's environment)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    port = free_port()
    dest = {"out": {"kind": "file", "directory": str(work / "out"), "fsync": True}}
    cfg = write_config(work, channels={"bench": basic_channel(port)}, destinations=dest)
    env = dict(os.environ, PYTHONUNBUFFERED="1", SLUICE_ADMIN_PORT="0")
    if pure:
        env["SLUICE_PURE_PYTHON"] = "1"
    return work, port, cfg, env


def _wait_delivered(work: Path, deadline: float, poll: float) -> int:
    """Wait until every stored message is processed and delivered (or ``deadline``); the messages stored."""
    db = sqlite3.connect(f"file:{work / 'sluice.db'}?mode=ro", uri=True, timeout=30)
    stored = 0
    while time.monotonic() < deadline:
        stored = db.execute("SELECT count(*) FROM messages").fetchone()[0]
        done = db.execute("SELECT count(*) FROM deliveries WHERE status != 'pending'").fetchone()[0]
        received = db.execute("SELECT count(*) FROM messages WHERE status = 'received'").fetchone()[0]
        if received == 0 and done >= stored:
            break
        time.sleep(poll)
    db.close()
    return int(stored)


def _pyspy(pid: int, suffix: str) -> subprocess.Popen[bytes]:
    """py-spy recording ``pid`` (collapsed stacks) to ``$AB_PYSPY_OUT.<suffix>``."""
    return subprocess.Popen(
        [os.environ["AB_PYSPY"], "record", "-p", str(pid), "--threads", "--format", "raw",
         "-r", "200", "-o", f"{os.environ['AB_PYSPY_OUT']}.{suffix}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def one_run(side: Path, connections: int, seconds: float, pure: bool) -> dict[str, Any]:
    work, port, cfg, env = _setup("sluice-ab-", pure)
    log = work / "engine.log"
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            [str(side / ".venv" / "bin" / "python"), "-m", "engine.cli", "run", "--config", str(cfg)],
            cwd=str(side),
            stdout=logf,
            stderr=logf,
            env=env,
        )
    tracer: subprocess.Popen[bytes] | None = None
    trace_out = work / "trace.txt"
    try:
        _wait_port(port, proc, log)
        # The engine may accept before it has finished starting (admin API, collector): let it settle,
        # as engine_bench.py does by measuring the echo server first.
        time.sleep(SETTLE)
        if shutil.which("perf"):
            tracer = subprocess.Popen(
                ["perf", "trace", "-e", "fdatasync,fsync,syncfs", "-p", str(proc.pid), "-o", str(trace_out)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
        spy: subprocess.Popen[bytes] | None = None
        if os.environ.get("AB_PYSPY"):  # a py-spy profile of the engine during the load (collapsed stacks)
            spy = _pyspy(proc.pid, f"{side.name}.{connections}.txt")
            time.sleep(1.0)
        load1 = os.getloadavg()[0]
        cpu0 = _cpu(proc.pid)
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            out = tmp.name
        args = ["--port", str(port), "--connections", str(connections), "--seconds", str(seconds)]
        subprocess.run([*LOAD, *args, "--warmup", "1", "--json", out], check=True, cwd=ROOT)
        res = json.loads(Path(out).read_text())["results"][0]
        os.unlink(out)
        cpu_load = _cpu(proc.pid) - cpu0
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
            spy = _pyspy(proc.pid, f"{side.name}.{connections}.drain.txt")
        stored = _wait_delivered(work, time.monotonic() + 120, 0.1)
        cpu_all = _cpu(proc.pid) - cpu0
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        fds = {}
        for fd in os.listdir(f"/proc/{proc.pid}/fd"):
            with contextlib.suppress(OSError):
                fds[fd] = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
    finally:
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            try:
                tracer.wait(10)
            except subprocess.TimeoutExpired:
                tracer.kill()
                tracer.wait()
        _stop(proc, 30)
    syncs: dict[str, int] = {}
    if trace_out.exists():
        for line in trace_out.read_text(errors="replace").splitlines():
            m = SYNC.search(line)
            if m:
                name = fds.get(m.group(2), "fd")
                kind = "wal" if name.endswith("-wal") else "db" if name.endswith(".db") else "other"
                key = f"{m.group(1)}:{kind}"
                syncs[key] = syncs.get(key, 0) + 1
    _KEEP.append(work)  # removed at the end (see _KEEP)
    wal = syncs.get("fdatasync:wal", 0) + syncs.get("fsync:wal", 0)
    return {
        "side": str(side),
        "connections": connections,
        "loadavg_1m": round(load1, 2),
        "msg_per_s": res["msg_per_s"],
        "acked_ok": res["acked_ok"],
        "errors": res["errors"] + res["failures"],
        "ack_p50_ms": res["latency_ms"].get("p50"),
        "ack_p99_ms": res["latency_ms"].get("p99"),
        "stored": stored,
        "engine_cpu_us_per_msg_during_load": round(cpu_load / stored * 1e6, 1) if stored else None,
        "engine_cpu_us_per_msg_until_delivered": round(cpu_all / stored * 1e6, 1) if stored else None,
        "syncs": syncs,
        "wal_syncs_per_msg": round(wal / stored, 4) if stored else None,
        "msgs_per_wal_sync": round(stored / wal, 2) if wal else None,
    }


def instructions(side: Path, n: int, connections: int, pure: bool, keep: Path | None) -> int:
    """Instructions of the engine process (valgrind callgrind; worker processes are spawned, not traced)
    from start to stop with ``n`` messages sent over ``connections`` and delivered."""
    work, port, cfg, env = _setup("sluice-ab-cg-", pure)
    log = work / "engine.log"
    out = keep if keep is not None else work / "callgrind.out"
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             str(side / ".venv" / "bin" / "python"), "-m", "engine.cli", "run", "--config", str(cfg)],
            cwd=str(side),
            stdout=logf,
            stderr=logf,
            env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 900
        _wait_port(port, proc, log, timeout=900, poll=0.5)
        args = [
            "--port",
            str(port),
            "--connections",
            str(connections),
            "--count",
            str(n),
            "--seconds",
            "3000",
        ]
        subprocess.run([*LOAD, *args, "--warmup", "0", "--ack-timeout", "120", "--json", str(work / "l.json")],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)  # fmt: skip
        _wait_delivered(work, deadline, 0.5)
    finally:
        _stop(proc, 300)
    m = re.findall(r"Collected : (\d+)", log.read_text())
    shutil.rmtree(work, ignore_errors=True)
    if not m:
        raise RuntimeError("no callgrind summary")
    return int(m[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", type=Path, required=True, help="checkout A (with .venv)")
    ap.add_argument("--b", type=Path, required=True, help="checkout B (with .venv)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--connections", type=int, nargs="+", default=[50, 1])
    ap.add_argument("--compiled", action="store_true", help="do not set SLUICE_PURE_PYTHON=1")
    ap.add_argument("--json", type=Path, help="write every run and the medians here")
    ap.add_argument(
        "--instructions",
        type=int,
        nargs=2,
        metavar=("SMALL", "LARGE"),
        help="instead: instructions per message under callgrind, (Ir(LARGE) - Ir(SMALL)) / (LARGE - SMALL)",
    )
    ap.add_argument("--keep-callgrind", type=Path, help="directory to keep the callgrind files in")
    args = ap.parse_args()
    if args.instructions:
        small, large = args.instructions
        per: dict[str, Any] = {}
        for label, side in (("A", args.a.resolve()), ("B", args.b.resolve())):
            for conns in args.connections:
                ir = []
                for n in (small, large):
                    keep = args.keep_callgrind / f"cg.{label}.{conns}.{n}" if args.keep_callgrind else None
                    ir.append(instructions(side, n, conns, not args.compiled, keep))
                per[f"{label}_{conns}"] = {"ir": ir, "per_message": round((ir[1] - ir[0]) / (large - small))}
                print(label, side, conns, per[f"{label}_{conns}"], flush=True)
        if args.json:
            args.json.write_text(json.dumps({"a": str(args.a), "b": str(args.b), "messages": [small, large],
                                             "instructions": per}, indent=1) + "\n")  # fmt: skip
        return
    sides = {"A": args.a.resolve(), "B": args.b.resolve()}
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = ["A", "B"] if r % 2 == 0 else ["B", "A"]
        for conns in args.connections:
            for s in order:
                res = one_run(sides[s], conns, args.seconds, not args.compiled)
                res["label"], res["round"] = s, r
                runs.append(res)
                print(
                    f"round {r} {s} {conns:>3} conn: {res['msg_per_s']:>8,.0f} msg/s  p99 {res['ack_p99_ms']} ms  "
                    f"cpu {res['engine_cpu_us_per_msg_during_load']} / {res['engine_cpu_us_per_msg_until_delivered']}"
                    f" us/msg  msgs/WAL sync {res['msgs_per_wal_sync']}  load {res['loadavg_1m']}  {res['syncs']}",
                    flush=True,
                )
    summary: dict[str, Any] = {}
    for conns in args.connections:
        for s in sides:
            rs = [x for x in runs if x["label"] == s and x["connections"] == conns]
            summary[f"{s}_{conns}"] = {
                k: statistics.median([x[k] for x in rs if x[k] is not None] or [0])
                for k in (
                    "msg_per_s",
                    "ack_p99_ms",
                    "engine_cpu_us_per_msg_during_load",
                    "engine_cpu_us_per_msg_until_delivered",
                    "msgs_per_wal_sync",
                )
            }
    print(json.dumps(summary, indent=1))
    for work in _KEEP:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"a": str(sides["A"]), "b": str(sides["B"]), "runs": runs, "medians": summary}, indent=1
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
