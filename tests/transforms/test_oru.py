"""ORU^R01 → DiagnosticReport/Observation: golden file, value types, corrections and guards (synthetic data)."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from engine.errors import ConversionError, SluiceError
from engine.hl7 import parse
from tests.transforms.conftest import EXPECTED, golden_settings, load, msg, resources, validate_resources
from transforms.bundle import OBSERVATION_STATUS_RANK
from transforms.convert import _convert, convert_report
from transforms.oru import DIAGNOSTIC_REPORT_STATUS_RANK, OBX_STATUS, content_type

MSH = "MSH|^~\\&|SYNLAB|SYNTH HOSP^2.16.840.1.113883.19.999.1^ISO|SLUICE|SLUICE|20250310143000||ORU^R01|C1|P|2.5.1"
PID = "PID|1||MRN900001^^^SYNTH HOSP&2.16.840.1.113883.19.999.1&ISO^MR||TESTPERSON^ALEXANDRA||19800229|F"
OBR = "OBR|1|PLC1^SYNEHR|FIL1^SYNLAB^2.16.840.1.113883.19.999.2^ISO|24323-8^Panel^LN|||20250310080000"
FILLER = "urn:oid:2.16.840.1.113883.19.999.2"


def conv(*segments: str, **kw: Any) -> Any:
    return _convert(msg(*segments), golden_settings(**kw))


def by_code(bundle: dict[str, Any], code: str) -> list[dict[str, Any]]:
    return [o for o in resources(bundle, "Observation") if o["code"]["coding"][0]["code"] == code]


def one(bundle: dict[str, Any], code: str) -> dict[str, Any]:
    found = by_code(bundle, code)
    assert len(found) == 1, code
    return found[0]


def entry_of(bundle: dict[str, Any], resource: dict[str, Any]) -> dict[str, Any]:
    return next(e for e in bundle["entry"] if e["resource"] is resource)


# ---------------------------------------------------------------------------
# golden
# ---------------------------------------------------------------------------
GOLDEN = ["oru_r01_multi", "oru_r01_correction", "oru_r01_late_preliminary"]


@pytest.mark.parametrize("name", GOLDEN)
def test_golden(name: str) -> None:
    result = _convert(load(name), golden_settings())
    validate_resources(result.bundle)
    got = {"bundle": result.bundle, "guards": [list(g) for g in result.guards], "events": dict(result.events)}
    path = EXPECTED / f"{name}.json"
    if os.environ.get("SLUICE_REGEN_GOLDEN") == "1":
        path.write_text(
            json.dumps(got, indent=1, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8"
        )
    assert path.exists(), f"missing golden file {path.name}: run with SLUICE_REGEN_GOLDEN=1 and review it"
    expected = json.loads(path.read_text(encoding="utf-8"))
    assert json.loads(json.dumps(got)) == expected


def test_golden_is_deterministic() -> None:
    a = _convert(load("oru_r01_multi"), golden_settings())
    b = _convert(load("oru_r01_multi"), golden_settings())
    assert a.bundle == b.bundle and a.guards == b.guards


# ---------------------------------------------------------------------------
# structure and value types
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def multi() -> dict[str, Any]:
    bundle: dict[str, Any] = _convert(load("oru_r01_multi"), golden_settings()).bundle
    return bundle


def test_one_report_per_obr_with_results(multi: dict[str, Any]) -> None:
    reports = resources(multi, "DiagnosticReport")
    assert len(reports) == 3
    first = reports[0]
    assert first["status"] == "final"
    assert {k: first["identifier"][1][k] for k in ("system", "value")} == {
        "system": FILLER,
        "value": "FIL5001",
    }
    assert first["identifier"][0]["type"]["coding"][0]["code"] == "PLAC"
    assert first["identifier"][1]["type"]["coding"][0]["code"] == "FILL"
    assert len(first["result"]) == 10
    urls = {e["fullUrl"] for e in multi["entry"]}
    assert all(r["reference"] in urls for rep in reports for r in rep.get("result", []))
    assert first["effectiveDateTime"] == "2025-03-10T08:00:00-07:00"
    assert first["issued"] == "2025-03-10T14:15:00-07:00"
    assert first["extension"][0]["valueAnnotation"]["text"] == (
        "Specimen received ambient.\nSecond line of report comment."
    )
    assert "resultsInterpreter" in first
    assert reports[1]["status"] == "preliminary"
    entry = entry_of(multi, first)
    assert entry["request"] == {"method": "PUT", "url": f"DiagnosticReport?identifier={FILLER}|FIL5001"}


def test_patient_and_encounter_references(multi: dict[str, Any]) -> None:
    (patient,) = resources(multi, "Patient")
    pref = entry_of(multi, patient)["fullUrl"]
    for o in resources(multi, "Observation"):
        assert o["subject"]["reference"] == pref
        assert o["encounter"]["reference"].startswith("urn:uuid:")


def test_nm_with_ucum_units_range_and_flag(multi: dict[str, Any]) -> None:
    glucose = one(multi, "2345-7")
    assert glucose["valueQuantity"] == {
        "value": 182,
        "unit": "milligram per deciliter",
        "system": "http://unitsofmeasure.org",
        "code": "mg/dL",
    }
    assert glucose["referenceRange"][0]["low"]["value"] == 70
    assert glucose["referenceRange"][0]["high"]["value"] == 99
    assert glucose["referenceRange"][0]["text"] == "70-99"
    assert glucose["interpretation"][0]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
        "code": "H",
        "display": "High",
    }
    assert glucose["effectiveDateTime"] == "2025-03-10T08:15:00-07:00"
    assert glucose["status"] == "final"
    kinds = [p.get("display") for p in glucose["performer"]]
    assert kinds == ["OLIVE OBSERVER", "DANA DIRECTOR", "SYNTH LAB ORG"]
    assert "Organization" in {r["resourceType"] for r in (e["resource"] for e in multi["entry"])}


def test_sn_variants(multi: dict[str, Any]) -> None:
    assert one(multi, "2160-0")["valueQuantity"]["comparator"] == "<"
    assert one(multi, "2160-0")["valueQuantity"]["value"] == 0.5
    assert one(multi, "5195-3")["valueRatio"] == {"numerator": {"value": 1}, "denominator": {"value": 128}}
    rng = one(multi, "2093-3")["valueRange"]
    assert rng["low"]["value"] == 150 and rng["high"]["value"] == 200
    assert rng["low"]["code"] == "mg/dL"


def test_nm_with_comparator_becomes_quantity_comparator(multi: dict[str, Any]) -> None:
    plt = one(multi, "777-3")
    assert plt["valueQuantity"]["comparator"] == ">" and plt["valueQuantity"]["value"] == 1000


def test_text_types_keep_line_breaks(multi: dict[str, Any]) -> None:
    assert one(multi, "11526-1")["valueString"] == (
        "Line one of narrative.\nLine two of narrative.\nSecond repetition line."
    )
    assert one(multi, "18769-0")["valueString"] == "Formatted bold text\nnext line"
    st_obs = one(multi, "8251-1") if len(by_code(multi, "8251-1")) == 1 else by_code(multi, "8251-1")[0]
    assert st_obs["valueString"] == "Hemolyzed specimen"
    assert st_obs["note"] == [{"text": "Result verified by repeat analysis.\nSecond line of the note."}]


def test_coded_and_date_values(multi: dict[str, Any]) -> None:
    cwe = one(multi, "600-7")
    assert cwe["valueCodeableConcept"]["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": "112283007",
        "display": "Escherichia coli",
    }
    assert cwe["status"] == "corrected"
    assert one(multi, "8665-2")["valueDateTime"] == "2025-02-14"
    assert one(multi, "33882-2")["valueDateTime"] == "2025-03-10T07:45:00-07:00"


def test_statuses_map_to_valid_fhir_codes(multi: dict[str, Any]) -> None:
    assert one(multi, "789-8")["status"] == "amended"
    x = one(multi, "30180-4")
    assert x["status"] == "cancelled" and "valueQuantity" not in x
    assert x["dataAbsentReason"]["coding"][0]["code"] == "not-performed"
    assert one(multi, "26478-8")["status"] == "entered-in-error"
    valid = {
        "registered",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "cancelled",
        "entered-in-error",
        "unknown",
    }
    assert set(OBX_STATUS.values()) <= valid
    assert "ammended" not in json.dumps(multi)


def test_sub_id_distinguishes_observations(multi: dict[str, Any]) -> None:
    wbc = by_code(multi, "6690-2")
    assert len(wbc) == 2
    urls = {entry_of(multi, o)["request"]["url"] for o in wbc}
    assert len(urls) == 2


def test_ed_goes_to_presented_form(multi: dict[str, Any]) -> None:
    report = resources(multi, "DiagnosticReport")[2]
    (form,) = report["presentedForm"]
    assert form["contentType"] == "application/pdf"
    assert form["data"] == "JVBERi0xLjQKJSBzeW50aGV0aWMK"
    assert form["creation"] == "2025-03-10T14:15:00-07:00"
    assert len(report["result"]) == 1  # the ED made no Observation
    assert not by_code(multi, "11502-2")


def test_content_types() -> None:
    assert content_type("IM", "JPEG") == "image/jpeg"
    assert content_type("application", "pdf") == "application/pdf"
    assert content_type("NS", "Octet-stream") == "application/octet-stream"
    assert content_type("", "text/rtf") == "text/rtf"
    assert content_type("??", "") == "application/octet-stream"


def test_bad_base64_is_ae_102_under_strict() -> None:
    with pytest.raises(ConversionError) as ei:
        conv(
            MSH,
            PID,
            OBR,
            "OBX|1|ED|11502-2^Report^LN||^application^pdf^Base64^@@not base64@@||||||F",
            strictness="strict",
        )
    assert ei.value.hl7_error == "102"
    assert str(ei.value.location) == "OBX-5.5"


NUMERIC = "OBX|1|NM|2345-7^Glucose^LN||90|mg/dL|||||F"


@pytest.mark.parametrize(
    ("ed", "why"),
    [
        pytest.param("^application^pdf^Base64^@@not base64@@", "is not valid base64 data", id="corrupt"),
        pytest.param(
            "^application^pdf^Base64^JVBERi0xLjQKJSBzeW50aGV0aWMK1", "is not valid base64 data", id="cut"
        ),
        pytest.param("^application^pdf^Hex^25504G", "is not valid hex data", id="hex"),
    ],
)
def test_bad_ed_data_keeps_the_report_without_it_under_lenient(ed: str, why: str) -> None:
    """A truncated or corrupt attachment no longer loses the whole report: the presentedForm keeps its type and
    title without data (valid FHIR), the results are there, and a located warning says what was left out."""
    r = conv(MSH, PID, OBR, NUMERIC, f"OBX|2|ED|11502-2^Report^LN||{ed}||||||F|||20250310141500")
    validate_resources(r.bundle)
    (report,) = resources(r.bundle, "DiagnosticReport")
    assert report["presentedForm"] == [
        {"contentType": "application/pdf", "title": "Report", "creation": "2025-03-10T14:15:00-07:00"}
    ]
    assert len(report["result"]) == 1 and one(r.bundle, "2345-7")["valueQuantity"]["value"] == 90
    assert list(r.warning_kinds) == ["attachment_data_dropped"]
    assert list(r.warnings) == [
        f"OBX(2)-5.5: {why}; the attachment was kept without its data, with its type and title (channel "
        "strictness: lenient); send the data in the encoding OBX-5.4 names"
    ]
    assert r.events["attachment_data_dropped"] == 1
    with pytest.raises(ConversionError) as ei:  # strict: the whole report, as before
        conv(MSH, PID, OBR, NUMERIC, f"OBX|2|ED|11502-2^Report^LN||{ed}||||||F", strictness="strict")
    assert ei.value.hl7_error == "102" and str(ei.value.location) == "OBX(2)-5.5"


def test_bad_ed_outside_a_report_keeps_the_observation_with_data_absent_error() -> None:
    """An ED outside any OBR is an Observation (the R5 valueAttachment extension): kept, its attachment without
    data, and dataAbsentReason ``error`` (it has no value[x])."""
    obx = "OBX|1|ED|11502-2^Report^LN||^application^pdf^Base64^JVBERi0x~^application^pdf^Base64^@@||||||F"
    r = conv(MSH, PID, obx)
    validate_resources(r.bundle)
    obs = one(r.bundle, "11502-2")
    assert [e["valueAttachment"] for e in obs["extension"]] == [
        {"contentType": "application/pdf", "data": "JVBERi0x", "title": "Report"},
        {"contentType": "application/pdf", "title": "Report"},
    ]
    assert "dataAbsentReason" not in obs  # one attachment kept its data
    assert list(r.warning_kinds) == ["attachment_data_dropped"]
    only_bad = conv(MSH, PID, "OBX|1|ED|11502-2^Report^LN||^application^pdf^Base64^@@||||||F")
    validate_resources(only_bad.bundle)
    obs = one(only_bad.bundle, "11502-2")
    assert [e["valueAttachment"] for e in obs["extension"]] == [
        {"contentType": "application/pdf", "title": "Report"}
    ]
    assert obs["dataAbsentReason"]["coding"][0]["code"] == "error"
    assert only_bad.warnings[0].startswith("OBX-5.5: is not valid base64 data; the attachment was kept")
    with pytest.raises(ConversionError) as ei:
        conv(MSH, PID, "OBX|1|ED|11502-2^Report^LN||^application^pdf^Base64^@@||||||F", strictness="strict")
    assert ei.value.hl7_error == "102"


def test_unknown_ed_encoding_keeps_the_report_without_the_data_under_lenient_and_is_ae_103_under_strict() -> (
    None
):
    """An encoding Sluice cannot read (OBX-5.4) is bad data it cannot read either: lenient keeps the report and
    the attachment's type and title, with the located warning; strict rejects (AE 103 at OBX-5.4)."""
    ed = "OBX|1|ED|11502-2^Report^LN||^application^pdf^Base32^MFRGG===||||||F"
    r = conv(MSH, PID, OBR, NUMERIC, ed.replace("OBX|1|", "OBX|2|"))
    validate_resources(r.bundle)
    (report,) = resources(r.bundle, "DiagnosticReport")
    assert report["presentedForm"] == [{"contentType": "application/pdf", "title": "Report"}]
    assert list(r.warning_kinds) == ["attachment_data_dropped"]
    assert r.warnings[0].startswith(
        "OBX(2)-5.4: names an unknown ED encoding (use Base64, Hex or A); the attachment"
    )
    with pytest.raises(ConversionError) as ei:
        conv(MSH, PID, OBR, ed, strictness="strict")
    assert ei.value.hl7_error == "103" and str(ei.value.location) == "OBX-5.4"


