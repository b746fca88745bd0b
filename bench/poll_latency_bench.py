"""Poll-to-EHR latency: an Appointment created in the FHIR server → its SIU S12 at the EHR.

The real engine (``sluice run``) polls the Medplum FHIR test server (``kind: fhir-poll``, ``--interval``
seconds) and sends SIU over MLLP to a test EHR (tests/support/ehr.py).  Appointments are created one at a
time, ``--gap`` seconds apart; for each, the time from the server's answer to the create until the EHR
has the S12.  Expect about interval/2 on average plus the engine's own time (store, process, deliver).

    python bench/poll_latency_bench.py --count 30 --interval 1

Figures go to bench/results/poll_latency.json.  Nothing here is a test.  Needs node/npm (the FHIR server).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.ehr import EhrReceiver  # noqa: E402
from tests.support.engine import EngineProcess, free_port, write_config  # noqa: E402
from tests.support.fhirserver import FhirServer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
os.environ.setdefault("SLUICE_ADMIN_PORT", "0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=30)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--gap", type=float, default=0.37)
    ap.add_argument("--json", type=Path, default=RESULTS / "poll_latency.json")
    args = ap.parse_args()
    lat: list[float] = []
    with (
        FhirServer() as fhir,
        EhrReceiver() as ehr,
        tempfile.TemporaryDirectory(prefix="sluice-pollbench-") as tmp,
    ):
        admin = free_port()
        routes = write_config(
            Path(tmp),
            channels={
                "portal": {
                    "source": {
                        "kind": "fhir-poll",
                        "base_url": fhir.base_url,
                        "resources": ["Appointment"],
                        "interval": args.interval,
                    },
                    "transform": [{"fhir-to-hl7": {"placer_system": "urn:portal:appointment"}}],
                    "routes": [{"destination": "ehr"}],
                }
            },
            destinations={
                "ehr": {"kind": "mllp", "host": "127.0.0.1", "port": ehr.port, "payload": "output"}
            },
        )
        with EngineProcess(routes, admin, env={"SLUICE_ADMIN_PORT": str(admin)}):
            for i in range(args.count):
                res: dict[str, Any] = {
                    "resourceType": "Appointment",
                    "identifier": [{"system": "urn:portal:appointment", "value": f"PL-{i}"}],
                    "status": "booked",
                    "start": "2026-12-10T17:00:00Z",
                    "end": "2026-12-10T17:30:00Z",
                    "participant": [{"actor": {"reference": "Patient/p1"}, "status": "accepted"}],
                }
                fhir.request("POST", "/Appointment", res)
                t0 = time.perf_counter()
                while len(ehr.received()) <= i:
                    if time.perf_counter() - t0 > 60:
                        raise SystemExit(f"appointment {i} never reached the EHR")
                    time.sleep(0.005)
                lat.append(time.perf_counter() - t0)
                time.sleep(args.gap)
    lat_sorted = sorted(lat)
    out = {
        "what": "fhir-poll (Medplum) → fhir-to-hl7 → mllp → test EHR: create answered → S12 at the EHR",
        "interval_s": args.interval,
        "count": len(lat),
        "mean_ms": round(sum(lat) / len(lat) * 1000, 1),
        "p50_ms": round(lat_sorted[len(lat) // 2] * 1000, 1),
        "max_ms": round(lat_sorted[-1] * 1000, 1),
        "loadavg_1m": os.getloadavg()[0],
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
