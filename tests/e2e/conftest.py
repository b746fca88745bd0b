"""Fixtures for end-to-end tests against real peers (the Medplum FHIR server, RabbitMQ)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import service_unavailable
from tests.support.fhirserver import FhirServer, FhirServerUnavailable


@pytest.fixture(scope="module")
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
