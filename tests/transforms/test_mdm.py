"""MDM^T01-T11 → DocumentReference: golden files, replacement and cancel update the same document (synthetic data)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from engine.errors import ConversionError, MessageRejected
from tests.transforms.conftest import assert_golden, golden_settings, load, msg, validate_resources
from transforms.convert import _convert

KEY = "DocumentReference?identifier=urn:oid:2.16.840.1.113883.19.999.8|DOC-1"
MSH = "MSH|^~\\&|SYNDOC|SYNTH HOSP|SLUICE|SLUICE|20250402120000||MDM^{}|C1|P|2.5.1"
PID = "PID|1||MRN900001^^^SYNTH HOSP&2.16.840.1.113883.19.999.1&ISO^MR||TESTPERSON^ALEXANDRA||19800229|F"
TXA = "TXA|1|DS|TX|||||||||{number}|{parent}||||{completion}||{avail}"
DOC = "DOC-2^SYNDOC^2.16.840.1.113883.19.999.8^ISO"
OBX = "OBX|1|TX|18842-5^Discharge summary^LN||Line one||||||F"


@pytest.mark.parametrize("name", ["mdm_t02", "mdm_t10", "mdm_t11"])
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


def _doc(bundle: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    (entry,) = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "DocumentReference"]
    return entry, entry["resource"]


def test_note_text_is_the_obx_lines_joined() -> None:
    entry, doc = _doc(_convert(load("mdm_t02"), golden_settings()).bundle)
    assert entry["request"] == {"method": "PUT", "url": KEY}
    assert doc["masterIdentifier"]["value"] == "DOC-1"
    text = base64.b64decode(doc["content"][0]["attachment"]["data"]).decode("utf-8")
    assert text == "Patient admitted with synthetic complaint.\nDischarged home in good condition."
    assert doc["status"] == "current" and doc["docStatus"] == "preliminary"
    assert doc["type"]["coding"][0]["code"] == "DS" and doc["description"] == "Discharge summary"


def test_coded_obx_lines_reach_the_text_without_the_hl7_encoding() -> None:
    """A CWE (or other composite) OBX among the note lines: its components' text, never ``Y^^YesNo``; the
    note's own TX text (an escaped ``^`` included) is kept as sent."""
    r = _convert(
        msg(
            MSH.format("T02"),
            PID,
            TXA.format(number=DOC, parent="", completion="DI", avail="AV"),
            "OBX|1|TX|18842-5^Discharge summary^LN||Ratio 1\\S\\2 noted||||||F",
            "OBX|2|CWE|FLAG1^Hidden from patient^L||Y^^expandedYesNoIndicator||||||F",
            "OBX|3|SN|FLAG2^Score^L||>^5||||||F",
        ),
        golden_settings(),
    )
    validate_resources(r.bundle)
    _entry, doc = _doc(r.bundle)
    text = base64.b64decode(doc["content"][0]["attachment"]["data"]).decode("utf-8")
    assert text == "Ratio 1^2 noted\nY expandedYesNoIndicator\n> 5"


def test_replacement_and_cancel_update_the_same_document() -> None:
    original = _convert(load("mdm_t02"), golden_settings())
    replaced = _convert(load("mdm_t10"), golden_settings())
    cancelled = _convert(load("mdm_t11"), golden_settings())
    entries = [_doc(r.bundle) for r in (original, replaced, cancelled)]
    assert {e["request"]["url"] for e, _ in entries} == {KEY}
    assert {e["request"]["method"] for e, _ in entries} == {"PUT"}
    assert len({e["fullUrl"] for e, _ in entries}) == 1
    _, doc2 = entries[1]
    assert doc2["docStatus"] == "final"
    assert [c["attachment"]["contentType"] for c in doc2["content"]] == [
        "text/plain; charset=utf-8",
        "application/pdf",
    ]
    assert entries[2][1]["status"] == "entered-in-error"
    ranks = [dict(r.guards)[KEY] for r in (original, replaced, cancelled)]
    assert ranks[0] == ranks[1] < ranks[2]


