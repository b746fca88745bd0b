"""VXU^V04 → Immunization: golden files, entered-in-error on the same resource, located errors (synthetic data)."""

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

KEY = "Immunization?identifier=urn:oid:2.16.840.1.113883.19.999.7|FL-IZ-1"
MSH = "MSH|^~\\&|SYNEHR|SYNTH CLINIC|SYNIIS|SYNTH IIS|20250401103000||VXU^{}|C1|P|2.5.1"
PID = "PID|1||MRN900001^^^SYNTH HOSP&2.16.840.1.113883.19.999.1&ISO^MR||TESTPERSON^ALEXANDRA||20200115|F"
RXA = "RXA|0|1|20250401100000||08^Hep B^CVX|0.5|mL^mL^UCUM||00^New^NIP001|||||||||||{status}|{action}"


@pytest.mark.parametrize("name", ["vxu_v04", "vxu_v04_delete"])
def test_golden(name: str) -> None:
    result = _convert(load(name), golden_settings())
    validate_resources(result.bundle)
    got = {
        "bundle": result.bundle,
        "guards": [list(g) for g in result.guards],
        "events": dict(result.events),
        "requires": list(result.requires),
    }
    assert_golden(name, got)


def _imm(bundle: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    (entry,) = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Immunization"]
    return entry, entry["resource"]


def test_mapping_of_the_golden_message() -> None:
    b = _convert(load("vxu_v04"), golden_settings()).bundle
    entry, imm = _imm(b)
    assert entry["request"] == {"method": "PUT", "url": KEY}
    assert imm["status"] == "completed"
    assert imm["vaccineCode"]["coding"][0]["code"] == "08"
    assert imm["occurrenceDateTime"].startswith("2025-04-01T10:00:00")
    assert imm["lotNumber"] == "LOT123" and imm["expirationDate"] == "2026-12-31"
    assert imm["doseQuantity"]["value"] == 0.5 and imm["doseQuantity"]["code"] == "mL"
    assert imm["route"]["coding"][0]["code"] == "C28161" and imm["site"]["coding"][0]["code"] == "RT"
    assert imm["programEligibility"][0]["coding"][0]["code"] == "V02"
    assert imm["fundingSource"]["coding"][0]["code"] == "VXC1"
    assert imm["education"] == [{"documentType": "Hepatitis B VIS", "presentationDate": "2025-04-01"}]
    assert imm["primarySource"] is True
    assert {p["function"]["coding"][0]["code"] for p in imm["performer"]} == {"OP", "AP"}
    assert "recorded" in imm  # RXA-22 with action A
    # every OBX is also an Observation part of the immunization
    obs = resources(b, "Observation")
    assert len(obs) == 4 and all(o["partOf"] == [{"reference": entry["fullUrl"]}] for o in obs)
    # ORC → ServiceRequest (conditional create keyed on the placer number), the Observations are basedOn it
    (sr_entry,) = [e for e in b["entry"] if e["resource"]["resourceType"] == "ServiceRequest"]
    assert sr_entry["request"]["method"] == "POST"
    assert sr_entry["request"]["ifNoneExist"] == "identifier=urn:oid:2.16.840.1.113883.19.999.7|PL-IZ-1"
    assert sr_entry["resource"]["intent"] == "order" and sr_entry["resource"]["code"] == imm["vaccineCode"]
    assert all(o["basedOn"] == [{"reference": sr_entry["fullUrl"]}] for o in obs)


def test_entered_in_error_updates_the_same_immunization() -> None:
    added = _convert(load("vxu_v04"), golden_settings())
    deleted = _convert(load("vxu_v04_delete"), golden_settings())
    e1, i1 = _imm(added.bundle)
    e2, i2 = _imm(deleted.bundle)
    assert e1["request"] == e2["request"] and e1["fullUrl"] == e2["fullUrl"]
    assert i1["status"] == "completed" and i2["status"] == "entered-in-error"
    # the guard ranks entered-in-error above completed: a late resend of the original goes to review
    assert dict(deleted.guards)[KEY] > dict(added.guards)[KEY]
    # the deletion is idempotent: converting it twice gives the same bundle
    assert _convert(load("vxu_v04_delete"), golden_settings()).bundle == deleted.bundle


@pytest.mark.parametrize(
    ("status", "action", "expected"),
    [("CP", "A", "completed"), ("PA", "A", "completed"), ("RE", "A", "not-done"), ("NA", "U", "not-done"),
     ("", "", "completed"), ("CP", "D", "entered-in-error"), ("RE", "D", "entered-in-error")],
)  # fmt: skip
def test_status(status: str, action: str, expected: str) -> None:
    orc = "ORC|RE||F1^SYN^2.16.840.1.113883.19.999.7^ISO"
    m = msg(MSH.format("V04"), PID, orc, RXA.format(status=status, action=action))
    _, imm = _imm(_convert(m, golden_settings()).bundle)
    assert imm["status"] == expected


def test_without_order_ids_keyed_on_patient_vaccine_and_date() -> None:
    m = msg(MSH.format("V04"), PID, RXA.format(status="CP", action="A"))
    r = _convert(m, golden_settings())
    entry, _ = _imm(r.bundle)
    assert r.events["immunization_fallback_key"] == 1
    again = _convert(msg(MSH.format("V04"), PID, RXA.format(status="CP", action="D")), golden_settings())
    assert _imm(again.bundle)[0]["request"] == entry["request"]


def test_located_errors() -> None:
    orc = "ORC|RE||F1^SYN^2.16.840.1.113883.19.999.7^ISO"
    with pytest.raises(ConversionError) as e:
        _convert(msg(MSH.format("V04"), PID, orc, "RXA|0|1|20250401||"), golden_settings())
    assert e.value.location is not None and str(e.value.location).startswith("RXA")
    with pytest.raises(ConversionError) as e:
        _convert(msg(MSH.format("V04"), PID, orc, "RXA|0|1|||08^Hep B^CVX"), golden_settings())
    assert e.value.location is not None and "RXA" in str(e.value.location)
    with pytest.raises(ConversionError) as e:
        _convert(msg(MSH.format("V04"), PID, orc), golden_settings())
    assert e.value.hl7_error == "100"
    with pytest.raises(ConversionError) as e:
        _convert(msg(MSH.format("V04"), "NK1|1|TESTKIN^SAM|MTH"), golden_settings())
    assert e.value.hl7_error == "100" and str(e.value.location).startswith("PID")
    with pytest.raises(MessageRejected) as r:
        _convert(msg(MSH.format("V03"), PID, orc), golden_settings())
    assert r.value.hl7_error == "201"


def test_two_administrations_under_one_order_number_are_kept_apart() -> None:
    orc = "ORC|RE||F1^SYN^2.16.840.1.113883.19.999.7^ISO"
    first = "RXA|0|1|20250401||08^Hep B^CVX|0.5|mL^mL^UCUM||00^New^NIP001|||||||||||CP|A"
    second = "RXA|0|1|20240301||88^Influenza^CVX|999|||01^Historical^NIP001|||||||||||CP|A"
    r = _convert(msg(MSH.format("V04"), PID, orc, first, orc, second), golden_settings())
    imms = resources(r.bundle, "Immunization")
    assert [i["vaccineCode"]["coding"][0]["code"] for i in imms] == ["08", "88"]
    assert imms[0]["primarySource"] is True and "reportOrigin" not in imms[0]
    assert imms[1]["primarySource"] is False and imms[1]["occurrenceDateTime"] == "2024-03-01"
    assert r.events["immunization_duplicate_order_id"] == 1
    assert any(w.startswith("ORC(2)-3") for w in r.warnings), r.warnings
    # deterministic: the same message gives the same two keys
    again = _convert(msg(MSH.format("V04"), PID, orc, first, orc, second), golden_settings())
    assert [e["request"] for e in again.bundle["entry"]] == [e["request"] for e in r.bundle["entry"]]


def test_without_order_group_only_the_patient() -> None:
    """The ORDER group is optional in VXU_V04: a demographics-only message converts, counted."""
    r = _convert(msg(MSH.format("V04"), PID), golden_settings())
    assert {e["resource"]["resourceType"] for e in r.bundle["entry"]} <= {"Patient", "Provenance"}
    assert resources(r.bundle, "Patient") and r.events["vxu_without_order"] == 1


def test_a_vis_date_that_is_no_date_is_dropped_with_a_warning_in_lenient_mode() -> None:
    """A sender's OBX under the VIS-presented LOINC carrying a coded value instead of the date."""
    m = msg(
        MSH.format("V04"),
        PID,
        "ORC|RE||FL-IZ-1^SYNEHR^2.16.840.1.113883.19.999.7^ISO",
        RXA.format(status="CP", action="A"),
        "OBX|1|CE|69764-9^Document type^LN|1|253088698300012711120420^Hep B VIS^cdcgs1vis||||||F",
        "OBX|2|CE|29769-7^Date VIS presented^LN|1|V99^Not a date^HL70064||||||F",
    )
    result = _convert(m, golden_settings())
    validate_resources(result.bundle)
    _, imm = _imm(result.bundle)
    assert imm["education"] == [{"documentType": "Hep B VIS"}]
    assert list(result.warning_kinds) == ["field_dropped"] and result.warnings[0].startswith("OBX(2)-5: ")
    with pytest.raises(ConversionError) as ei:
        _convert(m, golden_settings(strictness="strict"))
    assert ei.value.hl7_error == "102" and str(ei.value.location) == "OBX(2)-5"


@pytest.mark.parametrize(
    ("rxa17", "options", "system"),
    [
        ("MSD^Merck^MVX", {}, "http://hl7.org/fhir/sid/mvx"),
        ("MSD^Merck", {}, "http://hl7.org/fhir/sid/mvx"),  # no CWE-3: RXA-17 is MVX-coded
        ("mfr7^Synth Vaccines^99MFR", {}, "urn:sluice:codesystem:99MFR"),  # a local table keeps its name
        (
            "MSD^Merck^MVX",
            {"coding_systems": {"MVX": "urn:oid:2.16.840.1.113883.12.227"}},
            "urn:oid:2.16.840.1.113883.12.227",
        ),
    ],
)
def test_manufacturer_identifier_system_is_the_coding_system_of_rxa_17(
    rxa17: str, options: dict[str, Any], system: str
) -> None:
    """IG CWE[Organization]: RXA-17.3 → identifier.system, through the same coding-system names as every code
    (the published MVX system, the channel's coding_systems), not a lower-cased local name."""
    orc = "ORC|RE||F1^SYN^2.16.840.1.113883.19.999.7^ISO"
    rxa = "RXA|0|1|20250401||08^Hep B^CVX|0.5|mL^mL^UCUM||00^New^NIP001||||||LOT1||" + rxa17 + "||||CP|A"
    r = _convert(msg(MSH.format("V04"), PID, orc, rxa), golden_settings(**options))
    validate_resources(r.bundle)
    (org,) = resources(r.bundle, "Organization")
    assert org["identifier"][0] == {"system": system, "value": rxa17.split("^")[0]}
