"""A 2xx batch/transaction response in which an entry failed: never counted as delivered.

Medplum answers a *transaction* with one bad entry by failing the whole transaction (a 4xx; see
tests/e2e/test_fhir_faults.py), but a *batch* applies its entries independently and answers HTTP 200 with a
failed entry's status and OperationOutcome inside the batch-response.  The first two tests get that response
from the real server; the last one is a unit test of the response parser on an invented transaction-response
(the ``"422 Unprocessable Entity"`` status-with-reason form other servers use), with no server at all.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest

from engine.destinations.base import DestinationContext
from engine.destinations.fhir import FhirDestination
from engine.errors import PermanentDeliveryError
from tests.destinations.conftest import make_item
from tests.support.fhirserver import FhirServer

MRN = {"system": "urn:oid:2.16.840.1.113883.3.999.1", "value": "SYN0100"}  # synthetic
VISIT = {"system": "urn:synth:visit", "value": "V0100"}
CLASS = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}


def batch(encounter_extra: dict[str, Any] | None = None) -> bytes:
    """Two independent conditional updates (a batch's entries cannot reference each other)."""
    return orjson.dumps(
        {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [
                {
                    "resource": {
                        "resourceType": "Patient",
                        "identifier": [MRN],
                        "name": [{"family": "Batchcase"}],
                    },
                    "request": {"method": "PUT", "url": f"Patient?identifier={MRN['system']}|{MRN['value']}"},
                },
                {
                    "resource": {
                        "resourceType": "Encounter",
                        "status": "finished",
                        "class": CLASS,
                        "identifier": [VISIT],
                        **(encounter_extra or {}),
                    },
                    "request": {
                        "method": "PUT",
                        "url": f"Encounter?identifier={VISIT['system']}|{VISIT['value']}",
                    },
                },
            ],
        }
    )


def deliver(d: FhirDestination, payload: bytes) -> str:
    async def go() -> str:
        await d.start()
        try:
            return await d.deliver(make_item(payload))
        finally:
            await d.close()

    return asyncio.run(go())


@pytest.mark.fhirserver
def test_real_batch_response_with_an_ambiguous_entry(fhir: FhirServer, ctx: DestinationContext) -> None:
    """The server holds two Encounters with the visit number: Medplum answers 200 with that entry 400."""
    dup = [
        fhir.request(
            "POST",
            "/Encounter",
            {"resourceType": "Encounter", "status": "planned", "class": CLASS, "identifier": [VISIT]},
        )["id"]
        for _ in range(2)
    ]
    d = FhirDestination("ehr", {"base_url": fhir.base_url, "mode": "batch"}, ctx)
    with pytest.raises(PermanentDeliveryError) as info:
        deliver(d, batch())
    msg = info.value.message
    assert msg.startswith("ehr batch: 1 entry failed: ehr batch entry 1 (Encounter): HTTP 400"), msg
    assert "matched multiple resources" in msg and "(at Bundle.entry[1].request.url)" in msg, msg
    # a batch is not atomic: the Patient entry was applied, the Encounters are untouched
    assert len(fhir.search("Patient")) == 1
    assert sorted(e["id"] for e in fhir.search("Encounter")) == sorted(dup)
    assert all(e["status"] == "planned" for e in fhir.search("Encounter"))

    fhir.request("DELETE", f"/Encounter/{dup[1]}")  # fixed on the server: the retry goes through
    assert deliver(d, batch()).startswith("batch HTTP 200: 2 entries (2x200)")
    (enc,) = fhir.search("Encounter")
    assert enc["id"] == dup[0] and enc["status"] == "finished"
    assert len(fhir.search("Patient")) == 1


@pytest.mark.fhirserver
def test_real_batch_response_with_an_invalid_entry(fhir: FhirServer, ctx: DestinationContext) -> None:
    """An Encounter the server's validation rejects: 200, that entry 400 with the validator's issue."""
    d = FhirDestination("ehr", {"base_url": fhir.base_url, "mode": "batch"}, ctx)
    with pytest.raises(PermanentDeliveryError) as info:
        deliver(d, batch({"statusReason": "not an Encounter field"}))
    msg = info.value.message
    assert "ehr batch entry 1 (Encounter): HTTP 400" in msg, msg
    assert 'Invalid additional property "statusReason"' in msg and "Encounter.statusReason" in msg, msg
    assert len(fhir.search("Patient")) == 1 and fhir.search("Encounter") == []


def test_invented_transaction_response_with_a_failed_entry_unit(ctx: DestinationContext) -> None:
    """Unit test of the parser, no server: an HTTP 200 transaction-response whose second entry says
    ``422 Unprocessable Entity`` with an OperationOutcome is a permanent failure naming that entry."""
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "error", "code": "value", "diagnostics": "Synthetic check: unknown location 4N"}
        ],
    }
    reply = {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [
            {"response": {"status": "201 Created", "location": "Patient/p1/_history/1"}},
            {"response": {"status": "422 Unprocessable Entity", "outcome": outcome}},
        ],
    }
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json=reply, headers={"content-type": "application/fhir+json"})

    d = FhirDestination("ehr", {"base_url": "http://127.0.0.1:9/fhir"}, ctx)
    d.client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    transaction = orjson.loads(batch())
    transaction["type"] = "transaction"
    with pytest.raises(PermanentDeliveryError) as info:
        deliver(d, orjson.dumps(transaction))
    msg = info.value.message
    assert "ehr transaction entry 1 (Encounter): HTTP 422" in msg, msg
    assert "Synthetic check: unknown location 4N" in msg, msg
    assert len(sent) == 1 and orjson.loads(sent[0].content)["type"] == "transaction"


def test_a_transaction_refused_for_its_size_names_the_setting_that_delivers_it() -> None:
    from engine.destinations.fhir import too_large_hint
    from engine.errors import PermanentDeliveryError

    medplum = "fhir transaction: HTTP 400 (rejected): Transaction requires strict isolation but has too many entries"
    err = too_large_hint(PermanentDeliveryError(medplum), 18)
    assert str(err).startswith(medplum)
    assert "18 entries" in str(err) and "max_transaction_entries" in str(err)
    assert not err.retryable
    other = PermanentDeliveryError("fhir transaction: HTTP 400 (rejected): Patient.gender: invalid code")
    assert str(too_large_hint(other, 18)) == str(other)
