"""Metrics cost: MLLP intake with the engine's metrics on vs off, and the scrape-time store query.

Issue 10's target: intake within 5% with metrics on.  Both sides run the same code as ``sluice run`` on
the same config (SQLite, ``ack: on-commit``, passthrough → file destination, one worker process); "off"
starts the engine with ``Metrics.channel``/``Metrics.destination`` returning ``None``, which is exactly
what every component does without a ``Metrics`` (no counting on the hot paths).  The sides alternate,
each round on a fresh engine, so a machine that gets busier or quieter affects both alike:

* throughput: ``mllp_load.py`` at 1 and 50 connections (one message in flight each), msg/s;
* cost: 50 connections at a fixed 1,000 msg/s offered, the engine's CPU (process + workers) per message,
  which a busy machine disturbs far less than a rate does.

Then the scrape: ``Metrics.render()`` with 10,000 pending deliveries among 200,000 delivered ones (the
queue query reads only the pending rows' partial index).

    python bench/metrics_bench.py                       # 5 rounds, 8 s per scenario
    python bench/metrics_bench.py --rounds 3 --seconds 5 --json bench/results/metrics.json

Figures go to bench/results/metrics.json.  Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.engine import basic_channel, child_pids, free_port, write_config  # noqa: E402

LOAD = [sys.executable, str(ROOT / "bench" / "mllp_load.py")]
OFF = (
    "from engine import metrics\n"
    "metrics.Metrics.channel = lambda self, name: None\n"
    "metrics.Metrics.destination = lambda self, name: None\n"
    "from engine.cli import main\n"
    "main()\n"
)


def _cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Engine:
    def __init__(self, workdir: Path, metrics: bool):
        self.port = free_port()
        ch = basic_channel(self.port)
        dest = {"out": {"kind": "file", "directory": str(workdir / "out"), "fsync": True}}
        self.config = write_config(
            workdir, channels={"bench": ch}, destinations=dest, processing={"workers": 1}
        )
        routes = self.config.read_text() + "admin:\n  enabled: false\n"
        self.config.write_text(routes)
        code = ["-m", "engine.cli"] if metrics else ["-c", OFF]
        self.log = open(workdir / "engine.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, *code, "run", "--config", str(self.config)],
            cwd=ROOT,
            stdout=self.log,
            stderr=self.log,
            env=dict(os.environ, PYTHONUNBUFFERED="1", SLUICE_LOG_LEVEL="warning"),
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited: {(workdir / 'engine.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("engine did not start")

    def cpu(self) -> float:
        return _cpu(self.proc.pid) + sum(_cpu(c) for c in child_pids(self.proc.pid))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # our own child, by PID
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def load(port: int, *args: str) -> dict[str, Any]:
    """One mllp_load.py scenario against the engine: its result (msg_per_s, latency_ms, acked_ok)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out = tmp.name
    cmd = [*LOAD, "--port", str(port), *args, "--json", out]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    data: dict[str, Any] = json.loads(Path(out).read_text())["results"][0]
    os.unlink(out)
    return data


def _figures(r: dict[str, Any]) -> dict[str, Any]:
    return {"msg_per_s": r["msg_per_s"], "p50_ms": r["latency_ms"]["p50"], "p99_ms": r["latency_ms"]["p99"]}


def one_round(metrics: bool, seconds: float, scratch: Path) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="metrics-" if metrics else "nometrics-", dir=scratch))
    eng = Engine(work, metrics)
    try:
        res: dict[str, Any] = {}
        for name, conns in (("1-connection", 1), ("50-connections", 50)):
            r = load(eng.port, "--connections", str(conns), "--seconds", str(seconds), "--warmup", "1")
            res[name] = _figures(r)
        cpu0 = eng.cpu()
        r = load(
            eng.port, "--connections", "50", "--rate", "1000", "--seconds", str(seconds), "--warmup", "0"
        )
        cpu = eng.cpu() - cpu0
        res["50-connections@1000/s"] = {
            **_figures(r),
            "engine_cpu_us_per_msg": round(cpu / max(1, r["acked_ok"]) * 1e6, 1),
        }
        return res
    finally:
        eng.stop()


