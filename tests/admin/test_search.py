"""The patient hash of the admin search (engine/admin/search.py): pure, no store."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from engine.admin.search import patient_hash


@pytest.mark.parametrize("key_length", [0, 1, 32, 64, 65, 200])
def test_patient_hash_is_hmac_sha256_of_the_identifier(key_length: int) -> None:
    """Stored hashes and searches must agree across versions: the value is HMAC-SHA256 (RFC 2104) of the
    stripped identifier under the installation key, first 32 hex digits, for any key length (a key longer
    than SHA-256's block is hashed first)."""
    key = bytes(range(256))[:key_length]
    for identifier in ("MRN1", "  12345 ", "NÚÑEZ-7", "a" * 300, "\udcff"):
        value = identifier.strip().encode("utf-8", "surrogateescape")
        assert patient_hash(key, identifier) == hmac.new(key, value, hashlib.sha256).hexdigest()[:32]


def test_blank_identifier_has_no_hash() -> None:
    assert patient_hash(b"k" * 32, "") == ""
    assert patient_hash(b"k" * 32, "   ") == ""