@pytest.mark.parametrize(
    ("sent", "data"),
    [
        pytest.param("U3ludGhldGljIG5vdGU", "U3ludGhldGljIG5vdGU=", id="one-missing"),
        pytest.param("U3ludGhldGljIHJlcG9ydA", "U3ludGhldGljIHJlcG9ydA==", id="two-missing"),
    ],
)
def test_base64_without_its_padding_is_read_and_written_padded(sent: str, data: str) -> None:
    """Encoders that strip the '=' (RFC 4648 3.2): the length says what is missing; FHIR gets the padded form."""
    r = conv(MSH, PID, OBR, f"OBX|1|ED|11502-2^Report^LN||^TEXT^XML^Base64^{sent}||||||F")
    validate_resources(r.bundle)
    (form,) = resources(r.bundle, "DiagnosticReport")[0]["presentedForm"]
    assert form["data"] == data
    assert r.events["base64_padding_added"] == 1


def test_base64_with_a_character_too_few_is_still_ae_102() -> None:
    """A length that no padding can explain (4n+1 characters: a character lost) stays a located error (under
    strict; lenient keeps the report without the data: test_bad_ed_data_keeps_the_report_without_it_under_lenient)."""
    with pytest.raises(ConversionError) as ei:
        conv(
            MSH,
            PID,
            OBR,
            "OBX|1|ED|11502-2^Report^LN||^TEXT^XML^Base64^U3ludGhldGljIG5vdGUx1||||||F",
            strictness="strict",
        )
    assert ei.value.hl7_error == "102" and str(ei.value.location) == "OBX-5.5"


