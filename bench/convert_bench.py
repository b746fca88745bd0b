"""Conversions per second on one core: the ~1.6 KB ADT^A01 of the load generator and a ~3 KB ORU^R01 with
15 OBX, with and without per-message FHIR validation, for the compiled (mypyc) and the pure-Python build.
Writes bench/results/convert.json (never asserts).

    .venv/bin/python bench/convert_bench.py [--seconds 3]

Each figure converts a stream of 1,000 *distinct* messages (patient, visit or order number and control id
differ), so per-message work is not flattered by a message seen a moment ago; what recurs in a real feed
(the sending facility, practitioners, locations) recurs here too.  One conversion = parse + convert +
orjson.dumps of the bundle.  The pure build runs in a subprocess with SLUICE_PURE_PYTHON=1.  The
garbage collector is set as in the engine's worker processes (engine/collector.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from bench.mllp_load import PREFIX, SUFFIX, suffixes  # noqa: E402
from engine import collector, native  # noqa: E402
from engine.hl7 import parse  # noqa: E402
from transforms.convert import convert_report  # noqa: E402
from transforms.settings import ConvertSettings  # noqa: E402

SYSTEMS = {
    "BENCH_HOSP": "urn:oid:2.16.840.1.113883.19.4",
    "HOSP": "urn:oid:2.16.840.1.113883.19.5",
    "VISITS": "urn:oid:2.16.840.1.113883.19.6",
    "GOODHOSP": "urn:oid:2.16.840.1.113883.19.7",
    "USSSA": "http://hl7.org/fhir/sid/us-ssn",
}
STREAM = 1000


def adt_messages(n: int = STREAM) -> list[str]:
    """The load generator's synthetic ADT^A01 (bench/mllp_load.py), ``n`` patients, one control id each."""
    return [(PREFIX + b"BENCH%08d" % i + tail).decode() for i, tail in enumerate(suffixes(n, SUFFIX))]


def oru_message(n: int = 0) -> str:
    """A synthetic ~3 KB ORU^R01: one OBR with 15 NM OBX (performing lab, its address and director on
    each, as CLIA labs send them) plus an NTE.  ``n`` varies the patient, the order numbers and MSH-10."""
    segs = [
        f"MSH|^~\\&|SYNTH-LAB|GOODHOSP|SLUICE|SLUICE|20250315143000||ORU^R01^ORU_R01|LAB-{n:06d}|P|2.5.1",
        f"PID|1||MRN{n:08d}^^^HOSP^MR||TESTPATIENT^ALEX^Q||19800229|F|||101 SAMPLE ST^^SPRINGFIELD^OR^97401^USA",
        f"PV1|1|O|CLINIC1^^^GOODHOSP||||1234567890^PRACTICE^PAT^^^DR^^^NPI^L^^^NPI|||||||||||V{n:08d}^^^VISITS^VN",
        f"ORC|RE|PL-{n}^SYNTH-EHR|FL-{n}^LAB||CM",
        f"OBR|1|PL-{n}^SYNTH-EHR|FL-{n}^LAB|24323-8^Comprehensive metabolic panel^LN|||20250315080000|||||||"
        "20250315081000||1234567890^PRACTICE^PAT^^^DR^^^NPI^L^^^NPI||||||20250315120000|||F",
    ]
    tests = [
        ("2345-7", "Glucose", "mg/dL", "70-99", "95"),
        ("2951-2", "Sodium", "mmol/L", "135-145", "140"),
        ("2823-3", "Potassium", "mmol/L", "3.5-5.1", "4.2"),
        ("2075-0", "Chloride", "mmol/L", "98-107", "101"),
        ("2028-9", "CO2", "mmol/L", "22-29", "25"),
        ("3094-0", "BUN", "mg/dL", "7-20", "14"),
        ("2160-0", "Creatinine", "mg/dL", "0.6-1.2", "0.9"),
        ("17861-6", "Calcium", "mg/dL", "8.6-10.3", "9.4"),
        ("2885-2", "Protein", "g/dL", "6.0-8.3", "7.1"),
        ("1751-7", "Albumin", "g/dL", "3.5-5.0", "4.4"),
        ("1975-2", "Bilirubin", "mg/dL", "0.1-1.2", "0.6"),
        ("6768-6", "ALP", "U/L", "44-147", "88"),
        ("1742-6", "ALT", "U/L", "7-56", "23"),
        ("1920-8", "AST", "U/L", "10-40", "21"),
        ("33914-3", "eGFR", "mL/min/{1.73_m2}", ">60", "92"),
    ]
    for i, (code, name, unit, rng, val) in enumerate(tests, 1):
        segs.append(
            f"OBX|{i}|NM|{code}^{name}^LN||{val}|{unit}^^UCUM|{rng}|N|||F|||20250315110000|||"
            "|||||GOODHOSP LAB^^^^^GOODHOSP|100 LAB WAY^^SPRINGFIELD^OR^97401|2222222222^DIRECTOR^DANA^^^DR^^^NPI"
        )
    segs.append("NTE|1|L|Specimen received in good condition.\\.br\\Reviewed by the lab.")
    return "\r".join(segs) + "\r"


