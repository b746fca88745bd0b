"""Fixtures for end-to-end tests against real peers (the Medplum FHIR server, RabbitMQ).

``fhir_server`` validates writes as Medplum's server does; ``stock_fhir_server`` is Medplum's FhirRouter on
the plain MemoryRepository with the definitions as shipped (see tests/support/fhir_server/server.mjs).
Both resolve searches and conditional writes with Medplum's own code.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.ci import service_unavailable
from tests.support.fhirserver import FhirServer, FhirServerUnavailable


def _serve(stock: bool) -> Iterator[FhirServer]:
    srv = FhirServer(stock=stock)
    try:
        srv.start()
    except FhirServerUnavailable as exc:
        service_unavailable(f"FHIR test server unavailable: {exc}")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def fhir_server() -> Iterator[FhirServer]:
    yield from _serve(stock=False)


@pytest.fixture(scope="module")
def stock_fhir_server() -> Iterator[FhirServer]:
    yield from _serve(stock=True)
