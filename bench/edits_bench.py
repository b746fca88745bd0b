"""What the fhir-edits step (transforms/edits.py) costs on the conversion path.  Writes bench/results/edits.json
(never asserts).

    .venv/bin/python bench/edits_bench.py [--seconds 3]

Two channels' pipelines, built as a worker builds them (``engine.stages.build_pipeline``), on the same stream
of 1,000 distinct messages: ``hl7-to-fhir`` alone, and ``hl7-to-fhir`` followed by ``fhir-edits``.  Per
message: parse + convert + orjson of the Bundle (what a worker does), then the edits step (orjson.loads of the
Bundle, the selectors on every resource, orjson.dumps when something changed).  Rounds alternate between the
two pipelines (A/B/A/B...) so machine load hits both alike; CPU time per message (``time.process_time``),
mean of the rounds and best round.  Messages: the load generator's ~1.6 KB ADT^A01 with two edits (a Patient
telecom removed, a display set), and the ~2.6 KB MDM^T02 discharge summary (HTML) with the seed's edit
(strip HTML, truncate at 2,000 characters).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.convert_bench import SYSTEMS, adt_messages  # noqa: E402
from engine import collector, native  # noqa: E402
from engine.hl7 import parse  # noqa: E402
from engine.pipeline import Pipeline, StageContext, Work  # noqa: E402
from engine.stages import build_pipeline  # noqa: E402

MDM = (ROOT / "tests" / "transforms" / "messages" / "mdm_t02.hl7").read_text()
HTML = "<p>Patient admitted with <b>synthetic</b> complaint.</p><br>" * 40

ADT_EDITS = [
    {"select": "Patient.telecom.where(system = 'email')", "remove": True},
    {"select": "Encounter.location.location.display", "set": "Ward"},
]
MDM_EDITS = [
    {
        "select": "DocumentReference.where(type.coding.code = 'DS').content.attachment.data",
        "strip-html": True,
        "truncate": 2000,
    }
]


def mdm_messages(n: int = 1000) -> list[str]:
    base = MDM.replace("Patient admitted with synthetic complaint.", HTML)
    return [base.replace("MDM0001", f"MDM{i:06d}").replace("MRN900001", f"MRN{i:06d}") for i in range(n)]


def pipelines(edits: list[dict[str, Any]]) -> tuple[Pipeline, Pipeline]:
    ctx = StageContext(channel="bench", base_dir=ROOT, config_file="bench")
    convert = {
        "hl7-to-fhir": {"identifier_systems": SYSTEMS, "derive_unknown_systems": True, "strip_html": False}
    }
    plain = build_pipeline(None, (convert,), ctx)
    edited = build_pipeline(None, (convert, {"fhir-edits": {"edits": edits}}), ctx)
    return plain, edited


def one_round(pipe: Pipeline, texts: list[str]) -> float:
    t0 = time.process_time()
    for text in texts:
        msg = parse(text)
        pipe.run(Work(message=msg, raw=b"", payload=b"", content_type="x-application/hl7-v2+er7"))
    return (time.process_time() - t0) / len(texts)


def measure(texts: list[str], edits: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    plain, edited = pipelines(edits)
    one_round(plain, texts[:50])  # warm caches
    one_round(edited, texts[:50])
    a: list[float] = []
    b: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or len(a) < 3:
        a.append(one_round(plain, texts))
        b.append(one_round(edited, texts))
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    return {
        "rounds": len(a),
        "convert_us_per_message": round(mean_a * 1e6, 1),
        "convert_plus_edits_us_per_message": round(mean_b * 1e6, 1),
        "edits_us_per_message": round((mean_b - mean_a) * 1e6, 1),
        "edits_share_of_conversion": round((mean_b - mean_a) / mean_a, 3),
        "best_round_convert_us": round(min(a) * 1e6, 1),
        "best_round_convert_plus_edits_us": round(min(b) * 1e6, 1),
        "edits": edits,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0, help="per message kind")
    args = ap.parse_args()
    collector.tune()  # as in the worker processes
    results = {
        "what": "CPU time per message of hl7-to-fhir alone vs hl7-to-fhir + fhir-edits (A/B rounds alternated)",
        "build": "compiled (mypyc)" if native.COMPILED else "pure Python",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "adt_a01": measure(adt_messages(), ADT_EDITS, args.seconds),
        "mdm_t02_discharge_summary": measure(mdm_messages(), MDM_EDITS, args.seconds),
    }
    out = ROOT / "bench" / "results" / "edits.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    for kind in ("adt_a01", "mdm_t02_discharge_summary"):
        r = results[kind]
        print(
            f"{kind}: convert {r['convert_us_per_message']} µs, + edits {r['convert_plus_edits_us_per_message']} µs "
            f"(edits {r['edits_us_per_message']} µs, {r['edits_share_of_conversion']:.1%})"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
