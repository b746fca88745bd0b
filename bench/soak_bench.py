"""Soak benchmark (issue #12): a steady offered load plus a hostile client, for ``--minutes``.

One ``sluice run`` process (SQLite store, the demo-style channel ``hl7-to-fhir`` → file destination,
127.0.0.1 only, synthetic data) receives:

* ``--rate`` msg/s (default 1,000) offered over ``--connections`` (default 50) connections, each sending
  on its own fixed schedule with one message in flight; every ACK is checked (AA and its MSA-2);
* a hostile client that reconnects every second and each time does one of: 20,000 empty frames without
  reading ACKs, 1 MB of junk outside frames, half a frame then silence, a frame over ``max_frame``,
  or nothing at all (an idle connection), then leaves.

Every ``--every`` seconds (default 10) a sample goes to the time series: the engine process's RSS (and
its worker processes'), ACK latency p50/p99/max of the well-behaved senders in that interval, messages
offered/answered/late, delivered so far (the store's delivery rows), the backlog (received but not
processed), and the engine's log lines so far.  Results: ``bench/results/soak.json``.

    .venv/bin/python bench/soak_bench.py --minutes 30            # the issue's soak
    .venv/bin/python bench/soak_bench.py --minutes 5 --json /tmp/soak.json

Nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.engine import EngineProcess, child_pids, fhir_channel, free_port, write_config  # noqa: E402

RESULTS = ROOT / "bench" / "results"
VT, END = b"\x0b", b"\x1c\x0d"


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def adt(control: str, patient: int) -> bytes:
    ts = time.strftime("%Y%m%d%H%M%S")
    segs = [
        f"MSH|^~\\&|SOAK|NORTH|SL|HOSP|{ts}||ADT^A08|{control}|P|2.5.1",
        f"EVN|A08|{ts}",
        f"PID|1||MRN{patient:06d}^^^NORTH^MR||Testpatient^Alex||19800101|F",
        f"PV1|1|O|WARD1^101^A^NORTH||||DR0001^PHYSICIAN^TEST|||||||||||VN{patient:06d}^^^NORTH^VN",
    ]
    return ("\r".join(segs) + "\r").encode()


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.offered = self.answered = self.bad = self.errors = self.late = 0
        self.hostile = {"runs": 0, "errors": 0}

    def take(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        self.latencies = []

        def pct(q: float) -> float | None:
            if not lat:
                return None
            return round(lat[min(len(lat) - 1, max(0, int(q * len(lat) + 0.999999) - 1))] * 1000, 1)

        return {"acks": len(lat), "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": pct(1.0)}


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    data = await reader.readuntil(END)
    return data[data.find(VT) + 1 : -2]


async def sender(k: int, port: int, interval: float, stop: asyncio.Event, st: Stats, run: str) -> None:
    n = 0
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    next_at = time.monotonic() + random.random() * interval
    try:
        while not stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.001:
                st.late += 1
            next_at += interval
            n += 1
            cid = f"{run}{k:02d}{n:07d}"
            st.offered += 1
            t0 = time.monotonic()
            try:
                writer.write(VT + adt(cid, (k * 1000 + n) % 5000) + END)
                ack = await asyncio.wait_for(read_frame(reader), 60)
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                st.errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            st.latencies.append(time.monotonic() - t0)
            st.answered += 1
            if f"MSA|AA|{cid}".encode() not in ack:
                st.bad += 1
    finally:
        writer.close()


async def hostile(port: int, stop: asyncio.Event, st: Stats) -> None:
    """Reconnect every second and misbehave in one of five ways, then leave."""
    kinds = ["empty-flood", "junk", "half-frame", "oversize", "idle"]
    i = 0
    while not stop.is_set():
        t0 = time.monotonic()
        kind = kinds[i % len(kinds)]
        i += 1
        st.hostile["runs"] += 1
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            if kind == "empty-flood":
                writer.write((VT + END) * 20_000)
            elif kind == "junk":
                writer.write(os.urandom(1024 * 1024).replace(VT, b"x"))
            elif kind == "half-frame":
                writer.write(VT + adt("HALF", 0)[:40])
            elif kind == "oversize":
                writer.write(VT + b"A" * (17 * 1024 * 1024) + END)
            await asyncio.sleep(max(0.0, 0.9 - (time.monotonic() - t0)))
            writer.transport.abort()
        except OSError:
            st.hostile["errors"] += 1
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))


def store_counts(db: Path) -> dict[str, int]:
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            delivered = con.execute("SELECT count(*) FROM deliveries WHERE status = 'delivered'").fetchone()[
                0
            ]
            received = con.execute("SELECT count(*) FROM messages WHERE status = 'received'").fetchone()[0]
            stored = con.execute("SELECT count(*) FROM messages").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return {}
    return {"delivered": delivered, "backlog": received, "stored": stored}


async def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    port = free_port()
    ch = fhir_channel(port, "out")
    dest = {"out": {"kind": "file", "directory": str(work / "out"), "fsync": False}}
    cfg = write_config(work, channels={"soak": ch}, destinations=dest, processing={"workers": args.workers})
    eng = EngineProcess(cfg, port, env={"SLUICE_ADMIN_PORT": "0"}).start()
    assert eng.proc is not None
    pid = eng.proc.pid
    st = Stats()
    stop = asyncio.Event()
    run = f"S{int(time.time()) % 100000:05d}"
    series: list[dict[str, Any]] = []
    try:
        await asyncio.sleep(2.0)
        start_rss = rss_mb(pid)
        interval = args.connections / args.rate
        tasks = [
            asyncio.create_task(sender(k, port, interval, stop, st, run)) for k in range(args.connections)
        ]
        if not args.no_hostile:
            tasks.append(asyncio.create_task(hostile(port, stop, st)))
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        while time.monotonic() < end:
            await asyncio.sleep(min(args.every, max(0.0, end - time.monotonic())))
            with open(eng.log, "rb") as logf:
                lines = sum(1 for _ in logf)
            sample = {
                "t_s": round(time.monotonic() - t0, 1),
                "load1": round(os.getloadavg()[0], 2),  # the machine's state: other work slows every figure
                "rss_mb": round(rss_mb(pid), 1),
                "workers_rss_mb": round(sum(rss_mb(c) for c in child_pids(pid)), 1),
                **st.take(),
                "offered": st.offered,
                "answered": st.answered,
                "not_aa": st.bad,
                "errors": st.errors,
                "late_sends": st.late,
                "log_lines": lines,
                **store_counts(work / "sluice.db"),
                "hostile_runs": st.hostile["runs"],
            }
            series.append(sample)
            print(json.dumps(sample), flush=True)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(5.0)
        return {
            "rss_start_mb": round(start_rss, 1),
            "rss_end_mb": round(rss_mb(pid), 1),
            "rss_max_mb": max((s["rss_mb"] for s in series), default=0.0),
            "p99_max_ms": max((s["p99_ms"] or 0 for s in series), default=0.0),
            "final": {**store_counts(work / "sluice.db"), "offered": st.offered, "answered": st.answered},
            "hostile": st.hostile,
            "series": series,
        }
    finally:
        eng.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=1000.0, help="offered msg/s over all connections")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--workers", type=int, default=2, help="processing.workers of the engine")
    ap.add_argument("--no-hostile", action="store_true", help="the steady load alone")
    ap.add_argument("--json", type=Path, default=RESULTS / "soak.json")
    args = ap.parse_args(argv)
    # SIGTERM ends the run like Ctrl-C: the finally blocks stop the engine (by its PID) and remove the work dir
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="sluice-soak-"))
    try:
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
        result = asyncio.run(soak(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_at_end": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        **result,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
