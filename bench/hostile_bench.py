"""Hostile-client benchmark (issue #12): the engine's RSS, log volume and a well-behaved sender's ACK
latency while a client abuses the MLLP port.  Figures go to ``bench/results/hostile.json``.

Scenarios (each against a fresh ``sluice run`` process: SQLite store, the demo-style channel
``hl7-to-fhir`` → file destination, 127.0.0.1 only, synthetic data):

* ``empty-flood``: one connection sends 2,000,000 empty frames (``0B 1C 0D``, 6 MB) and never reads
  its ACKs; it gives up once the engine has stopped reading from it for ``--stall`` seconds (or all
  is sent), then closes.
* ``big-frames``: 4 connections each pipeline 24 frames of 15 MB (a valid ADT with a 15 MB NTE of
  random letters, each with its own MSH-10) and never read their ACKs.
* ``idle-connections``: 1,200 TCP connections that send nothing, then a new sender's AA: the time
  from connect to AA.
* ``tls-handshakes``: 1,100 TCP connections to a TLS port that never start the handshake, then a new
  TLS sender's AA.

During the two floods a well-behaved sender (one connection, one 1.6 KB ADT in flight, a new one
every 20 ms) records its ACK latency.  RSS is the engine process's VmRSS from /proc (worker processes
not included), sampled every 0.1 s: at start, peak during the flood, and 5 s after the client left.

    .venv/bin/python bench/hostile_bench.py                      # every scenario
    .venv/bin/python bench/hostile_bench.py --only empty-flood --json /tmp/h.json

Nothing here is a test: tests/engine/test_hostile.py asserts the behaviour (bounds, not timings).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.engine import EngineProcess, fhir_channel, free_port, write_config  # noqa: E402
from tests.support.rawmllp import END, VT, push, read_frame  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                self.samples.append((time.monotonic() - t0, rss_mb(self.pid)))
            self.stop.wait(self.every)

    def peak(self) -> float:
        return max((r for _, r in self.samples), default=0.0)


def adt(control: str, extra: bytes = b"") -> bytes:
    ts = time.strftime("%Y%m%d%H%M%S")
    segs = [
        f"MSH|^~\\&|BENCH|NORTH|SL|HOSP|{ts}||ADT^A08|{control}|P|2.5.1",
        f"EVN|A08|{ts}",
        "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex||19800101|F",
        "PV1|1|O",
    ]
    return ("\r".join(segs) + "\r").encode() + extra


class GoodSender(threading.Thread):
    """One connection, one message in flight, a new one every ``every`` seconds; ACK latencies kept."""

    def __init__(self, port: int, every: float = 0.02, tls: ssl.SSLContext | None = None):
        super().__init__(daemon=True)
        self.port, self.every, self.tls = port, every, tls
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        sock: socket.socket | None = None
        buf = bytearray()
        while not self.stop.is_set():
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
                    buf = bytearray()
                n += 1
                cid = f"GOOD{os.getpid()}{n:07d}{int(time.time() * 1000) % 100000}"
                t0 = time.monotonic()
                sock.sendall(VT + adt(cid) + END)
                ack = read_frame(sock, buf, t0 + 30)
                self.latencies.append(time.monotonic() - t0)
                if b"MSA|AA|" + cid.encode() not in ack:
                    self.errors.append(ack[:200].decode("latin-1"))
            except OSError as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                if sock is not None:
                    sock.close()
                sock = None
            self.stop.wait(self.every)
        if sock is not None:
            sock.close()

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        if not lat:
            return {"acks": 0, "errors": len(self.errors), "first_errors": self.errors[:3]}

        def pct(p: float) -> float:  # nearest rank
            return round(lat[min(len(lat) - 1, max(0, int(p * len(lat) + 0.999999) - 1))] * 1000, 1)

        return {
            "acks": len(lat),
            "errors": len(self.errors),
            "first_errors": self.errors[:3],
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "max_ms": round(lat[-1] * 1000, 1),
        }


def log_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


SETTINGS: dict[str, Any] = {"transform": "fhir", "workers": 1, "limits": None}


def start(work: Path, source: dict[str, Any] | None = None, **routes_extra: Any) -> EngineProcess:
    port = free_port()
    ch = fhir_channel(port, "out")
    if SETTINGS["transform"] == "passthrough":
        ch["transform"] = ["passthrough"]
    if SETTINGS["limits"]:
        routes_extra = {**routes_extra, "limits": SETTINGS["limits"]}
    ch["source"].update(source or {})
    dest = {"out": {"kind": "file", "directory": str(work / "out"), "fsync": False}}
    cfg = write_config(
        work, channels={"bench": ch}, destinations=dest, processing={"workers": SETTINGS["workers"]}
    )
    if routes_extra:
        import yaml

        doc = yaml.safe_load(cfg.read_text())
        doc.update(routes_extra)
        cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    return EngineProcess(cfg, port, env={"SLUICE_ADMIN_PORT": "0"}).start()


def flood(
    work: Path, make_clients: Callable[[int], list[Callable[[], int]]], params: dict[str, Any]
) -> dict[str, Any]:
    """Start an engine, run the flooders (built for its port) beside a good sender, measure."""
    eng = start(work)
    assert eng.proc is not None
    pid = eng.proc.pid
    clients = make_clients(eng.port)
    try:
        time.sleep(1.0)
        rss_start = rss_mb(pid)
        lines_start = log_lines(eng.log)
        sampler = RssSampler(pid)
        sampler.start()
        good = GoodSender(eng.port)
        good.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        results: list[int] = []
        threads = [threading.Thread(target=lambda c=c: results.append(c())) for c in clients]  # type: ignore[misc]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        flood_s = time.monotonic() - t0
        good.stop.set()
        good.join()
        time.sleep(5.0)
        rss_after = rss_mb(pid)
        sampler.stop.set()
        sampler.join()
        return {
            "rss_start_mb": round(rss_start, 1),
            "rss_peak_mb": round(sampler.peak(), 1),
            "rss_5s_after_mb": round(rss_after, 1),
            "flood_seconds": round(flood_s, 1),
            "bytes_sent_by_flooders": results,
            "log_lines": log_lines(eng.log) - lines_start,
            "good_sender": good.summary(),
            "params": params,
        }
    finally:
        eng.stop()


def empty_flood(work: Path, frames: int, stall: float) -> dict[str, Any]:
    data = (VT + END) * frames

    def clients(port: int) -> list[Callable[[], int]]:
        def client() -> int:
            with socket.create_connection(("127.0.0.1", port)) as s:
                return push(s, data, len(data), stall, poll=0.2)

        return [client]

    return flood(work, clients, {"frames": frames})


def big_frames(work: Path, connections: int, per_conn: int, size: int, stall: float) -> dict[str, Any]:
    import random

    def client(port: int, k: int) -> Callable[[], int]:
        def run() -> int:
            rnd = random.Random(k)
            block = bytes(rnd.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(size // 64)) * 64
            stem = f"BIG{k}{int(time.time()) % 100000}"

            def frame(i: int) -> bytes:
                # every frame the same length (the index zero-padded), so an offset maps to one frame
                return VT + adt(f"{stem}x{i:04d}", b"NTE|1||" + block[: size - 200] + b"\r") + END

            one = len(frame(0))
            total = one * per_conn

            def gen(sent: int) -> bytes:
                i, off = divmod(sent, one)
                return frame(i)[off:] if i < per_conn else b""

            with socket.create_connection(("127.0.0.1", port)) as s:
                return push(s, gen, total, stall, poll=0.2)

        return run

    params = {"connections": connections, "frames": per_conn, "size": size}
    return flood(work, lambda port: [client(port, k) for k in range(connections)], params)


def idle_connections(work: Path, n: int, tls: bool) -> dict[str, Any]:
    source: dict[str, Any] = {}
    client_ctx: ssl.SSLContext | None = None
    if tls:
        cert, key = _self_signed(work)
        source["tls"] = {"cert": str(cert), "key": str(key)}
        client_ctx = ssl.create_default_context(cafile=str(cert))
        client_ctx.check_hostname = False
    eng = start(work, source)
    assert eng.proc is not None
    socks: list[socket.socket] = []

    def one_message(cid: str) -> bytes:
        raw = socket.create_connection(("127.0.0.1", eng.port), timeout=30)
        s: socket.socket = client_ctx.wrap_socket(raw, server_hostname="localhost") if client_ctx else raw
        with s:
            s.sendall(VT + adt(cid) + END)
            return read_frame(s, bytearray(), time.monotonic() + 30)

    try:
        one_message("WARMUP1")  # a running engine, not one still starting its worker processes
        time.sleep(1.0)
        t0 = time.monotonic()
        for _ in range(n):
            with contextlib.suppress(OSError):
                socks.append(socket.create_connection(("127.0.0.1", eng.port), timeout=10))
        opened = time.monotonic() - t0
        time.sleep(0.5)
        t1 = time.monotonic()
        ack = b""
        error = ""
        try:
            ack = one_message("NEWCOMER1")
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
        newcomer = time.monotonic() - t1
        still_open = 0
        for s2 in socks:
            s2.setblocking(False)
            try:
                still_open += s2.recv(1) != b""
            except BlockingIOError:
                still_open += 1
            except OSError:
                pass
        return {
            "connections": n,
            "opened": len(socks),
            "open_seconds": round(opened, 2),
            "newcomer_ack_seconds": round(newcomer, 3),
            "newcomer_ack": ack[ack.find(b"MSA") : ack.find(b"MSA") + 20].decode("latin-1") if ack else error,
            "idle_still_open_after": still_open,
            "rss_mb": round(rss_mb(eng.proc.pid), 1),
        }
    finally:
        for s2 in socks:
            s2.close()
        eng.stop()


def _self_signed(work: Path) -> tuple[Path, Path]:
    cert, key = work / "bench.crt", work / "bench.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = ["empty-flood", "big-frames", "idle-connections", "tls-handshakes"]
    ap.add_argument("--only", choices=names, action="append")
    ap.add_argument("--stall", type=float, default=10.0, help="a flooder gives up after this long stalled")
    ap.add_argument("--json", type=Path, default=RESULTS / "hostile.json")
    ap.add_argument("--label", default="", help="recorded with the figures (e.g. the commit)")
    ap.add_argument("--transform", choices=["fhir", "passthrough"], default="fhir")
    ap.add_argument("--workers", type=int, default=1, help="processing.workers of the engine")
    ap.add_argument(
        "--limits",
        type=json.loads,
        default=None,
        help='routes.yaml limits, e.g. {"inflight_bytes": 64000000}',
    )
    args = ap.parse_args(argv)
    SETTINGS.update(transform=args.transform, workers=args.workers, limits=args.limits)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    report: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_at_start": os.getloadavg(),
        "label": args.label,
        "settings": dict(SETTINGS),
    }
    for name in args.only or names:
        work = Path(tempfile.mkdtemp(prefix=f"sluice-hostile-{name}-"))
        try:
            if name == "empty-flood":
                r = empty_flood(work, 2_000_000, args.stall)
            elif name == "big-frames":
                r = big_frames(work, 4, 24, 15 * 1024 * 1024, args.stall)
            elif name == "idle-connections":
                r = idle_connections(work, 1200, tls=False)
            else:
                r = idle_connections(work, 1100, tls=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        report[name] = r
        print(name, json.dumps(r), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