def test_replacement_with_a_new_number_points_at_its_parent() -> None:
    parent = "DOC-1^SYNDOC^2.16.840.1.113883.19.999.8^ISO"
    m = msg(MSH.format("T10"), PID, TXA.format(number=DOC, parent=parent, completion="AU", avail="AV"), OBX)
    _, doc = _doc(_convert(m, golden_settings()).bundle)
    assert doc["relatesTo"] == [
        {
            "code": "replaces",
            "target": {"identifier": {"system": "urn:oid:2.16.840.1.113883.19.999.8", "value": "DOC-1"}},
        }
    ]
    m = msg(MSH.format("T06"), PID, TXA.format(number=DOC, parent=parent, completion="AU", avail="AV"), OBX)
    assert _doc(_convert(m, golden_settings()).bundle)[1]["relatesTo"][0]["code"] == "appends"


def test_notification_without_content_never_overwrites() -> None:
    m = msg(MSH.format("T03"), PID, TXA.format(number=DOC, parent="", completion="AU", avail="AV"))
    r = _convert(m, golden_settings())
    entry, _ = _doc(r.bundle)
    assert entry["request"]["method"] == "POST" and r.events["document_notification_only"] == 1


@pytest.mark.parametrize(("avail", "status"), [("AV", "current"), ("", "current"), ("OB", "superseded"), ("CA", "entered-in-error"), ("UN", "current")])  # fmt: skip
def test_availability(avail: str, status: str) -> None:
    m = msg(MSH.format("T02"), PID, TXA.format(number=DOC, parent="", completion="AU", avail=avail), OBX)
    assert _doc(_convert(m, golden_settings()).bundle)[1]["status"] == status


def test_located_errors() -> None:
    with pytest.raises(ConversionError) as e:
        _convert(
            msg(MSH.format("T02"), PID, TXA.format(number="", parent="", completion="AU", avail=""), OBX),
            golden_settings(),
        )
    assert e.value.hl7_error == "101" and str(e.value.location).startswith("TXA")
    with pytest.raises(ConversionError) as e:
        _convert(
            msg(MSH.format("T02"), PID, TXA.format(number=DOC, parent="", completion="XX", avail=""), OBX),
            golden_settings(code_table_errors="reject"),  # a TXA-17 table miss: counted by default (below)
        )
    assert e.value.hl7_error == "103" and "TXA" in str(e.value.location)
    with pytest.raises(ConversionError) as e:
        _convert(
            msg(MSH.format("T02"), PID, TXA.format(number=DOC, parent="", completion="AU", avail="ZZ"), OBX),
            golden_settings(),
        )
    assert e.value.hl7_error == "103"
    with pytest.raises(ConversionError) as e:
        _convert(msg(MSH.format("T02"), PID, OBX), golden_settings())
    assert e.value.hl7_error == "100"
    with pytest.raises(MessageRejected) as r:
        _convert(msg(MSH.format("T12"), PID), golden_settings())
    assert r.value.hl7_error == "201"


def test_common_order_becomes_a_service_request_in_context_related() -> None:
    orc = "ORC|SC|ORD-7^SYNEHR^2.16.840.1.113883.19.999.9^ISO"
    obr = "OBR|1|ORD-7^SYNEHR^2.16.840.1.113883.19.999.9^ISO||18842-5^Discharge summary^LN"
    m = msg(
        MSH.format("T02"), PID, orc, obr, TXA.format(number=DOC, parent="", completion="AU", avail="AV"), OBX
    )
    b = _convert(m, golden_settings()).bundle
    (sr,) = [e for e in b["entry"] if e["resource"]["resourceType"] == "ServiceRequest"]
    assert sr["request"]["ifNoneExist"] == "identifier=urn:oid:2.16.840.1.113883.19.999.9|ORD-7"
    _, doc = _doc(b)
    assert doc["context"]["related"] == [{"reference": sr["fullUrl"]}]
    # the OBX after TXA are the document, not results: no Observation
    assert not [e for e in b["entry"] if e["resource"]["resourceType"] == "Observation"]


def test_rp_document_on_a_file_share_is_a_file_url() -> None:
    """An RP pointer that is a UNC path (backslashes escaped as \\E\\) is no URI: the attachment's url is the
    file: URL of the same file (RFC 8089)."""
    rp = "OBX|1|RP|11502-2^Report PDF^LN||\\E\\\\E\\docsrv\\E\\notes\\E\\d1.pdf^^application^pdf||||||F"
    m = msg(MSH.format("T02"), PID, TXA.format(number=DOC, parent="", completion="AU", avail="AV"), rp)
    result = _convert(m, golden_settings())
    validate_resources(result.bundle)
    _, doc = _doc(result.bundle)
    assert doc["content"][0]["attachment"] == {"url": "file://docsrv/notes/d1.pdf"}