def measure(texts: list[str], settings: ConvertSettings, seconds: float) -> dict[str, Any]:
    """Convert the stream round after round for ``seconds``; CPU per message, mean and best round."""
    for t in texts[:20]:
        convert_report(parse(t), settings)  # warm up / fail early
    n = 0
    rounds: list[float] = []
    t0 = time.perf_counter()
    c0 = time.process_time()
    deadline = t0 + seconds
    while True:
        b0 = time.process_time()
        for t in texts:  # one round = the whole stream
            orjson.dumps(convert_report(parse(t), settings).bundle)
        n += len(texts)
        rounds.append((time.process_time() - b0) / len(texts) * 1e6)
        if time.perf_counter() >= deadline:
            break
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return {
        "conversions": n,
        "distinct_messages": len(texts),
        "seconds": round(dt, 3),
        "per_second": round(n / dt, 1),
        "cpu_us_per_message": round(cpu / n * 1e6, 1),
        "cpu_per_second": round(n / cpu, 1) if cpu else None,
        "best_round_cpu_us_per_message": round(min(rounds), 1),
        "message_bytes": len(texts[0].encode()),
        "entries": len(convert_report(parse(texts[0]), settings).bundle["entry"]),
    }


def measure_build(seconds: float, validation: bool) -> dict[str, Any]:
    plain = ConvertSettings(identifier_systems=SYSTEMS)
    adt = adt_messages()
    oru = [oru_message(i) for i in range(STREAM)]
    collector.tune()  # as the worker processes that convert in the engine
    out: dict[str, Any] = {
        "build": native.REASON,
        "adt_a01": {"no_validation": measure(adt, plain, seconds)},
        "oru_r01_15obx": {"no_validation": measure(oru, plain, seconds)},
    }
    if validation:  # fhir.resources dominates: measured once, on a short stream
        validating = ConvertSettings(identifier_systems=SYSTEMS, validate=True)
        out["adt_a01"]["with_validation"] = measure(adt[:100], validating, seconds)
        out["oru_r01_15obx"]["with_validation"] = measure(oru[:100], validating, seconds)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0, help="per figure")
    ap.add_argument("--this-build-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-pure", action="store_true", help="skip the pure-Python build")
    args = ap.parse_args()
    if args.this_build_only:
        print(json.dumps(measure_build(args.seconds, validation=False)))
        return
    results: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "note": "parse + convert + orjson.dumps per message, one core, Provenance included; a stream of 1,000 "
        "distinct messages per figure; garbage collector set as in the worker processes (engine/collector.py); "
        "cpu_* from time.process_time (the machine may be shared)",
        "builds": {},
    }
    label = "compiled" if native.COMPILED else "pure"
    results["builds"][label] = measure_build(args.seconds, validation=True)
    if native.COMPILED and not args.no_pure:
        env = dict(os.environ, SLUICE_PURE_PYTHON="1")
        proc = subprocess.run(
            [sys.executable, __file__, "--this-build-only", "--seconds", str(args.seconds)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        results["builds"]["pure"] = json.loads(proc.stdout)
    out = ROOT / "bench" / "results" / "convert.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for build, figs in results["builds"].items():
        for msg in ("adt_a01", "oru_r01_15obx"):
            for mode, r in figs[msg].items():
                print(
                    f"{build:8} {msg:14} {mode:15} {r['message_bytes']:5} B {r['entries']:2} entries: "
                    f"{r['cpu_us_per_message']:7.1f} µs CPU mean, {r['best_round_cpu_us_per_message']:7.1f} best "
                    f"round ({r['cpu_per_second']:,.0f}/s)"
                )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
