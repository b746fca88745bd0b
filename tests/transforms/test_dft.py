"""DFT^P03/P11 and BAR^P01/P02/P05/P06/P12 → Account, ChargeItem, Procedure, Condition, Coverage: golden files,
lifecycle (a P12 deleting a procedure and a diagnosis writes the same resources, P06 closes the account),
located errors (synthetic data)."""

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

ACCOUNT = "Account?identifier=urn:oid:2.16.840.1.113883.19.5|ACC500"
MSH = "MSH|^~\\&|SYNTH-BILL|GOODHOSP|SLUICE|SLUICE|20250320101500||{}|C1|P|2.5.1"
PID = "PID|1||MRN10001^^^HOSP^MR||TESTPATIENT^ALEX||19800229|F|||||||||ACC500^^^HOSP^AN"


@pytest.mark.parametrize("name", ["dft_p03", "bar_p01", "bar_p12", "bar_p06"])
def test_golden(name: str) -> None:
    result = _convert(load(name), golden_settings())
    validate_resources(result.bundle)
    got = {"bundle": result.bundle, "events": dict(result.events), "warnings": list(result.warnings)}
    assert_golden(name, got)


def _by_url(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["request"]["url"]: e for e in bundle["entry"]}


def test_charges_on_the_account() -> None:
    b = _convert(load("dft_p03"), golden_settings()).bundle
    entries = _by_url(b)
    account = entries[ACCOUNT]
    assert account["resource"]["status"] == "active"
    assert account["resource"]["coverage"][0]["coverage"]["reference"].startswith("urn:uuid:")
    charges = resources(b, "ChargeItem")
    assert [c["identifier"][0]["value"] for c in charges] == ["TXN-9001", "TXN-9002", "TXN-9003"]
    first, second, third = charges
    assert all(c["account"] == [{"reference": account["fullUrl"]}] for c in charges)
    assert first["priceOverride"] == {"value": 120.0, "currency": "USD"}
    assert first["reason"][0]["coding"][0]["code"] == "R51"
    assert first["note"] == [{"text": "Level 3 visit."}]
    # the FINANCIAL_PROCEDURE PR1 is the charge's service; FT1-25 without a PR1 becomes the billed procedure
    procedures = {
        e["fullUrl"]: e["resource"] for e in b["entry"] if e["resource"]["resourceType"] == "Procedure"
    }
    assert procedures[second["service"][0]["reference"]]["identifier"][0]["value"] == "PROC-55"
    assert procedures[first["service"][0]["reference"]]["code"]["coding"][0]["code"] == "99213"
    assert third["productCodeableConcept"]["coding"][0]["code"] == "00009-0181-01"
    assert third["quantity"] == {"value": 2}


def test_resend_is_idempotent() -> None:
    a = _convert(load("dft_p03"), golden_settings()).bundle
    b = _convert(load("dft_p03"), golden_settings()).bundle
    assert a == b
    urls = [e["request"]["url"] + "?" + e["request"].get("ifNoneExist", "") for e in a["entry"]]
    assert len(urls) == len(set(urls)), "one entry per resource"


def test_p12_deletes_the_same_procedure_and_diagnosis() -> None:
    added = _by_url(_convert(load("bar_p01"), golden_settings()).bundle)
    deleted = _by_url(_convert(load("bar_p12"), golden_settings()).bundle)
    (proc,) = [u for u in added if u.startswith("Procedure")]
    assert added[proc]["resource"]["status"] == "completed"
    assert deleted[proc]["resource"]["status"] == "entered-in-error"
    (cond,) = [u for u in added if u.startswith("Condition")]
    assert added[cond]["resource"]["verificationStatus"]["coding"][0]["code"] == "provisional"
    assert deleted[cond]["resource"]["verificationStatus"]["coding"][0]["code"] == "entered-in-error"


def test_end_of_account() -> None:
    b = _convert(load("bar_p06"), golden_settings()).bundle
    assert _by_url(b)[ACCOUNT]["resource"]["status"] == "inactive"


def test_charge_without_transaction_id_is_keyed_by_content() -> None:
    ft1 = "FT1|1|||20250320|20250320|CG|99213^Visit^C4|||1"
    one = _convert(msg(MSH.format("DFT^P03"), PID, ft1), golden_settings())
    two = _convert(msg(MSH.format("DFT^P03"), PID, ft1), golden_settings())
    assert one.events["charge_fallback_key"] == 1
    assert [e["request"]["url"] for e in one.bundle["entry"]] == [
        e["request"]["url"] for e in two.bundle["entry"]
    ]