# ---------------------------------------------------------------------------
# identity, corrections, guards
# ---------------------------------------------------------------------------
def test_correction_updates_the_same_observation() -> None:
    first = _convert(load("oru_r01_multi"), golden_settings())
    corr = _convert(load("oru_r01_correction"), golden_settings())
    g1, g2 = one(first.bundle, "2345-7"), one(corr.bundle, "2345-7")
    e1, e2 = entry_of(first.bundle, g1), entry_of(corr.bundle, g2)
    assert e1["request"]["url"] == e2["request"]["url"]
    assert e1["fullUrl"] == e2["fullUrl"]
    assert g2["status"] == "corrected" and g2["valueQuantity"]["value"] == 128
    # OBR-25 C turns the F results of the corrected report into corrected ones
    assert one(corr.bundle, "2160-0")["status"] == "corrected"
    (rep,) = resources(corr.bundle, "DiagnosticReport")
    assert rep["status"] == "corrected"
    assert entry_of(corr.bundle, rep)["request"]["url"] == f"DiagnosticReport?identifier={FILLER}|FIL5001"
    guards1, guards2 = dict(first.guards), dict(corr.guards)
    key = e1["request"]["url"]
    assert guards2[key] > guards1[key]


def test_late_preliminary_has_lower_guard_rank_than_final() -> None:
    first = _convert(load("oru_r01_multi"), golden_settings())
    late = _convert(load("oru_r01_late_preliminary"), golden_settings())
    o1, o2 = one(first.bundle, "2345-7"), one(late.bundle, "2345-7")
    key = entry_of(first.bundle, o1)["request"]["url"]
    assert entry_of(late.bundle, o2)["request"]["url"] == key
    assert dict(late.guards)[key] < dict(first.guards)[key]
    report_key = f"DiagnosticReport?identifier={FILLER}|FIL5001"
    assert dict(late.guards)[report_key] < dict(first.guards)[report_key]


def test_every_observation_and_report_is_guarded() -> None:
    r = _convert(load("oru_r01_multi"), golden_settings())
    keys = {
        e["request"]["url"]
        for e in r.bundle["entry"]
        if e["resource"]["resourceType"] in ("Observation", "DiagnosticReport")
    }
    assert keys == {k for k, _ in r.guards}


def test_rank_order() -> None:
    o = OBSERVATION_STATUS_RANK
    assert o["final"] > o["preliminary"] > o["registered"]
    assert o["corrected"] > o["final"] and o["amended"] > o["final"]
    d = DIAGNOSTIC_REPORT_STATUS_RANK
    assert d["final"] > d["preliminary"] > d["registered"] and d["corrected"] > d["final"]


def test_resend_is_identical() -> None:
    a = conv(MSH, PID, OBR, "OBX|1|NM|2345-7^Glucose^LN||90|mg/dL^^UCUM||||||F")
    b = conv(MSH, PID, OBR, "OBX|1|NM|2345-7^Glucose^LN||90|mg/dL^^UCUM||||||F")
    assert a.bundle == b.bundle


def test_filler_falls_back_to_placer() -> None:
    r = conv(
        MSH,
        PID,
        "OBR|1|PLC9^^2.16.840.1.113883.19.999.3^ISO||24323-8^Panel^LN",
        "OBX|1|NM|2345-7^Glucose^LN||90||||||F",
    )
    (rep,) = resources(r.bundle, "DiagnosticReport")
    assert (
        entry_of(r.bundle, rep)["request"]["url"]
        == "DiagnosticReport?identifier=urn:oid:2.16.840.1.113883.19.999.3|PLC9"
    )


def test_no_order_number_is_ae_101_under_strict() -> None:
    with pytest.raises(ConversionError) as ei:
        conv(
            MSH, PID, "OBR|1|||24323-8^Panel^LN", "OBX|1|NM|2345-7^Glucose^LN||90||||||F", strictness="strict"
        )
    assert ei.value.hl7_error == "101" and str(ei.value.location) == "OBR-3"


