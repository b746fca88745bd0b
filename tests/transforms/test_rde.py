"""RDE^O11/O25 → MedicationRequest + Medication, RDS^O13 → MedicationDispense: golden files, one
MedicationRequest through its lifecycle (new, discontinued), located errors (synthetic data)."""

from __future__ import annotations

from typing import Any

import pytest

from engine.errors import ConversionError, MessageRejected
from tests.transforms.conftest import (
    assert_golden,
    golden_settings,
    load,
    msg,
    resources,
    validate_resources,
)
from transforms.convert import _convert

ORDER = "MedicationRequest?identifier=urn:oid:2.16.840.1.113883.19.20|RX-5001"
MSH = "MSH|^~\\&|SYNTH-CPOE|GOODHOSP|SYNTH-RX|GOODHOSP|20250320085500||{}|C1|P|2.5.1"
PID = "PID|1||MRN10001^^^HOSP^MR||TESTPATIENT^ALEX||19800229|F"
RXE = "RXE||308182^Amoxicillin 500 MG Oral Capsule^RXNORM|500||mg^mg^UCUM"


@pytest.mark.parametrize("name", ["rde_o11", "rde_o11_discontinue", "rde_o25", "rds_o13"])
def test_golden(name: str) -> None:
    result = _convert(load(name), golden_settings())
    validate_resources(result.bundle)
    got = {
        "bundle": result.bundle,
        "guards": [list(g) for g in result.guards],
        "events": dict(result.events),
        "warnings": list(result.warnings),
    }
    assert_golden(name, got)


