"""The hl7-to-fhir option ``coding_systems``: a channel names the FHIR system of a CWE-3 coding-system name."""

from __future__ import annotations

from typing import Any

from transforms.convert import _convert

from .conftest import golden_settings, msg, resources, validate_resources

MSH = "MSH|^~\\&|LAB|GOODHOSP|SLUICE|SLUICE|20250315143000||ORU^R01^ORU_R01|C1|P|2.5.1"
PID = "PID|1||MRN1^^^HOSP^MR||TESTPATIENT^ALEX||19800229|F"
OBR = "OBR|1|PL-1^EHR|FL-1^LAB|PANEL^Panel^99LAB|||20250315080000|||||||||||||||20250315120000|||F"
OBX = "OBX|1|NM|K^Potassium^99LAB||4.2|mmol/L^^UCUM|||||F"
DG1_ADT = (
    "MSH|^~\\&|EHR|GOODHOSP|SLUICE|SLUICE|20250315143000||ADT^A01^ADT_A01|C2|P|2.5.1",
    "EVN|A01|20250315143000",
    PID,
    "NK1|1|TESTCONTACT^SAM|FRND^Friend^99REL",
    "PV1|1|I|WARD1^101^A^GOODHOSP||||||||||||||||V1^^^HOSP^VN",
    "DG1|1||R07.9^Chest pain^I10||20250315|A",
)
LAB = "http://lab.example.org/codes"


def _codings(bundle: dict[str, Any], rtype: str, element: str) -> list[dict[str, Any]]:
    return [c for r in resources(bundle, rtype) for c in r.get(element, {}).get("coding", ())]


def test_a_local_coding_system_gets_the_channel_s_uri() -> None:
    plain = _convert(msg(MSH, PID, OBR, OBX), golden_settings())
    named = _convert(msg(MSH, PID, OBR, OBX), golden_settings(coding_systems={" 99lab ": LAB}))
    validate_resources(named.bundle)
    assert _codings(plain.bundle, "Observation", "code")[0]["system"] == "urn:sluice:codesystem:99LAB"
    assert _codings(named.bundle, "Observation", "code")[0] == {
        "system": LAB,
        "code": "K",
        "display": "Potassium",
    }
    assert _codings(named.bundle, "DiagnosticReport", "code")[0]["system"] == LAB
    # units keep their own rule (UCUM)
    assert resources(named.bundle, "Observation")[0]["valueQuantity"]["system"] == "http://unitsofmeasure.org"


def test_a_shipped_name_can_be_read_another_way_and_relationships_follow_too() -> None:
    plain = _convert(msg(*DG1_ADT), golden_settings())
    s = golden_settings(coding_systems={"I10": "http://hl7.org/fhir/sid/icd-10", "99REL": "urn:oid:1.2.3.4"})
    named = _convert(msg(*DG1_ADT), s)
    validate_resources(named.bundle)
    assert _codings(plain.bundle, "Condition", "code")[0]["system"] == "http://hl7.org/fhir/sid/icd-10-cm"
    assert _codings(named.bundle, "Condition", "code")[0]["system"] == "http://hl7.org/fhir/sid/icd-10"
    rel = [
        c for r in resources(named.bundle, "RelatedPerson") for cc in r["relationship"] for c in cc["coding"]
    ]
    assert {"system": "urn:oid:1.2.3.4", "code": "FRND", "display": "Friend"} in rel