def test_obrs_sharing_an_order_number_are_reports_of_their_own() -> None:
    """A lab sends a culture and its susceptibility panel (and other tests) under one filler number: each OBR is
    its own DiagnosticReport with its own results (keyed by number + OBR-4, ``report_duplicate_number``), not
    one report whose later results are orphaned and whose effective[x] is set twice (invalid FHIR)."""
    segments = (
        MSH,
        PID,
        "OBR|1||FIL9^SYNLAB^2.16.840.1.113883.19.999.2^ISO|600-7^Culture^LN|||20250310080000|20250310090000",
        "OBX|1|CWE|11475-1^Organism^LN|1|3092008^Staphylococcus aureus^SCT||||||F",
        "OBR|2||FIL9^SYNLAB^2.16.840.1.113883.19.999.2^ISO|^^^SUSC^Susceptibility panel^L|||20250310080000",
        "OBX|1|CWE|28-1^Ampicillin^LN|1|R^Resistant^HL70078||||||F",
        "OBX|2|CWE|84-4^Cefaclor^LN|1|S^Susceptible^HL70078||||||F",
        "OBR|3||FIL9^SYNLAB^2.16.840.1.113883.19.999.2^ISO|^^^GC^GC probe^L|||20250310080000",
        "OBX|1|CWE|11475-1^Organism^LN|1|260385009^Negative^SCT||||||F",
    )
    r = conv(*segments)
    validate_resources(r.bundle)
    entries = [e for e in r.bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"]
    assert len(entries) == 3 and len({e["request"]["url"] for e in entries}) == 3
    assert [len(e["resource"]["result"]) for e in entries] == [1, 2, 1]
    # the first keeps the number's own identity; the others carry it and are keyed apart
    assert entries[0]["request"]["url"] == f"DiagnosticReport?identifier={FILLER}|FIL9"
    assert all(any(i["value"] == "FIL9" for i in e["resource"]["identifier"]) for e in entries)
    assert "effectivePeriod" in entries[0]["resource"] and "effectivePeriod" not in entries[1]["resource"]
    # the same OBX code under two OBRs: two Observations, each in its own report
    organisms = by_code(r.bundle, "11475-1")
    assert len(organisms) == 2
    assert list(r.warning_kinds) == ["report_duplicate_number"]  # once per shared number
    assert r.warnings[0].startswith("OBR(2)-3:") and "FIL9" not in r.warnings[0]
    assert r.events["report_duplicate_number"] == 2
    orders = [e for e in r.bundle["entry"] if e["resource"]["resourceType"] == "ServiceRequest"]
    assert len({e["request"]["ifNoneExist"] for e in orders}) == 3
    # a resend is the same bundle
    again = conv(*segments)
    assert [e["request"] for e in again.bundle["entry"]] == [e["request"] for e in r.bundle["entry"]]


def test_later_obrs_with_one_number_and_one_code_merge_into_one_valid_report() -> None:
    """Two later OBRs with the first one's number and one same OBR-4 are one report (merged, first wins): the
    third OBR's effectiveDateTime is not added beside the second one's effectivePeriod (one type per choice
    element, else invalid FHIR)."""
    obr = "OBR|{n}||FIL8^SYNLAB^2.16.840.1.113883.19.999.2^ISO|{code}|||20250310080000{end}"
    r = conv(
        MSH,
        PID,
        obr.format(n=1, code="24323-8^Panel^LN", end=""),
        "OBX|1|NM|2345-7^Glucose^LN||90|mg/dL|||||F",
        obr.format(n=2, code="24331-1^Lipid panel^LN", end="|20250310090000"),
        "OBX|1|NM|2093-3^Cholesterol^LN||180|mg/dL|||||F",
        obr.format(n=3, code="24331-1^Lipid panel^LN", end=""),
        "OBX|1|NM|2571-8^Triglyceride^LN||120|mg/dL|||||F",
    )
    validate_resources(r.bundle)
    first, lipid = resources(r.bundle, "DiagnosticReport")
    assert [k for k in lipid if k.startswith("effective")] == ["effectivePeriod"]
    assert "effectiveDateTime" in first
    # the merged OBR's results join the report's
    assert len(lipid["result"]) == 2 and len(first["result"]) == 1


def test_an_observation_end_before_its_start_keeps_the_start_with_a_warning() -> None:
    """OBR-8 a second before OBR-7 (FHIR per-1: a period cannot end before it starts; the models do not check
    it): the report's effective[x] and the OBR's Specimen collection keep OBR-7, each with a located warning."""
    r = conv(
        MSH,
        PID,
        "OBR|1||FIL7^SYNLAB^2.16.840.1.113883.19.999.2^ISO|630-4^Urine culture^LN|||20250310175501|20250310175500",
        "OBX|1|CWE|630-4^Urine culture^LN||260385009^Negative^SCT||||||F",
    )
    validate_resources(r.bundle)
    (report,) = resources(r.bundle, "DiagnosticReport")
    assert report["effectiveDateTime"] == "2025-03-10T17:55:01-07:00" and "effectivePeriod" not in report
    (specimen,) = resources(r.bundle, "Specimen")
    assert specimen["collection"] == {"collectedDateTime": "2025-03-10T17:55:01-07:00"}
    assert sorted(r.warning_kinds) == ["collection_end_before_start", "report_end_before_start"]
    assert all(w.startswith("OBR-8:") for w in r.warnings)
    # in order: a period, no warning
    ok = conv(MSH, PID, OBR + "|20250310090000", "OBX|1|NM|2345-7^Glucose^LN||90|mg/dL|||||F")
    assert (
        resources(ok.bundle, "DiagnosticReport")[0]["effectivePeriod"]["end"] == "2025-03-10T09:00:00-07:00"
    )
    assert not ok.warnings


def test_producer_id_names_the_performing_lab_when_obx23_does_not() -> None:
    """OBX-15 (v2.3-2.5 labs put their CLIA number there) → performer Organization (IG OBX[Observation],
    CWE[Organization]), one per message for the same value; OBX-23 wins when it is valued."""
    lab = "99D9999999^SYNTH REFERENCE LAB^CLIA"
    r = conv(
        MSH,
        PID,
        OBR,
        f"OBX|1|NM|2345-7^Glucose^LN||90|mg/dL|||||F|||20250310080000|{lab}",
        f"OBX|2|NM|2951-2^Sodium^LN||140|mmol/L|||||F|||20250310080000|{lab}",
    )
    validate_resources(r.bundle)
    (org,) = resources(r.bundle, "Organization")
    assert org["identifier"] == [{"system": "urn:oid:2.16.840.1.113883.4.7", "value": "99D9999999"}]
    assert org["name"] == "SYNTH REFERENCE LAB"
    full_url = next(e["fullUrl"] for e in r.bundle["entry"] if e["resource"] is org)
    for code in ("2345-7", "2951-2"):
        assert one(r.bundle, code)["performer"] == [{"reference": full_url, "display": "SYNTH REFERENCE LAB"}]
    both = conv(
        MSH,
        PID,
        OBR,
        f"OBX|1|NM|2345-7^Glucose^LN||90|mg/dL|||||F|||20250310080000|{lab}||||||||SYNTH HOSPITAL LAB",
    )
    (org2,) = resources(both.bundle, "Organization")
    assert org2["name"] == "SYNTH HOSPITAL LAB"


def test_observation_type_is_a_category() -> None:
    """IG OBX-29 observation type → category (v2-0936): an ask-at-order-entry answer (QST) is told from a
    result (RSLT), beside the laboratory category OBR-24 gives."""
    r = conv(
        MSH,
        PID,
        OBR + "|" * 17 + "LAB",  # OBR-24 diagnostic section
        "OBX|1|NM|2345-7^Glucose^LN||90|mg/dL|||||F" + "|" * 18 + "RSLT",  # OBX-29
        "OBX|2|CWE|95418-0^Employed in a healthcare setting^LN||N^No^HL70136||||||F" + "|" * 18 + "QST",
    )
    validate_resources(r.bundle)
    table = "http://terminology.hl7.org/CodeSystem/v2-0936"
    result, question = one(r.bundle, "2345-7"), one(r.bundle, "95418-0")
    assert result["category"][0]["coding"][0]["code"] == "laboratory"
    assert result["category"][1] == {"coding": [{"system": table, "code": "RSLT"}]}
    assert question["category"][1] == {"coding": [{"system": table, "code": "QST"}]}


def test_no_order_number_at_all_is_keyed_by_message_under_lenient() -> None:
    """An EMR's form observations (OBR with no placer, filler or group number, ORC with none either): lenient
    channels convert them, the report keyed by sender + MSH-10 + OBR set id and code, with a located warning;
    a resend meets the same report, another message (or another OBR of this one) does not."""
    segs = (MSH, PID, "ORC|RE||||||||20250310142500", "OBR|1|||1238^FORM OBSERVATIONS^L")
    obx = ("OBX|1|NM|2345-7^Glucose^LN||90|mg/dL|||||F", "OBX|2|DT|5096^RETURN VISIT DATE^L||20250401||||||F")
    r = conv(*segs, *obx)
    validate_resources(r.bundle)
    (report,) = [e for e in r.bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"]
    assert report["request"]["method"] == "PUT"
    assert report["request"]["url"].startswith("DiagnosticReport?identifier=urn:sluice:key|")
    assert "basedOn" not in report["resource"]
    assert len(report["resource"]["result"]) == 2
    assert one(r.bundle, "2345-7")["valueQuantity"]["value"] == 90
    assert list(r.warning_kinds) == ["report_keyed_by_message"]
    assert r.warnings[0].startswith("OBR-3:") and "MSH-10" in r.warnings[0] and "1238" not in r.warnings[0]
    again = conv(*segs, *obx)
    assert [e["request"] for e in again.bundle["entry"]] == [e["request"] for e in r.bundle["entry"]]
    other = conv(MSH.replace("|C1|", "|C2|"), *segs[1:], *obx)
    (report2,) = [e for e in other.bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"]
    assert report2["request"]["url"] != report["request"]["url"]
    two = conv(*segs, obx[0], "OBR|2|||1238^FORM OBSERVATIONS^L", obx[1])
    reports = [e for e in two.bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"]
    assert len({e["request"]["url"] for e in reports}) == 2


def test_report_without_obr_4_has_a_data_absent_code_under_lenient() -> None:
    """A monitor's vital signs or an EMR's form results with an empty OBR-4 (the results carry the codes):
    lenient channels convert them, DiagnosticReport.code (1..1) being the data-absent-reason extension, with
    a located warning at OBR-4; the ServiceRequest gets no code (0..1).  Strict channels reject: AE 101."""
    segs = (MSH, PID, "OBR|1|PLC7^SYNEHR|FIL7^SYNLAB^2.16.840.1.113883.19.999.2^ISO||||20250310080000")
    obx = (
        "OBX|1|NM|8867-4^Heart rate^LN||72|/min|||||F",
        "OBX|2|NM|9279-1^Respiratory rate^LN||14|/min|||||F",
    )
    r = conv(*segs, *obx)
    validate_resources(r.bundle)
    (report,) = resources(r.bundle, "DiagnosticReport")
    assert report["code"] == {
        "extension": [
            {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}
        ]
    }
    assert len(report["result"]) == 2 and one(r.bundle, "8867-4")["valueQuantity"]["value"] == 72
    (order,) = resources(r.bundle, "ServiceRequest")
    assert "code" not in order
    assert list(r.warning_kinds) == ["report_code_missing"]
    assert r.warnings[0].startswith("OBR-4:")
    with pytest.raises(ConversionError) as ei:
        conv(*segs, *obx, strictness="strict")
    assert ei.value.hl7_error == "101" and str(ei.value.location) == "OBR-4"


def test_patient_without_authority_is_ae_204() -> None:
    with pytest.raises(ConversionError) as ei:
        conv(MSH, "PID|1||MRN1^^^^MR||DOE^JAN", OBR, "OBX|1|NM|2345-7^Glucose^LN||90||||||F")
    assert ei.value.hl7_error == "204"


# ---------------------------------------------------------------------------
# dates
# ---------------------------------------------------------------------------
def test_invalid_date_is_ae_102_with_location() -> None:
    with pytest.raises(ConversionError) as ei:
        conv(MSH, PID, OBR, "OBX|1|NM|2345-7^Glucose^LN||90||||||F|||20251341", strictness="strict")
    assert ei.value.hl7_error == "102"
    assert ei.value.location is not None and str(ei.value.location) == "OBX-14"


def test_invalid_date_is_dropped_when_lenient() -> None:
    r = conv(MSH, PID, OBR, "OBX|1|NM|2345-7^Glucose^LN||90||||||F|||20251341")
    (obs,) = by_code(r.bundle, "2345-7")
    assert obs["valueQuantity"]["value"] == 90  # OBX-14 left out: the time falls back to OBR-7
    assert r.warnings[0].startswith("OBX-14: ") and r.warning_kinds == ("field_dropped",)


def test_one_bad_value_repeated_on_every_result_is_one_dropped_field() -> None:
    """A sender's systematic fault (the same impossible date in OBX-14 of every result of a large panel) is one
    bad value: left out of every OBX holding it in one pass, one warning, one of the 20 allowed; a different bad
    value is a second one, and a valid OBX-14 is kept."""
    same = [f"OBX|{i}|NM|{1000 + i}-1^Analyte {i}^LN||{i}||||||F|||20170229" for i in range(1, 26)]
    valid = "OBX|26|NM|1026-1^Analyte 26^LN||26||||||F|||20250310093000"
    other = "OBX|27|NM|1027-1^Analyte 27^LN||27||||||F|||20251341"
    with pytest.raises(ConversionError) as ei:
        conv(MSH, PID, OBR, *same, valid, other, strictness="strict")
    assert ei.value.hl7_error == "102" and str(ei.value.location) == "OBX-14"
    r = conv(MSH, PID, OBR, *same, valid, other)
    assert len(resources(r.bundle, "Observation")) == 27
    assert r.warning_kinds == ("field_dropped", "field_dropped")
    assert "OBX-14 was left out (and from 24 more OBX with the same value)" in r.warnings[0]
    assert r.warnings[1].startswith("OBX(27)-14: ") and "more OBX" not in r.warnings[1]
    assert one(r.bundle, "1026-1")["effectiveDateTime"].startswith("2025-03-10T09:30:00")
    assert (
        one(r.bundle, "1001-1")["effectiveDateTime"] == one(r.bundle, "1027-1")["effectiveDateTime"]
    )  # OBR-7


def test_more_than_twenty_different_bad_values_are_still_a_rejection() -> None:
    bad = [f"OBX|{i}|NM|{1000 + i}-1^Analyte {i}^LN||{i}||||||F|||2025{i:02d}99" for i in range(1, 22)]
    with pytest.raises(ConversionError) as ei:
        conv(MSH, PID, OBR, *bad)  # lenient: 21 different impossible dates
    assert ei.value.hl7_error == "102"


@pytest.mark.parametrize(
    ("vtype", "sent", "why"),
    [
        pytest.param("DT", "20230229", "no such date", id="impossible-date"),
        pytest.param("DT", "99999999", "no such date", id="placeholder"),
        pytest.param("TS", "2025031012300045", "expected YYYY", id="fraction-without-dot"),
    ],
)
def test_a_date_result_that_is_no_date_is_kept_as_text_when_lenient(vtype: str, sent: str, why: str) -> None:
    """OBX-5 is a key (a result is never sent without its value), so a DT/TS result that is not a valid HL7
    date is not left out: under lenient it is kept as sent in valueString with a located warning, as an NM that
    is not a number; strict rejects it (AE 102 at OBX-5).  The message's other results convert as usual."""
    segs = (
        MSH,
        PID,
        OBR,
        f"OBX|1|{vtype}|11368-8^Illness onset^LN||{sent}||||||F",
        "OBX|2|NM|2345-7^Glucose^LN||90||||||F",
    )
    r = conv(*segs)
    validate_resources(r.bundle)
    onset = one(r.bundle, "11368-8")
    assert onset["valueString"] == sent and "valueDateTime" not in onset
    assert one(r.bundle, "2345-7")["valueQuantity"]["value"] == 90
    assert list(r.warning_kinds) == ["obx_date_kept_as_text"]
    assert (
        r.warnings[0].startswith("OBX-5: is not a valid HL7 date/time (" + why) and sent not in r.warnings[0]
    )
    with pytest.raises(ConversionError) as ei:
        conv(*segs, strictness="strict")
    assert ei.value.hl7_error == "102" and str(ei.value.location) == "OBX-5"
    # a valid date stays a valueDateTime, without a warning
    ok = conv(MSH, PID, OBR, "OBX|1|DT|11368-8^Illness onset^LN||20250228||||||F")
    assert one(ok.bundle, "11368-8")["valueDateTime"] == "2025-02-28" and not ok.warnings


def test_a_time_result_that_is_no_time_is_kept_as_text_when_lenient() -> None:
    """A TM result (OBX-5) that is no time of day: kept as sent under lenient, with the date results' warning."""
    segs = (MSH, PID, OBR, "OBX|1|TM|11368-8^Onset time^LN||2575||||||F")
    r = conv(*segs)
    validate_resources(r.bundle)
    got = one(r.bundle, "11368-8")
    assert got["valueString"] == "2575" and "valueTime" not in got
    assert list(r.warning_kinds) == ["obx_date_kept_as_text"] and "2575" not in r.warnings[0]
    with pytest.raises(ConversionError) as ei:
        conv(*segs, strictness="strict")
    assert ei.value.hl7_error == "102" and str(ei.value.location) == "OBX-5"
    ok = conv(MSH, PID, OBR, "OBX|1|TM|11368-8^Onset time^LN||0830||||||F")
    assert one(ok.bundle, "11368-8")["valueTime"] == "08:30:00" and not ok.warnings


def test_site_time_zone_is_dst_correct() -> None:
    r = conv(
        MSH,
        PID,
        OBR,
        "OBX|1|NM|2345-7^Glucose^LN||90||||||F|||20250115120000",
        "OBX|2|NM|718-7^Hb^LN||13||||||F|||20250715120000",
        site_tz="Europe/Berlin",
    )
    assert one(r.bundle, "2345-7")["effectiveDateTime"] == "2025-01-15T12:00:00+01:00"
    assert one(r.bundle, "718-7")["effectiveDateTime"] == "2025-07-15T12:00:00+02:00"


def test_explicit_offset_is_kept() -> None:
    r = conv(MSH, PID, OBR, "OBX|1|NM|2345-7^Glucose^LN||90||||||F|||202501151200+0530")
    assert one(r.bundle, "2345-7")["effectiveDateTime"] == "2025-01-15T12:00:00+05:30"


# ---------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------
def test_non_numeric_nm_is_kept_as_string() -> None:
    r = conv(MSH, PID, OBR, "OBX|1|NM|2345-7^Glucose^LN||see note||||||F")
    assert one(r.bundle, "2345-7")["valueString"] == "see note"
    assert r.events["obx_value_not_numeric"] == 1


def test_repeated_value_becomes_components() -> None:
    r = conv(MSH, PID, OBR, "OBX|1|NM|8867-4^Heart rate^LN||72~75|/min^^UCUM|||||F")
    obs = one(r.bundle, "8867-4")
    assert [c["valueQuantity"]["value"] for c in obs["component"]] == [72, 75]
    validate_resources(r.bundle)


def test_obr_y_is_ae_103() -> None:
    with pytest.raises(ConversionError) as ei:
        conv(MSH, PID, OBR + "||||||||||||||||||Y", "OBX|1|NM|2345-7^Glucose^LN||90||||||F")
    assert ei.value.hl7_error == "103"


def test_empty_obr25_is_derived_from_results() -> None:
    r = conv(MSH, PID, OBR, "OBX|1|NM|2345-7^Glucose^LN||90||||||P", "OBX|2|NM|718-7^Hb^LN||13||||||F")
    assert resources(r.bundle, "DiagnosticReport")[0]["status"] == "preliminary"


def test_no_pid_is_a_located_error() -> None:
    with pytest.raises(ConversionError) as ei:
        conv(MSH, OBR, "OBX|1|NM|2345-7^Glucose^LN||90||||||F")
    assert ei.value.location is not None and ei.value.location.segment == "PID"


def test_html_in_notes_is_stripped_and_truncated() -> None:
    r = conv(
        MSH,
        PID,
        OBR,
        "OBX|1|ST|8251-1^Comment^LN||x||||||F",
        "NTE|1||<b>Bold</b> remark " + "y" * 100,
        note_max_length=40,
    )
    text = one(r.bundle, "8251-1")["note"][0]["text"]
    assert text.startswith("Bold remark") and text.endswith("[truncated]") and len(text) == 40


# ---------------------------------------------------------------------------
# robustness: random and mutated messages raise only SluiceError
# ---------------------------------------------------------------------------
_BASE = load("oru_r01_multi").text


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_messages_never_raise_anything_else(data: st.DataObject) -> None:
    text = _BASE
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(text) - 1))
        op = data.draw(st.sampled_from(["delete", "insert", "replace"]))
        ch = data.draw(st.sampled_from([*list("|^~\\&\r0123456789ABCDEFXZ .-+<>:/"), "\\.br\\", "\\X0D\\"]))
        if op == "delete":
            text = text[:i] + text[i + 1 :]
        elif op == "insert":
            text = text[:i] + ch + text[i:]
        else:
            text = text[:i] + ch + text[i + 1 :]
    try:
        m = parse(text)
        result = _convert(m, golden_settings())
    except SluiceError:
        return
    validate_resources(result.bundle)


@hsettings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="|^~&\\0123456789ABNMSTEDCWX.-<>", max_size=40), min_size=1, max_size=6))
def test_random_obx_never_raise_anything_else(fields: list[str]) -> None:
    with contextlib.suppress(SluiceError):
        _convert(msg(MSH, PID, OBR, "OBX|" + "|".join(fields)), golden_settings())


