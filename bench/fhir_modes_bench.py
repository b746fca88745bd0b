"""FHIR delivery modes benchmark (issue 13): delivered/s to the Medplum test server for the full ADT^A01 in
each mode, with CPU per delivered message by process, next to the 6-entry registration message.

Runs the real engine (``sluice run``) against the Medplum fhir-router test server (in-memory repository,
tests/support/fhir_server) and drives it with ``bench/mllp_load.py`` (the same scenario as ``e2e-fhir`` in
bench/engine_bench.py: 50 connections, 200 patients, ``order_by: PID-3.1``, 16 delivery lanes, concurrency 8):

* ``registration``: the 6-entry ADT^A04, one transaction (the existing ``e2e-fhir`` figure);
* ``adt-a01`` (the load generator's full ADT^A01: NK1, 2 OBX, AL1, DG1, IN1, with a reference
  cycle Encounter ↔ Condition; 18 entries with the Provenance) in ``transaction`` with
  ``max_transaction_entries: 8`` (3 chunks),
  ``per-resource`` and ``batch`` (one batch per dependency level, two-phase update of the cycle).

Each run gets a fresh server (Medplum's in-memory repository answers a conditional write by scanning, so it
slows as it fills; a fresh one keeps the runs comparable).  CPU: the engine process (listener, store writer,
delivery), its worker processes (conversion), the FHIR server (node).

    python bench/fhir_modes_bench.py                 # all runs, 1000 messages each
    python bench/fhir_modes_bench.py --count 300 --only per-resource

Figures go to bench/results/fhir_modes.json (and a table on stdout).  Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.engine_bench import _SCRATCH, _cpu_seconds, _scratch, run_load, start_engine  # noqa: E402
from engine import store as st  # noqa: E402
from tests.support.engine import child_pids  # noqa: E402
from tests.support.fhirserver import FhirServer  # noqa: E402

RESULTS = ROOT / "bench" / "results"

RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "registration-transaction": ("registration", {"mode": "transaction"}),
    "transaction-8": ("adt-a01", {"mode": "transaction", "max_transaction_entries": 8}),
    "per-resource": ("adt-a01", {"mode": "per-resource"}),
    "batch": ("adt-a01", {"mode": "batch"}),
}


def requests_per_message(message: str, opts: dict[str, Any]) -> tuple[int, int]:
    """(bundle entries, HTTP requests) for one message of the load generator in this mode."""
    from bench.mllp_load import TEMPLATES
    from engine import hl7
    from engine.destinations import fhir_plan
    from transforms.convert import ConvertSettings, convert

    prefix, suffix = TEMPLATES[message]
    msg = hl7.parse((prefix + b"CID1" + suffix).decode())
    entries = convert(msg, ConvertSettings(derive_unknown_systems=True))["entry"]
    cap = int(opts.get("max_transaction_entries", 0))
    if opts["mode"] == "transaction" and (not cap or len(entries) <= cap):
        return len(entries), 1
    return len(entries), len(fhir_plan.build(entries, opts["mode"], cap).steps)


def run(name: str, count: int, connections: int, patients: int) -> dict[str, Any]:
    message, opts = RUNS[name]
    work = _scratch()
    with FhirServer() as srv:
        assert srv.proc is not None
        server_pid = srv.proc.pid
        dest = {"kind": "fhir", "base_url": srv.base_url, "concurrency": 8, "lanes": 16, **opts}
        channel = {
            "transform": [{"hl7-to-fhir": {"derive_unknown_systems": True}}],
            "routes": [{"destination": "out"}],
            "order_by": "PID-3.1",
        }
        eng = start_engine(work, channel, {"out": dest})
        assert eng.proc is not None
        cpu0 = {"server": _cpu_seconds(server_pid), "engine": _cpu_seconds(eng.proc.pid)}
        try:
            t0 = time.monotonic()
            load = run_load(
                eng.port,
                *("--connections", str(connections), "--count", str(count), "--seconds", "600"),
                *("--warmup", "0", "--patients", str(patients), "--message", message),
            )
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
                    if (done + dead + errors >= total and total >= acked) or time.monotonic() - t0 > 900:
                        break
                    time.sleep(0.05)
                t_all = time.monotonic() - t0
                cpu = {
                    "engine": _cpu_seconds(eng.proc.pid) - cpu0["engine"],
                    "workers": sum(_cpu_seconds(c) for c in child_pids(eng.proc.pid)),
                    "server": _cpu_seconds(server_pid) - cpu0["server"],
                }
                reasons = [r.reason for r in store.dead_letters()][:3] if dead else []
            finally:
                store.close()
        finally:
            eng.stop()
    entries, requests = requests_per_message(message, opts)
    return {
        "run": name,
        "message": message,
        "destination_options": opts,
        "entries_per_message": entries,
        "requests_per_message": requests,
        "messages": count,
        "patients": patients,
        "connections": connections,
        "delivered": done,
        "dead": dead,
        "dead_reasons": reasons,
        "processing_errors": errors,
        "end_to_end_seconds": round(t_all, 2),
        "delivered_per_s": round(done / t_all, 1) if t_all else 0.0,
        "intake_msg_per_s": load["results"][0]["msg_per_s"],
        "cpu_ms_per_delivered": {k: round(v * 1000 / max(1, done), 2) for k, v in cpu.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(RUNS), action="append")
    ap.add_argument("--count", type=int, default=1000, help="messages per run")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--patients", type=int, default=200)
    ap.add_argument("--json", type=Path, default=RESULTS / "fhir_modes.json")
    args = ap.parse_args(argv)
    results = [run(n, args.count, args.connections, args.patients) for n in (args.only or list(RUNS))]
    if _SCRATCH:
        shutil.rmtree(_SCRATCH.pop(), ignore_errors=True)
    report = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "server": "Medplum fhir-router, in-memory repository (tests/support/fhir_server), fresh per run",
        "runs": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print("| run | entries | requests/msg | delivered/s | CPU ms/msg engine | workers | server | dead |")
    for r in results:
        c = r["cpu_ms_per_delivered"]
        print(
            f"| {r['run']} ({r['message']}) | {r['entries_per_message']} | {r['requests_per_message']} | "
            f"{r['delivered_per_s']} | {c['engine']} | {c['workers']} | {c['server']} | {r['dead']} |"
        )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
