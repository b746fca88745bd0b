"""Engine benchmark: MLLP intake (commit before ACK) and end-to-end ADT → FHIR delivery.

Runs the real engine (``sluice run``) as a subprocess on a temporary config and drives it with
``bench/mllp_load.py`` (N connections, one message in flight each, every ACK checked):

* ``intake``: SQLite store, ``ack: on-commit``, passthrough → file destination.  The 1-connection,
  50-connection and 50-connections-at-1000/s scenarios, with the plain asyncio echo-ACK server
  measured in the same run as the ceiling.
* ``e2e-file``: ``hl7-to-fhir`` → file destination: intake rate and FHIR bundles delivered per second.
* ``e2e-fhir``: ``hl7-to-fhir`` → the Medplum FHIR test server over HTTP (needs node/npm).
* ``e2e-rabbitmq``: ``hl7-to-fhir`` → RabbitMQ on 127.0.0.1:5672 with publisher confirms.

    python bench/engine_bench.py                       # all scenarios
    python bench/engine_bench.py --only intake --seconds 10

Figures go to bench/results/engine.json (and a table on stdout).  Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import store as st  # noqa: E402
from tests.support.engine import EngineProcess, basic_channel, child_pids, free_port, write_config  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# Every engine started here serves its admin API on a free port: the default 8080 may be another engine's.
os.environ.setdefault("SLUICE_ADMIN_PORT", "0")
LOAD = [sys.executable, str(ROOT / "bench" / "mllp_load.py")]


def run_load(port: int, *args: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out = tmp.name
    cmd = [*LOAD, "--port", str(port), *args, "--json", out]
    subprocess.run(cmd, check=True, cwd=ROOT)
    data: dict[str, Any] = json.loads(Path(out).read_text())
    os.unlink(out)
    return data


def start_engine(
    workdir: Path, channel: dict[str, Any], destinations: dict[str, Any], *, encrypted: bool = False
) -> EngineProcess:
    """``encrypted``: a fresh key ring and ``store_encryption`` (bodies, ACKs, payloads sealed; issue #12)."""
    port = free_port()
    channel = {**channel, "source": {**channel.get("source", {}), "host": "127.0.0.1", "port": port}}
    cfg = write_config(workdir, channels={"bench": channel}, destinations=destinations)
    if encrypted:
        from engine import keyring

        keyring.write_ring(workdir / "store.keys", [keyring.new_key()], replace=False)
        cfg.write_text(cfg.read_text() + f"store_encryption: {{key_file: {workdir / 'store.keys'}}}\n")
    return EngineProcess(cfg, port).start()


def intake(seconds: float, *, encrypted: bool = False) -> dict[str, Any]:
    work = _scratch()
    dest = {"out": {"kind": "file", "directory": str(work / "out"), "fsync": True}}
    eng = start_engine(work, basic_channel(0), dest, encrypted=encrypted)
    try:
        data = run_load(eng.port, "--suite", "--compare-echo", "--seconds", str(seconds), "--warmup", "1")
    finally:
        eng.stop()
    return data


def _cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process so far (Linux /proc; zeros when gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of one process so far."""
    return sum(_cpu_split(pid))


# Every scenario's files stay until the whole run ends.  This machine's root file system is ext4 without
# a journal: there, creating a file within about a minute of deleting many costs ~0.6 ms of kernel CPU
# (inode allocation skips recently deleted inodes one by one: ext4 recently_deleted(), seen with perf),
# which would charge one scenario's clean-up to the next one's engine.
_SCRATCH: list[Path] = []


def _scratch() -> Path:
    """A new directory for one scenario, under one root that main() removes at the end."""
    if not _SCRATCH:
        _SCRATCH.append(Path(tempfile.mkdtemp(prefix="sluice-bench-")))
    return Path(tempfile.mkdtemp(prefix="run-", dir=_SCRATCH[0]))


def e2e(
    kind: str,
    count: int,
    connections: int,
    fhir_url: str | None = None,
    *,
    server_pid: int | None = None,
    patients: int = 1,
    message: str = "adt-a01",
    encrypted: bool = False,
) -> dict[str, Any]:
    """Send ``count`` messages over ``connections``; time intake and the last delivery."""
    work = _scratch()
    if kind == "file":
        dest: dict[str, Any] = {
            "kind": "file",
            "directory": str(work / "out"),
            "fsync": os.environ.get("BENCH_FSYNC", "1") == "1",
        }
    elif kind == "fhir":
        # Medplum refuses a transaction with conditional writes and more than 8 entries ("requires
        # strict isolation but has too many entries"): send a message that converts to fewer.
        dest = {"kind": "fhir", "base_url": fhir_url, "concurrency": 8}
    else:
        dest = {"kind": "rabbitmq", "exchange": "sluice.bench", "routing_key": "hl7.{type}.{trigger}"}
    channel = {
        "transform": [{"hl7-to-fhir": {"derive_unknown_systems": True}}],
        "routes": [{"destination": "out"}],
        "order_by": "PID-3.1",
    }
    dest["lanes"] = 16
    eng = start_engine(work, channel, {"out": dest}, encrypted=encrypted)
    assert eng.proc is not None
    cpu0 = {"server": _cpu_seconds(server_pid) if server_pid else 0.0, "engine": _cpu_seconds(eng.proc.pid)}
    sys0 = _cpu_split(eng.proc.pid)[1]
    try:
        t0 = time.monotonic()
        load = run_load(
            eng.port,
            "--connections",
            str(connections),
            "--count",
            str(count),
            "--seconds",
            "600",
            "--warmup",
            "0",
            "--patients",
            str(patients),
            "--message",
            message,
        )
        t_intake = time.monotonic() - t0
        acked = int(load["results"][0]["acked_ok"])
        store = st.Store(f"sqlite:///{work / 'sluice.db'}")
        try:
            while True:
                counts = store.delivery_counts()
                done = counts.get(("out", st.DELIVERED), 0)
                dead = counts.get(("out", st.DEAD), 0)
                statuses = store.status_counts()
                errors = statuses.get(("bench", st.ERROR), 0)
                total = sum(v for (ch, s), v in statuses.items() if ch == "bench")
                if done + dead + errors >= total and total >= acked:
                    break
                if time.monotonic() - t0 > 600:
                    break
                time.sleep(0.05)
            t_all = time.monotonic() - t0
            # Where the CPU went, per delivered message: the engine process (listener, store
            # writer, delivery), its worker processes (conversion), the FHIR server (if any).
            cpu = {
                "engine": _cpu_seconds(eng.proc.pid) - cpu0["engine"],
                "workers": sum(_cpu_seconds(c) for c in child_pids(eng.proc.pid)),
            }
            if server_pid:
                cpu["server"] = _cpu_seconds(server_pid) - cpu0["server"]
            engine_sys = _cpu_split(eng.proc.pid)[1] - sys0
        finally:
            store.close()
    finally:
        eng.stop()
    res = load["results"][0]
    return {
        "destination": kind,
        "store_encryption": encrypted,
        "message": message,
        "patients": patients,
        "messages": count,
        "connections": connections,
        "intake_msg_per_s": res["msg_per_s"],
        "intake_ack_p99_ms": res["latency_ms"]["p99"],
        "delivered": done,
        "dead": dead,
        "processing_errors": errors,
        "end_to_end_seconds": round(t_all, 2),
        "cpu_ms_per_delivered": {k: round(v * 1000 / max(1, done), 3) for k, v in cpu.items()},
        "engine_kernel_share": round(engine_sys / cpu["engine"], 2) if cpu["engine"] else None,
        "delivered_per_s": round(done / t_all, 1) if t_all else 0.0,
        "intake_seconds": round(t_intake, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["intake", "e2e-file", "e2e-fhir", "e2e-rabbitmq"], action="append")
    ap.add_argument("--seconds", type=float, default=10.0, help="per intake scenario")
    ap.add_argument("--count", type=int, default=20000, help="messages per end-to-end run")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--patients", type=int, default=1, help="distinct patients in the end-to-end runs")
    ap.add_argument("--json", type=Path, default=RESULTS / "engine.json")
    ap.add_argument(
        "--encryption",
        choices=["off", "on"],
        default="off",
        help="store_encryption (bench/encryption_bench.py compares)",
    )
    args = ap.parse_args(argv)
    enc = args.encryption == "on"
    which = args.only or ["intake", "e2e-file", "e2e-fhir", "e2e-rabbitmq"]
    report: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "store": "sqlite (WAL, synchronous=FULL, commit before ACK)",
        "store_encryption": enc,
    }
    if "intake" in which:
        report["intake"] = intake(args.seconds, encrypted=enc)
    e2e_results = []
    if "e2e-file" in which:
        e2e_results.append(e2e("file", args.count, args.connections, patients=args.patients, encrypted=enc))
    if "e2e-fhir" in which:
        from tests.support.fhirserver import FhirServer

        with FhirServer() as srv:
            # the full ADT^A01 converts to ~18 entries, over Medplum's limit for conditional transactions;
            # the registration message (6 entries) is one it accepts (see _registration in mllp_load.py)
            e2e_results.append(
                e2e(
                    "fhir",
                    min(args.count, 2000),
                    args.connections,
                    srv.base_url,
                    server_pid=srv.proc.pid if srv.proc else None,
                    patients=max(args.patients, 200),
                    message="registration",
                    encrypted=enc,
                )
            )
    if "e2e-rabbitmq" in which:
        e2e_results.append(
            e2e("rabbitmq", args.count, args.connections, patients=args.patients, encrypted=enc)
        )
    if e2e_results:
        report["end_to_end"] = e2e_results
    if _SCRATCH:
        shutil.rmtree(_SCRATCH.pop(), ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    for r in e2e_results:
        print(
            f"e2e → {r['destination']} ({r['message']}, {r['patients']} patients): intake {r['intake_msg_per_s']:.0f} msg/s, "
            f"delivered {r['delivered']}/{r['messages']} at {r['delivered_per_s']:.0f}/s "
            f"({r['end_to_end_seconds']} s end to end; dead {r['dead']}, errors {r['processing_errors']}); "
            f"CPU ms per delivered: {r['cpu_ms_per_delivered']} (engine in the kernel: {r['engine_kernel_share']})"
        )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