def test_convert_report_wraps_everything() -> None:
    r = convert_report(load("oru_r01_multi"), golden_settings())
    assert r.resource_types[:1] == ("Patient",)


# ---------------------------------------------------------------------------
# drift safety: ORU never overwrites the ADT-owned Patient/Encounter
# ---------------------------------------------------------------------------
def test_oru_patient_and_encounter_are_conditional_creates() -> None:
    bundle = _convert(load("oru_r01_multi"), golden_settings()).bundle
    for e in bundle["entry"]:
        rtype, req = e["resource"]["resourceType"], e["request"]
        if rtype in ("Patient", "Encounter", "ServiceRequest"):
            assert req["method"] == "POST" and req["url"] == rtype
            assert req["ifNoneExist"].startswith("identifier=")
    reports = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"]
    assert reports and all(r["basedOn"] for r in reports)


# ---------------------------------------------------------------------------
# IG ORC/OBR[ServiceRequest] and OBR[DiagnosticReport] details
# ---------------------------------------------------------------------------
def _obr(**fields: str) -> str:
    parts = OBR.split("|")
    parts += [""] * (54 - len(parts))
    for k, v in fields.items():
        parts[int(k[1:])] = v
    return "|".join(parts).rstrip("|")


def _orc(**fields: str) -> str:
    parts = ["ORC", "RE", "PLC1^SYNEHR", "FIL1^SYNLAB^2.16.840.1.113883.19.999.2^ISO"] + [""] * 30
    for k, v in fields.items():
        parts[int(k[1:])] = v
    return "|".join(parts).rstrip("|")


