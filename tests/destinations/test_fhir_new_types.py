"""The issue #14 message types end to end: converted by the real converter, delivered by the FHIR destination
to the real Medplum test server, read back.  Lifecycle sequences must leave ONE resource in its final state
(synthetic data only)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from engine.destinations.base import DestinationContext
from engine.destinations.fhir import FhirDestination
from engine.hl7 import parse
from tests.destinations.conftest import make_item
from tests.support.fhirserver import FhirServer
from tests.transforms.conftest import MESSAGES, golden_settings
from transforms.convert import convert

pytestmark = pytest.mark.fhirserver


def deliver(fhir: FhirServer, ctx: DestinationContext, *names: str) -> None:
    async def go() -> None:
        d = FhirDestination("ehr", {"base_url": fhir.base_url, "max_transaction_entries": 8}, ctx)
        await d.start()
        try:
            for i, name in enumerate(names, start=1):
                text = (MESSAGES / f"{name}.hl7").read_text(encoding="utf-8")
                msg = parse(text)
                payload = orjson.dumps(convert(msg, golden_settings()))
                await d.deliver(
                    make_item(
                        payload,
                        message_id=i,
                        control_id=msg.control_id,
                        message_type=msg.message_type,
                        trigger=msg.trigger,
                        raw=text.encode(),
                    )
                )
        finally:
            await d.close()

    asyncio.run(go())


def one(fhir: FhirServer, query: str) -> dict[str, Any]:
    found = fhir.search(query)
    assert len(found) == 1, f"{query}: {len(found)} resources"
    return found[0]


def test_medication_order_new_then_discontinued_then_dispensed(
    fhir: FhirServer, ctx: DestinationContext
) -> None:
    deliver(fhir, ctx, "rde_o11", "rde_o11", "rde_o11_discontinue", "rds_o13")
    req = one(fhir, "MedicationRequest")
    assert req["status"] == "stopped"
    assert {i["value"] for i in req["identifier"]} >= {"RX-5001", "PH-7001"}
    med = one(fhir, "Medication")
    assert req["medicationReference"]["reference"] == f"Medication/{med['id']}"
    disp = one(fhir, "MedicationDispense")
    # the dispense's conditional create found the order the RDE wrote: no second MedicationRequest
    assert disp["authorizingPrescription"] == [{"reference": f"MedicationRequest/{req['id']}"}]
    patient = one(fhir, "Patient")
    assert req["subject"]["reference"] == f"Patient/{patient['id']}"


def test_problem_added_resolved_deleted(fhir: FhirServer, ctx: DestinationContext) -> None:
    deliver(fhir, ctx, "ppr_pc1", "ppr_pc2")
    cond = one(fhir, "Condition")
    assert cond["clinicalStatus"]["coding"][0]["code"] == "resolved"
    goal = one(fhir, "Goal")
    assert goal["addresses"] == [{"reference": f"Condition/{cond['id']}"}]
    deliver(fhir, ctx, "ppr_pc3")
    cond = one(fhir, "Condition")
    assert cond["verificationStatus"]["coding"][0]["code"] == "entered-in-error"
    assert "clinicalStatus" not in cond
    assert one(fhir, "Goal")["lifecycleStatus"] == "entered-in-error"


def test_charges_and_account(fhir: FhirServer, ctx: DestinationContext) -> None:
    deliver(fhir, ctx, "dft_p03", "dft_p03", "bar_p01", "bar_p06")
    account = one(fhir, "Account")
    assert account["status"] == "inactive"
    charges = fhir.search("ChargeItem")
    assert len(charges) == 3
    assert all(c["account"] == [{"reference": f"Account/{account['id']}"}] for c in charges)


def test_identifier_change_keeps_one_patient(fhir: FhirServer, ctx: DestinationContext) -> None:
    deliver(fhir, ctx, "adt_a47_prior", "adt_a47", "adt_a47")
    patient = one(fhir, "Patient")
    values = {(i["value"], i.get("use")) for i in patient["identifier"]}
    assert ("MRN10001", None) in values and ("MRN09999", "old") in values
    # later messages find it by the new identifier
    assert one(fhir, "Patient?identifier=urn:oid:2.16.840.1.113883.19.5|MRN10001")["id"] == patient["id"]


def test_allergy_added_then_deleted(fhir: FhirServer, ctx: DestinationContext) -> None:
    deliver(fhir, ctx, "adt_a60")
    allergies = fhir.search("AllergyIntolerance")
    assert len(allergies) == 2
    deleted = one(fhir, "AllergyIntolerance?identifier=urn:oid:2.16.840.1.113883.19.9|ALG-78")
    assert deleted["verificationStatus"]["coding"][0]["code"] == "entered-in-error"
