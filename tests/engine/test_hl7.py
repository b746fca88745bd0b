"""HL7 v2 parsing: delimiters, terminators, escapes, charsets, the field accessor."""

from __future__ import annotations

import pytest

from engine import hl7
from engine.errors import MessageContentError, MessageRejected

ADT = (
    "MSH|^~\\&|EHR|NORTH|SLUICE|HOSP|20250101120000||ADT^A01^ADT_A01|CTRL1|P|2.5.1\r"
    "PID|1||MRN123^^^NORTH^MR~999^^^SSA^SS||Testpatient^Alex^Q||19800101|F\r"
    "PV1|1|I|4N^401^A\r"
    "OBX|1|ST|X^Note||line one\\.br\\line two\r"
    "OBX|2|NM|Y^Value||5.4|mmol/L\r"
)


def test_fields_components_repetitions() -> None:
    m = hl7.parse(ADT)
    assert m.message_type == "ADT" and m.trigger == "A01" and m.structure == "ADT_A01"
    assert m.control_id == "CTRL1" and m.version == "2.5.1" and m.processing_id == "P"
    assert m["PID-3.1"] == "MRN123"
    assert m["PID-3(2).4"] == "SSA"
    assert m["PID-5.2"] == "Alex"
    assert m["OBX(2)-5"] == "5.4"
    assert m["OBX(3)-5"] == ""
    assert m["ZZZ-1"] == ""
    assert m["MSH-1"] == "|" and m["MSH-2"] == "^~\\&"
    assert m["PV1-3.2"] == "401"


def test_escape_sequences() -> None:
    m = hl7.parse(ADT)
    assert m["OBX(1)-5"] == "line one\nline two"
    d = hl7.DEFAULT_DELIMITERS
    assert hl7.unescape("a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f", d) == "a|b^c&d~e\\f"
    assert hl7.unescape("\\X41\\\\H\\bold\\N\\", d) == "Abold"


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("\\X4\\", id="odd-hex"),
        pytest.param("\\Q\\", id="unknown"),
        pytest.param("trailing\\", id="unterminated"),
    ],
)
def test_malformed_escapes_kept_literally(value: str) -> None:
    assert hl7.unescape(value, hl7.DEFAULT_DELIMITERS) == value


def test_escape_roundtrip() -> None:
    d = hl7.DEFAULT_DELIMITERS
    text = "a|b^c&d~e\\f\ng"
    assert hl7.unescape(hl7.escape(text, d), d) == text


@pytest.mark.parametrize("term", ["\r", "\n", "\r\n"], ids=["CR", "LF", "CRLF"])
def test_segment_terminators(term: str) -> None:
    m = hl7.parse(ADT.replace("\r", term))
    assert [s.name for s in m] == ["MSH", "PID", "PV1", "OBX", "OBX"]


def test_mixed_terminators() -> None:
    m = hl7.parse("MSH|^~\\&|A|B|C|D|||ADT^A01|1|P|2.5\r\nPID|1\nPV1|1\r")
    assert [s.name for s in m] == ["MSH", "PID", "PV1"]


def test_custom_delimiters() -> None:
    m = hl7.parse("MSH!@#$%!A!B!C!D!!!ADT@A01!42!P!2.5\rPID!1!!X@@@AUTH#REP2\r")
    assert m.delimiters.field == "!" and m.delimiters.component == "@"
    assert m.trigger == "A01" and m.control_id == "42"
    assert m["PID-3.4"] == "AUTH"
    assert m["PID-3(2).1"] == "REP2"


def test_five_character_encoding() -> None:
    m = hl7.parse("MSH|^~\\&#|A|B|C|D|||ADT^A01|1|P|2.7\r")
    assert m.delimiters.truncation == "#" and m.control_id == "1"


def test_three_character_encoding() -> None:
    m = hl7.parse("MSH|^~\\|A|B|C|D|||ADT^A01|1|P|2.3\r")
    assert m.delimiters.subcomponent == "&" and m.control_id == "1"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        pytest.param("PID|1\r", "100", id="no-msh"),
        pytest.param("", "100", id="empty"),
        pytest.param("MSH", "101", id="bare-msh"),
        pytest.param("MSH|", "101", id="no-encoding"),
    ],
)
def test_unparseable(text: str, code: str) -> None:
    with pytest.raises(MessageRejected) as ei:
        hl7.parse(text)
    assert ei.value.hl7_error == code and ei.value.ack_code == "AR"


def test_decode_by_msh18() -> None:
    latin = "MSH|^~\\&|A|B|C|D|||ADT^A01|1|P|2.5||||||8859/1\rPID|1||1||M\xfcller\r".encode("latin-1")
    assert "Müller" in hl7.decode(latin)
    utf8 = "MSH|^~\\&|A|B|C|D|||ADT^A01|1|P|2.5||||||UNICODE UTF-8\rPID|1||1||Müller\r".encode()
    assert "Müller" in hl7.decode(utf8)


def test_decode_errors() -> None:
    bad = b"MSH|^~\\&|A|B|C|D|||ADT^A01|1|P|2.5||||||UNICODE UTF-8\rPID|1||1||M\xfc\xffller\r"
    with pytest.raises(MessageContentError) as ei:
        hl7.decode(bad)
    assert ei.value.hl7_error == "102"
    unknown = b"MSH|^~\\&|A|B|C|D|||ADT^A01|1|P|2.5||||||KLINGON\r"
    with pytest.raises(MessageContentError) as ei2:
        hl7.decode(unknown)
    assert ei2.value.hl7_error == "103"


def test_empty_msh18_uses_fallback() -> None:
    raw = b"MSH|^~\\&|A|B|C|D|||ADT^A01|1|P|2.5\rPID|1||1||M\xfcller\r"
    assert "Müller" in hl7.decode(raw, "latin-1")


def test_batch_split() -> None:
    text = (
        "FHS|^~\\&\rBHS|^~\\&|A|B|||||||B1\r"
        "MSH|^~\\&|A|B|C|D|||ADT^A01|1|P|2.5\rPID|1\r"
        "MSH|^~\\&|A|B|C|D|||ADT^A01|2|P|2.5\rPID|2\r"
        "BTS|2\rFTS|1\r"
    )
    parts = hl7.split_batch(text)
    assert len(parts) == 2
    assert hl7.parse(parts[1]).control_id == "2"


def test_bad_path() -> None:
    m = hl7.parse(ADT)
    with pytest.raises(ValueError, match="bad HL7 path"):
        m["PID3"]