def _order(bundle: dict[str, Any]) -> dict[str, Any]:
    (sr,) = resources(bundle, "ServiceRequest")
    return sr


def test_service_request_status_orc5_then_orc1() -> None:
    """IG: ORC-5 (OrderStatus) wins; ORC-1 (OrderControlCode) only IF ORC-5 NOT VALUED; no ORC → unknown."""
    obx = "OBX|1|NM|2345-7^Glucose^LN||95|mg/dL|||||F"
    assert _order(conv(MSH, PID, _orc(f1="NW", f5="CM"), OBR, obx).bundle)["status"] == "completed"
    assert _order(conv(MSH, PID, _orc(f1="NW"), OBR, obx).bundle)["status"] == "active"
    assert _order(conv(MSH, PID, _orc(f1="OC"), OBR, obx).bundle)["status"] == "revoked"
    assert _order(conv(MSH, PID, OBR, obx).bundle)["status"] == "unknown"


def test_service_request_obr_and_orc_fields() -> None:
    """IG OBR[ServiceRequest]: OBR-6 occurrence, OBR-31 reasonCode, OBR-46/47 orderDetail, OBR-53 PLAC
    identifier, OBR-11 G → reflex-order; ORC[ServiceRequest]: ORC-4 requisition (PGN), ORC-29
    locationCode, ORC-9 authoredOn only for ORC-1 NW."""
    m = (
        MSH,
        PID,
        _orc(f1="RE", f4="GRP7^SYNEHR", f9="20250309100000", f29="O^Outpatient^HL70482"),
        _obr(
            f6="20250309120000",
            f11="G",
            f31="R07.9^Chest pain^I10",
            f46="PSS^Placer svc^L",
            f47="FSS^Filler svc^L",
            f53="ALT9^^^SYNEHR&2.16.840.1.113883.19.999.3&ISO",
        ),
        "OBX|1|NM|2345-7^Glucose^LN||95|mg/dL|||||F",
    )
    bundle = conv(*m).bundle
    validate_resources(bundle)
    sr = _order(bundle)
    assert sr["intent"] == "reflex-order"
    assert sr["occurrenceDateTime"] == "2025-03-09T12:00:00-07:00"
    assert sr["reasonCode"][0]["coding"][0]["code"] == "R07.9"
    assert [d["coding"][0]["code"] for d in sr["orderDetail"]] == ["PSS", "FSS"]
    assert sr["requisition"]["value"] == "GRP7"
    assert sr["requisition"]["type"]["coding"][0]["code"] == "PGN"
    assert sr["locationCode"][0]["coding"][0]["code"] == "O"
    (alt,) = [i for i in sr["identifier"] if i["value"] == "ALT9"]
    assert alt["value"] == "ALT9" and alt["system"] == "urn:oid:2.16.840.1.113883.19.999.3"
    assert alt["type"]["coding"][0]["code"] == "PLAC"
    assert "authoredOn" not in sr  # ORC-1 RE: ORC-9 is the transaction time, not the order's
    (dr,) = resources(bundle, "DiagnosticReport")
    pgn = [i for i in dr["identifier"] if i["type"]["coding"][0]["code"] == "PGN"]
    assert [i["value"] for i in pgn] == ["GRP7"]  # IG ORC[DiagnosticReport]: ORC-4 → identifier
    # identity is unchanged: the same order without the new fields has the same conditional key
    plain = conv(MSH, PID, _orc(), OBR, "OBX|1|NM|2345-7^Glucose^LN||95|mg/dL|||||F").bundle
    assert entry_of(bundle, sr)["request"] == entry_of(plain, _order(plain))["request"]
    new = conv(
        MSH, PID, _orc(f1="NW", f9="20250309100000"), OBR, "OBX|1|NM|2345-7^Glucose^LN||95|mg/dL|||||F"
    )
    assert _order(new.bundle)["authoredOn"] == "2025-03-09T10:00:00-07:00"


