"""Keyed hashes: the stored form of keys that would name a patient in clear.

Order keys, resource-state keys and a fhir-poll channel's ``Type/id`` are stored as ``k:`` + 32 hex digits
of keyed BLAKE2b under the installation key (:meth:`engine.store.Store.installation_key`).  Pure: the key
is passed in; the store reads it once.
"""

from __future__ import annotations

import hashlib
from typing import Any

# Keys that would name a patient in clear (a channel's order_by value such as PID-3.1, FHIR conditional-write
# keys such as ``Patient?identifier=system|value``) are stored as keyed hashes: ``k:`` + 32 hex digits of
# keyed BLAKE2b (a MAC) under the installation's key (the one the patient search uses), so every node and
# every restart hashes alike and equality (ordering lanes, status guards) works as before.
PATIENT_KEY_SETTING = "patient_hmac_key"
KEYED_PREFIX = "k:"
_KEYED_LEN = len(KEYED_PREFIX) + 32
_HEX = frozenset("0123456789abcdef")
ORDER_TAG = b"order\0"
STATE_TAG = b"resource_state\0"
SOURCE_RESOURCE_TAG = b"source_resource\0"


_HASHERS: dict[tuple[bytes, bytes], Any] = {}  # (installation key, tag) -> keyed BLAKE2b state


def keyed(key: bytes, tag: bytes, value: str) -> str:
    """The stored form of ``value``: a keyed hash (``""`` stays ``""``, a keyed hash stays as it is)."""
    if not value or is_keyed(value):
        return value
    base = _HASHERS.get((key, tag))
    if base is None:
        if len(_HASHERS) >= 64:
            _HASHERS.clear()
        base = _HASHERS[(key, tag)] = hashlib.blake2b(tag, key=key, digest_size=16)
    h = base.copy()  # the keyed state, made once: ~5k instructions a key (HMAC-SHA256: ~18-25k)
    h.update(value.encode("utf-8", "surrogateescape"))
    return KEYED_PREFIX + h.hexdigest()


def is_keyed(value: str) -> bool:
    return len(value) == _KEYED_LEN and value.startswith(KEYED_PREFIX) and _HEX.issuperset(value[2:])
