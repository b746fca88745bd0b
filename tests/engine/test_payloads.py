"""Stored payload form: small plain payloads stay as they are; the rest round-trips through zstd."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from engine import payloads


def test_small_payload_is_stored_plain() -> None:
    assert payloads.pack(b'{"resourceType":"Bundle"}') == b'{"resourceType":"Bundle"}'
    assert payloads.unpack(b'{"resourceType":"Bundle"}') == b'{"resourceType":"Bundle"}'


def test_large_payload_is_compressed_and_restored() -> None:
    bundle = (
        b'{"resourceType":"Bundle","entry":[' + b'{"resource":{"resourceType":"Patient"}},' * 400 + b"{}]}"
    )
    stored = payloads.pack(bundle)
    assert stored.startswith(payloads.MAGIC)
    assert len(stored) < len(bundle) // 4
    assert payloads.unpack(stored) == bundle


def test_plain_payload_that_looks_compressed_is_never_misread() -> None:
    tricky = payloads.MAGIC + b"not a zstd frame"
    stored = payloads.pack(tricky)
    assert stored != tricky
    assert payloads.unpack(stored) == tricky


def test_missing_payload_is_empty() -> None:
    assert payloads.unpack(None) == b""
    assert payloads.unpack(b"") == b""


@given(st.binary(max_size=4096))
def test_round_trip(data: bytes) -> None:
    assert payloads.unpack(payloads.pack(data)) == data
