"""Fixtures for the destination tests: the real FHIR test server, helpers to build items."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.destinations.base import CONTENT_FHIR, DestinationContext, Outbound
from tests.support.ci import service_unavailable
from tests.support.fhirserver import FhirServer, FhirServerUnavailable


@pytest.fixture(scope="session")
def fhir_server() -> Iterator[FhirServer]:
    srv = FhirServer()
    try:
        srv.start()
    except FhirServerUnavailable as exc:
        service_unavailable(f"FHIR test server unavailable: {exc}")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def fhir(fhir_server: FhirServer) -> FhirServer:
    """The shared server, emptied for this test."""
    fhir_server.reset()
    return fhir_server


@pytest.fixture
def ctx(tmp_path: Path) -> DestinationContext:
    return DestinationContext(base_dir=tmp_path)


def make_item(
    payload: bytes,
    *,
    message_id: int = 1,
    content_type: str = CONTENT_FHIR,
    control_id: str = "CTRL0001",
    message_type: str = "ADT",
    trigger: str = "A04",
    channel: str = "adt-in",
    destination: str = "dest",
    raw: bytes = b"MSH|^~\\&|SYNTH|FAC|RCV|FAC|20240101120000||ADT^A04|CTRL0001|P|2.5\rPID|1||MRN0001^^^SYNTH^MR||TESTPATIENT^ALPHA\r",
    meta: dict[str, str] | None = None,
    attempt: int = 1,
) -> Outbound:
    return Outbound(
        message_id=message_id,
        channel=channel,
        destination=destination,
        control_id=control_id,
        message_type=message_type,
        trigger=trigger,
        raw=raw,
        payload=payload,
        content_type=content_type,
        attempt=attempt,
        meta=meta or {},
    )
