"""Stored form of destination payloads: zstd-compressed when that pays.

A channel's output (a FHIR bundle is ~10x the HL7 it came from) is stored once per route
so that retries and replays send exactly what was decided.  Stored plain, those bytes
dominate the store's disk writes and its size on disk; zstd at level 1 shrinks a FHIR
bundle about 4.5x for ~10 µs each way (``bench/payload_bench.py``).

The rule that keeps the two forms apart without a schema column: a stored payload that
starts with the zstd frame magic is a zstd frame.  A payload is stored plain only when it
is small *and* does not start with that magic; everything else is compressed.  Workers
pack in their own processes (:func:`pack`), so the engine process only unpacks at
delivery time.
"""

from __future__ import annotations

import threading

import zstandard

MAGIC = b"\x28\xb5\x2f\xfd"  # zstd frame magic number (RFC 8878)
MIN_SIZE = 512  # below this a plain payload is stored as it is
LEVEL = 1

_local = threading.local()


def _codecs() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    # zstd contexts are reusable (much cheaper than one per call) but not thread-safe.
    c = getattr(_local, "codecs", None)
    if c is None:
        c = _local.codecs = (zstandard.ZstdCompressor(level=LEVEL), zstandard.ZstdDecompressor())
    return c


def pack(data: bytes) -> bytes:
    """The stored form of ``data`` (see the module docstring for the rule)."""
    if len(data) < MIN_SIZE and not data.startswith(MAGIC):
        return data
    return _codecs()[0].compress(data)


def unpack(stored: bytes | None) -> bytes:
    """The payload a stored value stands for (``b""`` for none)."""
    if not stored:
        return b""
    if stored[:4] == MAGIC:
        return _codecs()[1].decompress(stored)
    return bytes(stored)
