"""transforms.bundle: the deterministic ids every entry's fullUrl and Sluice key are made of."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from transforms.bundle import NAMESPACE, det_uuid, uuid5


@given(st.text())
def test_uuid5_is_rfc4122_uuid5_in_the_sluice_namespace(text: str) -> None:
    # the fast formatting must never drift from the standard one: ids are fixed forever (idempotent writes)
    assert uuid5(text) == str(uuid.uuid5(NAMESPACE, text)) == det_uuid(text)


def test_uuid5_known_value() -> None:
    assert uuid5("Patient?identifier=urn:oid:1.2.3|12345") == str(
        uuid.uuid5(
            uuid.UUID("5e1c0b7a-3f4d-5b6e-8a9c-0d1e2f3a4b5c"), "Patient?identifier=urn:oid:1.2.3|12345"
        )
    )