def test_orc4_eip_gives_placer_and_filler_group_numbers() -> None:
    m = (MSH, PID, _orc(f4="GRP7&SYNEHR^FGRP8&SYNLAB"), OBR, "OBX|1|NM|2345-7^Glucose^LN||95|mg/dL|||||F")
    bundle = conv(*m).bundle
    (dr,) = resources(bundle, "DiagnosticReport")
    assert [i["value"] for i in dr["identifier"] if i["type"]["coding"][0]["code"] == "PGN"] == [
        "GRP7",
        "FGRP8",
    ]
    assert _order(bundle)["requisition"]["value"] == "GRP7"


def test_obr_interpreter_technician_transcriptionist() -> None:
    """IG OBR[DiagnosticReport]: OBR-32 → resultsInterpreter, OBR-34/35 → performer with the
    event-performerFunction extension SPRF / TRANS; each a Practitioner keyed by id + authority."""
    lab = "SYNLAB&2.16.840.1.113883.19.999.2&ISO"
    m = (
        MSH,
        PID,
        _obr(f25="F", f32=f"4455&LABDOC&LEE&&&&&&{lab}", f34=f"77&TECH&TERRY&&&&&&{lab}", f35="&TYPIST&TINA"),
        "OBX|1|NM|2345-7^Glucose^LN||95|mg/dL|||||F",
    )
    bundle = conv(*m).bundle
    validate_resources(bundle)
    (dr,) = resources(bundle, "DiagnosticReport")
    pracs = {
        p["identifier"][0]["value"]: entry_of(bundle, p)["fullUrl"] for p in resources(bundle, "Practitioner")
    }
    assert dr["resultsInterpreter"][0]["reference"] == pracs["4455"]
    tech, typist = dr["performer"]
    assert tech["reference"] == pracs["77"]
    assert tech["extension"][0]["valueCodeableConcept"]["coding"][0]["code"] == "SPRF"
    assert typist["display"] == "TINA TYPIST"  # no id: a display-only reference, no Practitioner
    assert typist["extension"][0]["valueCodeableConcept"]["coding"][0]["code"] == "TRANS"
    assert set(pracs) == {"4455", "77"}


