"""HL7 v2 parsing cost on one core: Sluice's parser (engine/hl7.py) against python-hl7 and hl7apy, on every
message of the shared corpus and on the load generator's ~1.6 KB ADT^A01.  Writes bench/results/parse.json
(never asserts).

    .venv/bin/python bench/parse_bench.py [--seconds 2] [--corpus ../shared/corpus]

All three parse the same decoded text (decoding by MSH-18 is Sluice's alone).  Figures:

* ``sluice_parse``: ``engine.hl7.parse``, what intake runs per message: segments and fields split, components
  and repetitions split lazily when read;
* ``sluice_parse_all_fields``: the same, then every field split into repetitions, components and
  subcomponents and unescaped (``Rep.subs``): the whole tree, as much work as python-hl7 does and more;
* ``python_hl7_parse``: ``hl7.parse`` (python-hl7), which builds the whole tree eagerly (no unescaping);
* ``hl7apy_parse``: ``hl7apy.parser.parse_message`` (tolerant validation, no group finding: its cheapest).

Each figure runs over the messages all three parsers accept, round after round for ``--seconds``; CPU time
per message (mean and best round) from ``time.process_time``.  The compiled (mypyc) build is measured when
it is the one installed, and the pure-Python one in a subprocess (``SLUICE_PURE_PYTHON=1``) as well.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hl7 as python_hl7  # noqa: E402
from hl7apy import parser as hl7apy_parser  # noqa: E402
from hl7apy.consts import VALIDATION_LEVEL  # noqa: E402

from bench.mllp_load import PREFIX, SUFFIX  # noqa: E402
from conformance.runner import find_files, split_messages  # noqa: E402
from engine import hl7, native  # noqa: E402
from engine.errors import SluiceError  # noqa: E402

DEFAULT_CORPUS = ROOT.parent / "shared" / "corpus"


def parse_all_fields(text: str) -> int:
    """Parse, then split and unescape every field down to subcomponents; returns the leaf count."""
    msg = hl7.parse(text)
    leaves = 0
    for seg in msg:
        for n in range(1, len(seg)):
            for rep in seg.reps(n):
                for i in range(1, len(rep) + 1):
                    leaves += len(rep.subs(i))
    return leaves


def parse_hl7apy(text: str) -> Any:
    return hl7apy_parser.parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)


PARSERS: dict[str, Callable[[str], Any]] = {
    "sluice_parse": hl7.parse,
    "sluice_parse_all_fields": parse_all_fields,
    "python_hl7_parse": python_hl7.parse,
    "hl7apy_parse": parse_hl7apy,
}


def corpus_texts(corpus: Path) -> tuple[list[str], dict[str, int]]:
    """Every corpus message, decoded as Sluice decodes it, that all the parsers accept; and the counts."""
    files, _ = find_files(corpus)
    texts: list[str] = []
    counts = {"files": len(files), "messages": 0, "sluice_refused": 0}
    refused = dict.fromkeys(PARSERS, 0)
    for path in files:
        for raw in split_messages(path.read_bytes()):
            counts["messages"] += 1
            try:
                text = hl7.parse_bytes(raw).text
            except SluiceError:
                counts["sluice_refused"] += 1
                continue
            ok = True
            for name, fn in PARSERS.items():
                try:
                    fn(text)
                except Exception:
                    refused[name] += 1
                    ok = False
            if ok:
                texts.append(text)
    counts.update({f"{name}_refused": n for name, n in refused.items()})
    counts["measured"] = len(texts)
    return texts, counts


def measure(fn: Callable[[str], Any], texts: list[str], seconds: float) -> dict[str, float]:
    for t in texts[:20]:
        fn(t)  # warm up
    n = 0
    rounds: list[float] = []
    c0 = time.process_time()
    deadline = time.perf_counter() + seconds
    while True:
        b0 = time.process_time()
        for t in texts:
            fn(t)
        n += len(texts)
        rounds.append((time.process_time() - b0) / len(texts) * 1e6)
        if time.perf_counter() >= deadline:
            break
    cpu = time.process_time() - c0
    return {
        "parses": n,
        "cpu_us_per_message": round(cpu / n * 1e6, 1),
        "best_round_cpu_us_per_message": round(min(rounds), 1),
    }


def measure_build(corpus: Path, seconds: float) -> dict[str, Any]:
    texts, counts = corpus_texts(corpus)
    adt = [(PREFIX + b"BENCH00000001" + SUFFIX).decode()]
    sets = {
        "corpus": (texts, counts),
        "adt_a01_1.6kb": (adt, {"measured": 1}),
    }
    out: dict[str, Any] = {"build": native.REASON}
    for label, (msgs, info) in sets.items():
        figures: dict[str, Any] = {
            "messages": info,
            "mean_message_bytes": round(sum(len(t.encode()) for t in msgs) / max(1, len(msgs))),
        }
        for name, fn in PARSERS.items():
            figures[name] = measure(fn, msgs, seconds)
        base = figures["sluice_parse"]["cpu_us_per_message"]
        for name in PARSERS:
            figures[name]["relative_to_sluice_parse"] = round(figures[name]["cpu_us_per_message"] / base, 1)
        out[label] = figures
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0, help="per figure")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--this-build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.corpus.is_dir():
        sys.exit(f"error: no corpus at {args.corpus}; pass --corpus DIR (e.g. ../shared/corpus)")
    if args.this_build_only:
        print(json.dumps(measure_build(args.corpus, args.seconds)))
        return
    results: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "corpus": str(args.corpus),
        "note": "CPU time per message on one core (time.process_time; the machine may be shared); the same "
        "decoded text for all parsers; corpus figures over the messages every parser accepts",
        "builds": {},
    }
    label = "compiled" if native.COMPILED else "pure"
    results["builds"][label] = measure_build(args.corpus, args.seconds)
    if native.COMPILED:
        env = dict(os.environ, SLUICE_PURE_PYTHON="1")
        cmd = [sys.executable, __file__, "--this-build-only", "--seconds", str(args.seconds)]
        proc = subprocess.run(
            [*cmd, "--corpus", str(args.corpus)], env=env, capture_output=True, text=True, check=True
        )
        results["builds"]["pure"] = json.loads(proc.stdout)
    out = ROOT / "bench" / "results" / "parse.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for build, figs in results["builds"].items():
        for label in ("corpus", "adt_a01_1.6kb"):
            f = figs[label]
            print(f"{build} {label}: {f['messages']['measured']} messages, {f['mean_message_bytes']} B mean")
            for name in PARSERS:
                r = f[name]
                print(
                    f"  {name:24} {r['cpu_us_per_message']:9.1f} µs CPU mean, "
                    f"{r['best_round_cpu_us_per_message']:9.1f} best round, x{r['relative_to_sluice_parse']}"
                )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