def test_located_errors() -> None:
    with pytest.raises(ConversionError) as ei:
        _convert(msg(MSH.format("DFT^P03"), PID, "FT1|1|T1||20250320|20250320|CG"), golden_settings())
    assert ei.value.hl7_error == "101" and str(ei.value.location) == "FT1-7"
    with pytest.raises(ConversionError) as ei:
        _convert(msg(MSH.format("DFT^P03"), PID), golden_settings())
    assert str(ei.value.location).startswith("FT1")
    with pytest.raises(ConversionError) as ei:
        _convert(msg(MSH.format("BAR^P01")), golden_settings())
    assert ei.value.location is not None
    with pytest.raises(MessageRejected) as er:
        _convert(msg(MSH.format("BAR^P10"), PID), golden_settings())
    assert er.value.hl7_error == "201"


def test_a_price_override_that_is_not_a_number_is_located() -> None:
    """FT1-11 (found by the fuzz test: the error had no location, a failure of the conformance target)."""
    ft1 = "FT1|1|T1||20250320|20250320|CG|99213^Visit^C4|||1|12a&USD"
    with pytest.raises(ConversionError) as ei:
        _convert(msg(MSH.format("DFT^P03"), PID, ft1), golden_settings(strictness="strict"))
    assert ei.value.hl7_error == "102" and str(ei.value.location) == "FT1-11"
    lenient = _convert(msg(MSH.format("DFT^P03"), PID, ft1), golden_settings())
    (charge,) = resources(lenient.bundle, "ChargeItem")
    assert "priceOverride" not in charge and list(lenient.warning_kinds) == ["field_dropped"]


def test_an_order_the_oru_mapping_cannot_convert_does_not_reject_the_charges() -> None:
    m = msg(
        MSH.format("DFT^P03"), PID, "ORC|RE|P1", "OBR|1|P1", "FT1|1|T1||20250320|20250320|CG|99213^Visit^C4"
    )
    # an OBR without OBR-4 cannot be converted under strict (AE 101); lenient converts it (report_code_missing)
    r = _convert(m, golden_settings(strictness="strict"))
    assert resources(r.bundle, "ChargeItem")
    assert r.events.get("dft_order_not_converted") == 1 and r.warnings
    lenient = _convert(m, golden_settings())
    assert resources(lenient.bundle, "ChargeItem") and resources(lenient.bundle, "DiagnosticReport")
    assert "dft_order_not_converted" not in lenient.events


def test_mother_enterer_and_encounter_diagnosis() -> None:
    """PID-21 → the mother's RelatedPerson (IG PID[Patient] → CX[RelatedPerson-Mother], as ADT/SIU); FT1-24 entered
    by → ChargeItem.enterer; the DG1 Conditions → Encounter.diagnosis with DG1-6 as its use (IG DG1[Encounter], as
    ADT)."""
    pid = (
        "PID|1||MRN10001^^^HOSP^MR||TESTPATIENT^ALEX||19800229|F"
        + "|" * 10
        + "ACC500^^^HOSP^AN|||MOM77^^^HOSP^MR"
    )
    pv1 = "PV1|1|O|CLINIC^^^GOODHOSP||||||||||||||||V300^^^VISITS^VN"
    ft1 = (
        "FT1|1|TXN-1||20250320093000||CG|99213^Visit^C4"
        + "|" * 17
        + "1234567890^ENTERER^ERIN^^^^^^NPI^L^^^NPI"
    )
    dg1 = "DG1|1||R51^Headache^I10|||A"
    b = _convert(
        msg("\r".join([MSH.format("DFT^P03^DFT_P03"), pid, pv1, ft1, dg1]) + "\r"), golden_settings()
    )
    validate_resources(b.bundle)
    entries = {e["fullUrl"]: e["resource"] for e in b.bundle["entry"]}
    (mother,) = resources(b.bundle, "RelatedPerson")
    assert mother["identifier"][0]["value"] == "MOM77"
    assert mother["relationship"][0]["coding"][0]["code"] == "MTH"
    (charge,) = resources(b.bundle, "ChargeItem")
    enterer = entries[charge["enterer"]["reference"]]
    assert enterer["resourceType"] == "Practitioner" and enterer["name"][0]["family"] == "ENTERER"
    assert "performer" not in charge
    (encounter,) = resources(b.bundle, "Encounter")
    (diagnosis,) = encounter["diagnosis"]
    assert entries[diagnosis["condition"]["reference"]]["resourceType"] == "Condition"
    assert diagnosis["use"]["coding"][0]["code"] == "AD"