def _entries(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def test_new_then_discontinue_writes_the_same_request() -> None:
    new = _convert(load("rde_o11"), golden_settings())
    stop = _convert(load("rde_o11_discontinue"), golden_settings())
    (a,) = _entries(new.bundle, "MedicationRequest")
    (b,) = _entries(stop.bundle, "MedicationRequest")
    assert a["request"] == b["request"] == {"method": "PUT", "url": ORDER}
    assert a["resource"]["status"] == "active" and b["resource"]["status"] == "stopped"
    # the discontinue's transaction time is not when the order was written
    assert a["resource"]["authoredOn"] == "2025-03-20T08:55:00-07:00"
    assert "authoredOn" not in b["resource"]
    # a late resend of the new order cannot restart it
    assert dict(stop.guards)[ORDER] > dict(new.guards)[ORDER]


def test_mapping_of_the_new_order() -> None:
    b = _convert(load("rde_o11"), golden_settings()).bundle
    (req,) = resources(b, "MedicationRequest")
    (med,) = _entries(b, "Medication")
    assert req["medicationReference"] == {"reference": med["fullUrl"]}
    assert med["resource"]["code"]["coding"][0]["code"] == "308182"
    assert med["resource"]["form"]["coding"][0]["code"] == "CAP"
    (dose,) = req["dosageInstruction"]
    assert dose["text"] == "Take with food"
    assert dose["route"]["coding"][0]["code"] == "PO"
    assert dose["doseAndRate"][0]["doseQuantity"]["value"] == 500
    assert dose["timing"]["repeat"]["boundsPeriod"]["end"].startswith("2025-03-27")
    assert req["dispenseRequest"]["quantity"]["value"] == 21
    assert req["substitution"] == {"allowedBoolean": True}
    assert req["reasonCode"][0]["coding"][0]["code"] == "J02.9"
    assert req["note"] == [{"text": "Complete the full course."}]


def test_compound_medication_has_its_components() -> None:
    b = _convert(load("rde_o25"), golden_settings()).bundle
    (med,) = resources(b, "Medication")
    assert [i["itemCodeableConcept"]["coding"][0]["code"] for i in med["ingredient"]] == ["313002", "8591"]
    (req,) = resources(b, "MedicationRequest")
    assert req["dosageInstruction"][0]["doseAndRate"][0]["rateQuantity"]["code"] == "mL/h"


def test_dispense_refers_to_the_order_written_as_a_conditional_create() -> None:
    b = _convert(load("rds_o13"), golden_settings()).bundle
    (req,) = _entries(b, "MedicationRequest")
    assert req["request"]["method"] == "POST" and req["request"]["ifNoneExist"] == ORDER.split("?", 1)[1]
    (disp,) = resources(b, "MedicationDispense")
    assert disp["authorizingPrescription"] == [{"reference": req["fullUrl"]}]
    assert disp["status"] == "completed" and disp["quantity"]["value"] == 21
    assert disp["substitution"] == {"wasSubstituted": False}
    assert disp["whenHandedOver"] == "2025-03-20T09:30:00-07:00"
    again = _convert(load("rds_o13"), golden_settings()).bundle
    assert again == b


@pytest.mark.parametrize(
    ("control", "status", "expected"),
    [("NW", "", "active"), ("CA", "", "cancelled"), ("OD", "", "stopped"), ("HD", "", "on-hold"),
     ("RL", "", "active"), ("SC", "CM", "completed"), ("XO", "ER", "entered-in-error")],
)  # fmt: skip
def test_status(control: str, status: str, expected: str) -> None:
    m = msg(MSH.format("RDE^O11"), PID, f"ORC|{control}|P1^CPOE^2.16.840.1.113883.19.20^ISO|||{status}", RXE)
    (req,) = resources(_convert(m, golden_settings()).bundle, "MedicationRequest")
    assert req["status"] == expected


def test_located_errors() -> None:
    with pytest.raises(ConversionError) as ei:
        _convert(msg(MSH.format("RDE^O11"), PID, "ORC|NW", RXE), golden_settings())
    assert ei.value.hl7_error == "101" and str(ei.value.location) == "ORC-2"
    with pytest.raises(ConversionError) as ei:
        _convert(msg(MSH.format("RDE^O11"), PID, "ORC|NW|P1"), golden_settings())
    assert str(ei.value.location).startswith("RXE")
    with pytest.raises(ConversionError) as ei:
        _convert(msg(MSH.format("RDE^O11"), PID, "ORC|NW|P1", "RXE||"), golden_settings())
    assert str(ei.value.location) == "RXE-2"
    with pytest.raises(ConversionError) as ei:
        _convert(msg(MSH.format("RDS^O13"), PID, "ORC|RE|P1", RXE), golden_settings())
    assert str(ei.value.location).startswith("RXD")
    with pytest.raises(MessageRejected) as er:
        _convert(msg(MSH.format("RDE^O49"), PID), golden_settings())
    assert er.value.hl7_error == "201"


@pytest.mark.parametrize(("kind", "rtype"), [("RDE", "MedicationRequest"), ("RDS", "MedicationDispense")])
def test_v2_3_trigger_o01_converts_as_o11_and_o13(kind: str, rtype: str) -> None:
    """HL7 v2.3 named the pharmacy encoded order and the dispense O01 (RDE_O01 / RDS_O01); v2.4 renamed them."""
    v23 = "MSH|^~\\&|SYNTH-CPOE|GOODHOSP|SYNTH-RX|GOODHOSP|20250320085500||{}|C1|P|2.3"
    segs = [PID, "ORC|NW|P1^CPOE^2.16.840.1.113883.19.20^ISO", "RXO|308182^Amoxicillin^RXNORM|500||mg", RXE]
    if kind == "RDS":
        segs.append("RXD|1|308182^Amoxicillin 500 MG Oral Capsule^RXNORM|20250320090000|30|cap")
    old = _convert(msg(v23.format(f"{kind}^O01"), *segs), golden_settings())
    new = _convert(msg(v23.format(f"{kind}^{'O11' if kind == 'RDE' else 'O13'}"), *segs), golden_settings())
    validate_resources(old.bundle)
    (res,) = resources(old.bundle, rtype)
    (same,) = resources(new.bundle, rtype)
    for r in (res, same):
        r.pop("id", None)
    assert res == same


def test_omp_o09_order_is_the_medication_request_the_pharmacy_rde_updates() -> None:
    """OMP^O09 (the ordering system's pharmacy/treatment order: ORC + RXO, no RXE) → the MedicationRequest,
    keyed on ORC-2 like the RDE^O11 the pharmacy sends later for the same order."""
    orc = "ORC|NW|RX-5001^SYNTH-CPOE^2.16.840.1.113883.19.20^ISO||||||||||1234567893^Carer^Casey^^^Dr^^^NPI"
    rxo = (
        "RXO|308182^Amoxicillin 500 MG Oral Capsule^RXNORM|500||mg^mg^UCUM|||^Take with food||G||21|{capsule}"
    )
    omp = _convert(
        msg(MSH.format("OMP^O09^OMP_O09"), PID, orc, rxo, "RXR|PO^Oral^HL70162"), golden_settings()
    )
    validate_resources(omp.bundle)
    entry = next(e for e in omp.bundle["entry"] if e["resource"]["resourceType"] == "MedicationRequest")
    req = entry["resource"]
    assert entry["request"] == {"method": "PUT", "url": ORDER}
    assert req["status"] == "active" and req["intent"] == "order"
    (med,) = resources(omp.bundle, "Medication")
    assert med["code"]["coding"][0]["code"] == "308182"
    dose = req["dosageInstruction"][0]
    assert (
        dose["doseAndRate"][0]["doseQuantity"]["value"] == 500 and dose["route"]["coding"][0]["code"] == "PO"
    )
    rde = _convert(msg(MSH.format("RDE^O11"), PID, orc.replace("ORC|NW", "ORC|OK"), RXE), golden_settings())
    assert ORDER in [e["request"]["url"] for e in rde.bundle["entry"]]


def test_omp_located_errors() -> None:
    with pytest.raises(ConversionError) as ei:
        _convert(msg(MSH.format("OMP^O09"), PID, "ORC|NW|P1"), golden_settings())
    assert ei.value.hl7_error == "100" and str(ei.value.location).startswith("RXO")
    with pytest.raises(ConversionError) as ei:
        _convert(msg(MSH.format("OMP^O09"), "ORC|NW|P1", "RXO|308182^Amoxicillin^RXNORM"), golden_settings())
    assert str(ei.value.location) == "PID"
    with pytest.raises(MessageRejected) as er:
        _convert(msg(MSH.format("OMP^O10"), PID), golden_settings())
    assert er.value.hl7_error == "201"
