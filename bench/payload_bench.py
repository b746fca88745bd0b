"""Stored payload form: size and CPU of zstd (what engine/payloads.py uses) against zlib and plain.

Converts the load generator's ADT^A01 (and the 15-OBX ORU^R01 of convert_bench.py) to FHIR bundles and
times compress/decompress per bundle on one core.  Writes bench/results/payload.json (never asserts).

    .venv/bin/python bench/payload_bench.py
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import zstandard  # noqa: E402

from bench.convert_bench import oru_message  # noqa: E402
from bench.mllp_load import PREFIX, SUFFIX  # noqa: E402
from engine import payloads  # noqa: E402
from engine.hl7 import parse  # noqa: E402
from transforms.convert import convert  # noqa: E402
from transforms.settings import ConvertSettings  # noqa: E402


def _best_us(fn: Callable[[], object], loops: int = 500, rounds: int = 7) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.process_time()
        for _ in range(loops):
            fn()
        best = min(best, (time.process_time() - t) / loops * 1e6)
    return round(best, 2)


def measure(data: bytes) -> dict[str, Any]:
    zc, zd = zstandard.ZstdCompressor(level=1), zstandard.ZstdDecompressor()
    out: dict[str, Any] = {"plain_bytes": len(data)}
    for name, pack, unpack in (
        ("zstd-1 (engine.payloads)", payloads.pack, payloads.unpack),
        ("zstd-1 raw", zc.compress, zd.decompress),
        ("zlib-1", lambda b: zlib.compress(b, 1), zlib.decompress),
    ):
        stored = pack(data)
        assert unpack(stored) == data
        out[name] = {
            "bytes": len(stored),
            "ratio": round(len(data) / len(stored), 2),
            "pack_us": _best_us(lambda p=pack: p(data)),  # type: ignore[misc]
            "unpack_us": _best_us(lambda u=unpack, s=stored: u(s)),  # type: ignore[misc]
        }
    return out


def main() -> int:
    settings = dataclasses.replace(ConvertSettings(), derive_unknown_systems=True)
    adt = (PREFIX + b"BENCH0000000000001" + SUFFIX).decode()
    report = {
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "adt_a01_bundle": measure(orjson.dumps(convert(parse(adt), settings))),
        "oru_r01_15obx_bundle": measure(orjson.dumps(convert(parse(oru_message()), settings))),
    }
    out = ROOT / "bench" / "results" / "payload.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