def hot_path_cost(n: int = 200_000) -> dict[str, Any]:
    """CPU µs per message of the counting the metrics add, timed on the engine's own code paths.

    Per message: intake's count after the group commit (received, final status), the listener's ACK
    latency observation and ACK count (MSA-1 read from the ACK bytes), the processing batch's status
    count (a 200-message batch, per message) and the delivery round's outcome and lag (a 500-row round).
    Run-to-run noise of a rate on a shared machine is far above this; the rate benches above show it.
    """
    from engine import ack as ackmod
    from engine.config import ChannelConfig, SourceConfig
    from engine.intake import Intake, _count, _msa1
    from engine.metrics import Metrics
    from engine.store import LoadedDelivery
    from engine.workers import DeliveryWorker, ProcessingWorker, _Recorded, _Tally

    raw = b"MSH|^~\\&|EHR|NORTH|SL|HOSP|20250101120000||ADT^A08^ADT_A01|C1|P|2.5.1\rPID|1||MRN1^^^NORTH^MR\r"
    metrics = Metrics(channels=["c"], destinations=["d"])
    cm = metrics.channel("c")
    channel = ChannelConfig(name="c", file="c.yaml", source=SourceConfig(), types={"ADT": ()})
    intake = Intake(channel, committer=None)  # type: ignore[arg-type]
    jobs, _ = intake.decide(raw, "peer")
    ack = jobs[0].row.ack or b""
    assert _msa1(ack) == ackmod.ACCEPTED.code

    def per_message() -> None:
        _count(cm, jobs)
        cm.ack_latency.observe(0.0012)
        cm.ack(_msa1(ack))

    pw = ProcessingWorker.__new__(ProcessingWorker)
    pw.metrics = cm
    recorded = _Recorded(200, {"processed": 200}, 0)
    dw = DeliveryWorker.__new__(DeliveryWorker)
    dw.metrics = metrics
    dm = metrics.destination("d")
    row = LoadedDelivery(1, 1, "c", "d", b"", "", "{}", "", 0, b"", "C1", "ADT", "A08", time.time() - 0.5)
    tally: _Tally = [(row, None, False, time.time())] * 500

    def timed(fn: Any, calls: int) -> float:
        t0 = time.process_time()
        for _ in range(calls):
            fn()
        return (time.process_time() - t0) / calls * 1e6

    intake_us = timed(per_message, n)
    processing_us = timed(lambda: pw._count(recorded), n // 200) / 200
    delivery_us = timed(lambda: dw._count(dm, tally), n // 500) / 500
    return {
        "intake_and_ack_us": round(intake_us, 2),
        "processing_us": round(processing_us, 3),
        "delivery_us": round(delivery_us, 2),
        "total_us_per_message": round(intake_us + processing_us + delivery_us, 2),
    }


def scrape_cost(scratch: Path, pending: int = 10_000, delivered: int = 200_000) -> dict[str, Any]:
    """Time Metrics.render() against a store with many delivered and some pending deliveries."""
    from engine.metrics import Metrics
    from engine.store import NewMessage, Store

    store = Store(f"sqlite:///{scratch}/scrape.db")
    now = time.time()
    with store.write() as conn:
        (mid,) = store.insert_messages(conn, [NewMessage(channel="c", received_at=now, peer="", raw=b"MSH|")])
        store.insert_deliveries(
            conn,
            [
                {
                    "message_id": mid,
                    "channel": "c",
                    "destination": f"d{i % 4}",
                    "payload": b"",
                    "content_type": "",
                    "meta": "{}",
                    "order_key": "",
                    "status": "delivered" if i < delivered else "pending",
                    "attempts": 0,
                    "created_at": now - (delivered + pending - i),
                    "next_attempt_at": 0.0,
                }
                for i in range(delivered + pending)
            ],
        )
    m = Metrics(channels=["c"], destinations=[f"d{i}" for i in range(4)])
    m.watch_store(store)
    m.render()
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        m.render()
        times.append(time.perf_counter() - t0)
    store.close()
    return {
        "pending": pending,
        "delivered": delivered,
        "render_ms_median": round(statistics.median(times) * 1000, 2),
        "render_ms_max": round(max(times) * 1000, 2),
    }


def intake_loop(metrics_on: bool, n: int) -> None:
    """``n`` messages through the engine process's intake path, as the listener drives it: checks, the
    durable group commit (SQLite, synchronous=FULL), the ACK, and with ``metrics_on`` the counting
    (intake's after the commit, the listener's ACK latency and code).  Run under callgrind by
    :func:`instructions`: instruction counts do not move with the machine's load."""
    import asyncio

    from bench.mllp_load import PREFIX, SUFFIX
    from engine import logs
    from engine.config import ChannelConfig, SourceConfig
    from engine.intake import Committer, Intake, _msa1
    from engine.metrics import Metrics
    from engine.store import Store

    logs.configure("json", "info")  # as `sluice run`: an accepted message logs nothing
    work = Path(tempfile.mkdtemp(prefix="sluice-intake-loop-"))
    store = Store(f"sqlite:///{work}/loop.db")
    committer = Committer(store)
    committer.start()
    metrics = Metrics(channels=["c"]) if metrics_on else None
    channel = ChannelConfig(name="c", file="c.yaml", source=SourceConfig(), types={"ADT": ()})
    intake = Intake(channel, committer, metrics=metrics)
    cm = metrics.channel("c") if metrics is not None else None

    async def go() -> None:
        for i in range(n):
            arrived = time.monotonic()
            acks = await intake.handle(PREFIX + b"LOOP%08d" % i + SUFFIX, "127.0.0.1:1")
            assert acks and _msa1(acks[0]) == "CA"  # the template asks for a commit ACK only (MSH-15 AL)
            if cm is not None:  # what MLLPProtocol._work adds once the ACK is written
                cm.ack_latency.observe(time.monotonic() - arrived)
                for a in acks:
                    cm.ack(_msa1(a))

    asyncio.run(go())
    committer.stop()
    store.close()
    shutil.rmtree(work, ignore_errors=True)


def instructions(small: int = 300, large: int = 1300) -> dict[str, Any]:
    """Instructions per message of :func:`intake_loop` with metrics off and on (valgrind callgrind):
    (Ir(large) - Ir(small)) / (large - small) cancels the interpreter's start-up."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return {"skipped": "valgrind is not installed"}
    per: dict[str, float] = {}
    for side in ("off", "on"):
        ir = []
        for n in (small, large):
            cmd = [
                valgrind,
                "--tool=callgrind",
                "--callgrind-out-file=/dev/null",
                sys.executable,
                str(Path(__file__).resolve()),
                "--intake-loop",
                side,
                "--messages",
                str(n),
            ]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
            m = re.search(r"Collected : (\d+)", proc.stderr)
            assert m is not None, proc.stderr[-2000:]
            ir.append(int(m.group(1)))
        per[side] = (ir[1] - ir[0]) / (large - small)
        print(f"intake path, metrics {side}: {per[side]:,.0f} instructions per message", flush=True)
    return {
        "messages": [small, large],
        "instructions_per_message_off": round(per["off"]),
        "instructions_per_message_on": round(per["on"]),
        "on_vs_off": f"{(per['on'] - per['off']) / per['off'] * 100:+.2f}%",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "metrics.json")
    ap.add_argument("--intake-loop", choices=["on", "off"], help=argparse.SUPPRESS)  # run by instructions()
    ap.add_argument("--messages", type=int, default=1000, help=argparse.SUPPRESS)
    ap.add_argument("--only-instructions", action="store_true", help="just the callgrind count, no engines")
    args = ap.parse_args()
    if args.intake_loop:
        intake_loop(args.intake_loop == "on", args.messages)
        return
    if args.only_instructions:
        print(json.dumps(instructions(), indent=2))
        return
    scratch = Path(tempfile.mkdtemp(prefix="sluice-metrics-bench-"))
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    try:
        for i in range(args.rounds):
            for side in ("off", "on") if i % 2 == 0 else ("on", "off"):
                r = one_round(side == "on", args.seconds, scratch)
                runs[side].append(r)
                print(
                    f"round {i + 1} metrics {side}: " + "; ".join(f"{k} {v}" for k, v in r.items()),
                    flush=True,
                )
        summary: dict[str, Any] = {}
        for scen in ("1-connection", "50-connections", "50-connections@1000/s"):
            row: dict[str, Any] = {}
            for side in ("off", "on"):
                rates = [r[scen]["msg_per_s"] for r in runs[side]]
                row[side] = {
                    "msg_per_s_median": round(statistics.median(rates)),
                    "msg_per_s_best": round(max(rates)),
                }
                if scen == "50-connections@1000/s":
                    cpus = [r[scen]["engine_cpu_us_per_msg"] for r in runs[side]]
                    row[side]["engine_cpu_us_per_msg_median"] = statistics.median(cpus)
                    row[side]["p99_ms_median"] = statistics.median(r[scen]["p99_ms"] for r in runs[side])
            off, on = row["off"]["msg_per_s_median"], row["on"]["msg_per_s_median"]
            row["on_vs_off_median"] = f"{(on - off) / off * 100:+.1f}%"
            row["on_vs_off_best"] = (
                f"{(row['on']['msg_per_s_best'] - row['off']['msg_per_s_best']) / row['off']['msg_per_s_best'] * 100:+.1f}%"
            )
            if scen == "50-connections@1000/s":
                c_off = row["off"]["engine_cpu_us_per_msg_median"]
                c_on = row["on"]["engine_cpu_us_per_msg_median"]
                row["cpu_on_vs_off"] = f"{(c_on - c_off) / c_off * 100:+.1f}%"
            summary[scen] = row
        report = {
            "what": "MLLP intake, engine metrics on vs off (alternating rounds, fresh engine each); scrape cost",
            "machine": {
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "load_average_at_end": os.getloadavg(),
            },
            "seconds_per_scenario": args.seconds,
            "rounds": args.rounds,
            "summary": summary,
            "runs": runs,
            "scrape": scrape_cost(scratch),
            "hot_path": hot_path_cost(),
            "instructions": instructions(),
        }
        off_cpu = summary["50-connections@1000/s"]["off"]["engine_cpu_us_per_msg_median"]
        report["hot_path"]["share_of_engine_cpu_per_message"] = (
            f"{report['hot_path']['total_us_per_message'] / off_cpu * 100:.2f}%"
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))
    print("scrape:", report["scrape"])
    print("hot path:", report["hot_path"])
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
