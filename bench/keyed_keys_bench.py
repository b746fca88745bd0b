"""Cost of storing order keys as keyed hashes (issue #12), in instructions (valgrind callgrind: they do not
move with the machine's load):

* ``keyed``: one ``engine.store.keyed`` call (the hash of one order key, what intake adds per message of a
  channel with ``order_by``), against HMAC-SHA256 of the same value (``hmac``), per call.
* ``--base PATH`` (and ``--this PATH``): the engine process's intake path (checks, durable commit, ACK) per message for a channel
  with ``order_by: PID-3.1``, this checkout against another (a checkout from before the change); pure-Python
  modules on both sides.  The committer's group commits vary with thread timing, so this figure moves by
  a percent or two run to run: the ``keyed`` figure is the precise one.

    python bench/keyed_keys_bench.py [--base /tmp/base-checkout]

Figures go to bench/results/keyed_keys.json (written after each measurement).  Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results" / "keyed_keys.json"


def hash_loop(mode: str, n: int) -> None:
    """``n`` order keys hashed (``keyed``, ``hmac``) or only formatted (``none``: the loop's own cost)."""
    import hashlib
    import hmac

    from engine.store import ORDER_TAG, keyed

    key = bytes(32)
    for i in range(n):
        value = f"MRN{i:08d}"
        if mode == "keyed":
            keyed(key, ORDER_TAG, value)
        elif mode == "hmac":
            hmac.new(key, ORDER_TAG + value.encode(), hashlib.sha256).hexdigest()


def intake_loop(n: int) -> None:
    """``n`` messages through Intake.handle and the committer, the channel ordered by PID-3.1."""
    from encryption_bench import intake_loop as loop

    loop(False, n, order_by="PID-3.1")


def per_item(args: list[str], small: int, large: int, src: Path = ROOT) -> float:
    """Instructions per item: (Ir(large) - Ir(small)) / (large - small) cancels the interpreter's start."""
    from encryption_bench import callgrind_instructions

    env = {**os.environ, "SLUICE_PURE_PYTHON": "1", "PYTHONPATH": str(src)}
    me = str(Path(__file__).resolve())
    ir = [callgrind_instructions([me, *args, str(n)], cwd=src, env=env) for n in (small, large)]
    return (ir[1] - ir[0]) / (large - small)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, help="a checkout from before the change: also the intake A/B")
    ap.add_argument(
        "--this", type=Path, default=ROOT, help="the checkout with the change (default: this one)"
    )
    ap.add_argument("--hash-loop", nargs=2, help=argparse.SUPPRESS)  # MODE N, run under callgrind
    ap.add_argument("--intake-loop", type=int, help=argparse.SUPPRESS)  # N, run under callgrind
    args = ap.parse_args()
    if args.hash_loop:
        hash_loop(args.hash_loop[0], int(args.hash_loop[1]))
        return
    if args.intake_loop:
        intake_loop(args.intake_loop)
        return
    out: dict[str, Any] = {"unit": "instructions (valgrind callgrind)"}

    def save() -> None:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(out, indent=2) + "\n")

    loop = {m: per_item(["--hash-loop", m], 1000, 11000) for m in ("none", "keyed", "hmac")}
    out["per_order_key"] = {
        "keyed_blake2b": round(loop["keyed"] - loop["none"]),
        "hmac_sha256": round(loop["hmac"] - loop["none"]),
    }
    print(json.dumps(out["per_order_key"]), flush=True)
    save()
    if args.base:
        out["intake_per_message"] = {"order_by": "PID-3.1", "messages": [300, 1300], "alternated": True}
        base, this = args.base.resolve(), args.this.resolve()
        for name, src in (("base", base), ("this", this), ("base", base), ("this", this)):
            per = per_item(["--intake-loop"], 300, 1300, src)
            out["intake_per_message"].setdefault(name, []).append(round(per))
            print(f"intake path, {name}: {per:,.0f} instructions per message", flush=True)
            save()


if __name__ == "__main__":
    main()