BAD_ED = "OBX|2|ED|11502-2^Report PDF^LN||^AP^PDF^Base64^<Base64 encoded>||||||F"


def test_bad_attachment_next_to_text_is_dropped_with_a_located_warning_when_lenient() -> None:
    from transforms.convert import convert_report

    m = msg(
        MSH.format("T02"), PID, TXA.format(number=DOC, parent="", completion="AU", avail="AV"), OBX, BAD_ED
    )
    r = convert_report(m, golden_settings())
    _, doc = _doc(r.bundle)
    assert [c["attachment"]["contentType"] for c in doc["content"]] == ["text/plain; charset=utf-8"]
    assert r.events["document_attachment_dropped"] == 1
    (warning,) = [
        w for w, k in zip(r.warnings, r.warning_kinds, strict=True) if k == "document_attachment_dropped"
    ]
    assert warning.startswith("OBX(2)-5.5: OBX-5.5 is not valid base64 data: this attachment was left out")
    with pytest.raises(ConversionError) as exc:  # strict: rejected as before
        convert_report(m, golden_settings(strictness="strict"))
    assert exc.value.hl7_error == "102" and str(exc.value.location) == "OBX(2)-5.5"


def test_bad_attachment_that_is_the_only_content_rejects_the_message_in_both_modes() -> None:
    from transforms.convert import convert_report

    m = msg(MSH.format("T02"), PID, TXA.format(number=DOC, parent="", completion="AU", avail="AV"), BAD_ED)
    for mode in ("lenient", "strict"):
        with pytest.raises(ConversionError) as exc:
            convert_report(m, golden_settings(strictness=mode))
        assert exc.value.hl7_error == "102" and str(exc.value.location) == "OBX-5.5"


def test_order_notes_and_timing_go_on_the_service_request() -> None:
    """IG MDM_T02 COMMON_ORDER: the NTE after the OBR → ServiceRequest.note (NTE[ServiceRequest], its author a
    Practitioner), the TQ1 between ORC and OBR → the order's timing (TQ1[ServiceRequest])."""
    m = msg(
        MSH.format("T02"),
        PID,
        "ORC|NW|ORD1^SYNEHR",
        "TQ1|1||P&Post (after)&HL70335||||20250402080000",
        "OBR|1|ORD1^SYNEHR||11502-2^Laboratory report^LN",
        "NTE|1||Ordered for follow-up||DOC77^ATTEND^AARON^A^^^MD|20250402090000",
        TXA.format(number=DOC, parent="", completion="AU", avail="AV"),
        OBX,
    )
    bundle = _convert(m, golden_settings()).bundle
    (sr,) = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ServiceRequest"]
    assert sr["note"][0]["text"] == "Ordered for follow-up"
    author = sr["note"][0]["authorReference"]["reference"]
    assert any(
        e["fullUrl"] == author and e["resource"]["resourceType"] == "Practitioner" for e in bundle["entry"]
    )
    assert sr["occurrenceTiming"]["code"]["coding"][0]["code"] == "P"
    assert sr["occurrenceTiming"]["repeat"]["boundsPeriod"]["start"].startswith("2025-04-02T08:00")


def test_a_completion_status_outside_table_0271_is_a_counted_table_miss() -> None:
    """TXA-17 is no key: an unknown code leaves docStatus out (counted), unless the channel rejects table misses."""
    m = msg(MSH.format("T02"), PID, TXA.format(number=DOC, parent="", completion="ZZ", avail="AV"), OBX)
    r = _convert(m, golden_settings())
    _, doc = _doc(r.bundle)
    assert "docStatus" not in doc and doc["status"] == "current"
    assert r.events.get("code_table_miss") == 1
    validate_resources(r.bundle)
    with pytest.raises(ConversionError) as exc:
        _convert(m, golden_settings(code_table_errors="reject"))
    assert exc.value.hl7_error == "103" and str(exc.value.location) == "TXA-17"
