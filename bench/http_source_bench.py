"""HTTP source benchmark: N concurrent clients POST FHIR Appointments to a ``kind: http`` channel.

Runs the real engine (``sluice run``) on a temporary config: SQLite store, the http source (every answer
after a durable commit), ``fhir-to-hl7`` → a file destination.  Each client posts distinct Appointments
(one request in flight each) for ``--seconds``, unpaced, and then paced at ``--rate`` requests/s in total;
every answer must be 201.  Reports throughput and p50/p99/max latency per scenario.

    python bench/http_source_bench.py --clients 50 --seconds 10 --rate 500

Figures go to bench/results/http_source.json (and a table on stdout).  Nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.support.engine import EngineProcess, free_port, write_config  # noqa: E402

RESULTS = ROOT / "bench" / "results"
os.environ.setdefault("SLUICE_ADMIN_PORT", "0")


def appointment(client: int, n: int) -> dict[str, Any]:
    return {
        "resourceType": "Appointment",
        "id": f"b{client}-{n}",
        "meta": {"versionId": "1", "lastUpdated": "2026-12-04T10:00:00Z"},
        "identifier": [{"system": "urn:portal:appointment", "value": f"PB-{client}-{n}"}],
        "status": "booked",
        "start": "2026-12-10T17:00:00Z",
        "end": "2026-12-10T17:30:00Z",
        "participant": [{"actor": {"reference": f"Patient/p{client}"}, "status": "accepted"}],
    }


def engine_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc), 0 when unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


async def drive(
    url: str, clients: int, seconds: float, rate: float, tag: str, engine_pid: int = 0
) -> dict[str, Any]:
    lat: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds
    interval = clients / rate if rate else 0.0  # each client's own pace

    async def one(c: int) -> None:
        nonlocal errors
        async with httpx.AsyncClient(timeout=30) as client:
            n = 0
            nxt = time.perf_counter()
            while time.perf_counter() < stop_at:
                if interval:
                    await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
                    nxt += interval
                n += 1
                body = json.dumps(appointment(c, n) | {"id": f"{tag}{c}-{n}"}).encode()
                t0 = time.perf_counter()
                resp = await client.post(url, content=body, headers={"Content-Type": "application/fhir+json"})
                lat.append(time.perf_counter() - t0)
                if resp.status_code != 201:
                    errors += 1

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    eng0 = engine_cpu(engine_pid)
    await asyncio.gather(*(one(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    client_cpu = time.process_time() - cpu0
    eng_cpu = engine_cpu(engine_pid) - eng0
    lat.sort()

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else 0.0

    return {
        "clients": clients,
        "target_rate": rate or None,
        "requests": len(lat),
        "errors": errors,
        "throughput_per_s": round(len(lat) / wall, 1),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(lat[-1] * 1000, 2) if lat else 0.0,
        "wall_s": round(wall, 2),
        "client_cpu_s": round(client_cpu, 2),  # this process (httpx clients)
        "engine_cpu_s": round(eng_cpu, 2),  # the engine process (user + system)
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=500.0, help="total requests/s of the paced scenario")
    ap.add_argument("--json", type=Path, default=RESULTS / "http_source.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sluice-httpbench-") as tmp:
        port = free_port()
        routes = write_config(
            Path(tmp),
            channels={
                "push": {
                    "source": {"kind": "http", "host": "127.0.0.1", "port": port, "path": "/fhir"},
                    "transform": [{"fhir-to-hl7": {"placer_system": "urn:portal:appointment"}}],
                    "routes": [{"destination": "out"}],
                }
            },
            destinations={"out": {"kind": "file", "directory": str(Path(tmp) / "out")}},
        )
        url = f"http://127.0.0.1:{port}/fhir/Appointment"
        with EngineProcess(routes, port) as proc:
            pid = proc.proc.pid if proc.proc else 0
            asyncio.run(drive(url, 4, 2.0, 0, "w", pid))  # warm-up
            unpaced = asyncio.run(drive(url, args.clients, args.seconds, 0, "u", pid))
            paced = asyncio.run(drive(url, args.clients, args.seconds, args.rate, "p", pid))
    out = {
        "what": "kind: http source, POST Appointment, answer after the durable commit (SQLite), fhir-to-hl7 → file",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_1m": os.getloadavg()[0],
        },
        "client": "httpx AsyncClient per client, all clients in one Python process on the same machine",
        "unpaced": unpaced,
        "paced": paced,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    for name in ("unpaced", "paced"):
        r = out[name]
        print(
            f"{name:8} clients={r['clients']} requests={r['requests']} errors={r['errors']} "
            f"{r['throughput_per_s']}/s p50={r['p50_ms']}ms p99={r['p99_ms']}ms max={r['max_ms']}ms "
            f"wall={r['wall_s']}s client_cpu={r['client_cpu_s']}s engine_cpu={r['engine_cpu_s']}s"
        )


if __name__ == "__main__":
    main()