def test_trigger_with_escaped_line_break_gives_a_valid_provenance() -> None:
    """MSH-9.2 holding an escaped line break (found by the mutation test): the Provenance activity code
    is normalised to a valid FHIR code instead of failing validation."""
    m = msg(
        "MSH|^~\\&|LAB|HOSP|SLUICE|SLUICE|20250315143000||ORU^R\\.br\\01|C1|P|2.5.1",
        "PID|1||MRN1^^^HOSP^MR||DOE^JANE||19800101|F",
        "OBR|1|PL1|FL1|1234-5^Test^LN|||20250315080000||||||||||||||20250315120000|||F",
        "OBX|1|NM|1234-5^Test^LN||5|mg||||||F",
    )
    bundle = _convert(m, golden_settings()).bundle
    validate_resources(bundle)
    (prov,) = resources(bundle, "Provenance")
    assert prov["activity"]["coding"][0]["code"] == "R 01"


def test_order_timing_priority_and_type_of_a_result_message() -> None:
    """The ORDER_OBSERVATION's TQ1 (TQ1[ServiceRequest]: TQ1-3 repeat pattern, TQ1-7/8 bounds, TQ1-9 priority) and
    ORC-29 order type (table 0482, with the v3 service delivery location) go on the ServiceRequest the report is
    basedOn, as in the order messages."""
    orc = "ORC|RE|PLC1^SYNEHR|FIL1^SYNLAB^2.16.840.1.113883.19.999.2^ISO" + "|" * 26 + "O"
    tq1 = "TQ1|1||P&Post (after)&HL70335||||20250310080000|20250311080000|S"
    b = conv(MSH, PID, orc, OBR, tq1, "OBX|1|NM|2345-7^Glucose^LN||90|mg/dL|||||F").bundle
    (sr,) = resources(b, "ServiceRequest")
    assert sr["priority"] == "stat"
    assert sr["occurrenceTiming"]["code"]["coding"] == [
        {"system": "http://terminology.hl7.org/CodeSystem/v2-0335", "code": "P"}
    ]
    assert set(sr["occurrenceTiming"]["repeat"]["boundsPeriod"]) == {"start", "end"}
    assert sr["locationCode"][0]["coding"] == [
        {"system": "http://terminology.hl7.org/CodeSystem/v2-0482", "code": "O"},
        {
            "system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
            "code": "OF",
            "display": "Outpatient facility",
        },
    ]
    # without TQ1: OBR-6 requested time, no priority (as before)
    (plain,) = resources(
        conv(MSH, PID, OBR.replace("|||20250310080000", "||20250310070000|20250310080000")).bundle,
        "ServiceRequest",
    )
    assert "priority" not in plain and "occurrenceTiming" not in plain and plain["occurrenceDateTime"]


def test_obr29_parent_is_the_orders_based_on() -> None:
    """IG OBR[ServiceRequest]: OBR-29 parent (EIP) → ServiceRequest.basedOn the parent order, which is only made
    sure to exist (a conditional create with status unknown), as in the order messages."""
    obr = OBR + "|" * 22 + "PAR1&SYNEHR&2.16.840.1.113883.19.999.7&ISO^PFIL1"
    b = conv(MSH, PID, obr, "OBX|1|NM|2345-7^Glucose^LN||90|mg/dL|||||F").bundle
    entries = {e["fullUrl"]: e for e in b["entry"]}
    srs = [e for e in b["entry"] if e["resource"]["resourceType"] == "ServiceRequest"]
    (child,) = [e["resource"] for e in srs if "basedOn" in e["resource"]]
    parent = entries[child["basedOn"][0]["reference"]]
    assert parent["request"]["method"] == "POST" and parent["resource"]["status"] == "unknown"
    assert {i["value"] for i in parent["resource"]["identifier"]} == {"PAR1", "PFIL1"}


def test_obx_prt_person_is_a_performer_and_its_notes_stay_notes() -> None:
    """IG OBSERVATION.PRT: IF PRT-5 VALUED → Observation.performer; the NTE after the PRT is still the OBX's note,
    and a PRT of the order (after the OBR) is no performer of the results."""
    prt_order = "PRT|1|AD||RCT^Results Copies To^HL70443|ORDP1^COPY^CARL"
    obx = "OBX|1|NM|2345-7^Glucose^LN||90|mg/dL|||||F"
    prt_obx = "PRT|1|AD||RO^Responsible Observer^HL70443|OBSP1^WATCH^WANDA"
    b = conv(MSH, PID, OBR, prt_order, obx, prt_obx, "NTE|1||Fasting sample").bundle
    obs = one(b, "2345-7")
    assert obs["note"] == [{"text": "Fasting sample"}]
    practitioners = {
        e["fullUrl"]: e["resource"] for e in b["entry"] if e["resource"]["resourceType"] == "Practitioner"
    }
    performers = [
        practitioners[p["reference"]] for p in obs["performer"] if p.get("reference") in practitioners
    ]
    assert [p["identifier"][0]["value"] for p in performers] == ["OBSP1"]
