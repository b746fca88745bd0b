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
    # Issue #14: MSH-2 declares no subcomponent separator, so there is none (``&`` is data, not ``&`` assumed)
    m = hl7.parse("MSH|^~\\|A|B|C|D|||ADT^A01|1|P|2.3\rPID|1||A&B\r")
    assert m.delimiters.subcomponent != "&" and m.control_id == "1"
    assert m["PID-3.1"] == "A&B" and m.delimiters.encoding_characters == "^~\\"


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
    # an unknown MSH-18 on bytes outside ASCII: AE 103 (ASCII bytes are read as ASCII: the test below)
    unknown = "MSH|^~\\&|A|B|C|D|||ADT^A01|1|P|2.5||||||KLINGON\rPID|1||1||M\xfcller\r".encode("latin-1")
    for utf8_fallback in (False, True):  # (not UTF-8: the fallback does not apply)
        with pytest.raises(MessageContentError) as ei2:
            hl7.decode(unknown, utf8_fallback=utf8_fallback)
        assert ei2.value.hl7_error == "103" and str(ei2.value.location) == "MSH-18"
        assert "invalid (7 characters)" in str(ei2.value) and "KLINGON" not in str(ei2.value)


@pytest.mark.parametrize(
    "msh18",
    [
        pytest.param("KLINGON", id="junk"),
        pytest.param("8859", id="8859-without-part"),
        pytest.param("latin1", id="latin1"),
        pytest.param("Cp1250", id="cp1250"),
        pytest.param("UNICODE UTF-16", id="table-0211-not-decoded"),
        pytest.param("ISO IR87~ISO IR6", id="jis-first"),
    ],
)
def test_unknown_msh18_on_ascii_bytes_is_read_as_ascii_with_a_warning(msh18: str) -> None:
    """Every ASCII-based charset reads ASCII bytes alike: a name Sluice does not know rejects nothing."""
    raw = f"MSH|^~\\&|A|B|C|D|||ADT^A01|1|P|2.5||||||{msh18}\rPID|1||1||MULLER\r".encode()
    for utf8_fallback in (False, True):
        assert hl7.decode(raw, utf8_fallback=utf8_fallback) == raw.decode("ascii")
        assert hl7.parse_bytes(raw, utf8_fallback=utf8_fallback)["PID-5"] == "MULLER"
        warning = hl7.decode_warning(raw, utf8_fallback)
        assert warning is not None and warning[0] == "charset_unknown"
        assert warning[1].startswith("MSH-18: the message declares a character set Sluice does not decode (")
        assert warning[1].endswith(
            "but its bytes are all ASCII, which every ASCII-based character set reads alike; decoded as ASCII"
        )
    name = msh18.split("~")[0].upper()
    said = hl7.decode_warning(raw, True)
    assert said is not None
    if name in ("UNICODE UTF-16", "ISO IR87"):  # table 0211 names are quoted
        assert f"({name})" in said[1]
    else:  # anything else may be what a sender misplaced there: its length only
        assert f"(invalid ({len(name)} characters))" in said[1] and name not in said[1].upper()


def test_unknown_msh18_keeps_ae_103_for_iso_2022_escapes() -> None:
    """JIS text (ISO IR87) is 7-bit: its ESC sequences switch character sets, it is not ASCII text."""
    raw = b"MSH|^~\\&|A|B|C|D|||ADT^A01|1|P|2.5||||||ISO IR87\rPID|1||1||\x1b$B%F%9%H\x1b(B\r"
    with pytest.raises(MessageContentError) as ei:
        hl7.decode(raw, utf8_fallback=True)
    assert ei.value.hl7_error == "103"
    assert (
        ei.value.message
        == "unsupported character set in MSH-18: ISO IR87 (its bytes hold ISO 2022 escape sequences)"
    )


def test_unknown_msh18_on_utf8_bytes_follows_utf8_fallback() -> None:
    raw = "MSH|^~\\&|A|B|C|D|||ADT^A01|1|P|2.5||||||UTF8\rPID|1||1||NÚÑEZ\r".encode()
    assert hl7.utf8_mislabelled(raw)
    assert "NÚÑEZ" in hl7.decode(raw, utf8_fallback=True)
    warning = hl7.decode_warning(raw, True)
    assert warning is not None and warning[0] == "charset_fallback"
    assert warning[1].startswith(
        "MSH-18: the message declares a character set Sluice does not decode (invalid (4 characters)) but its "
        "bytes are UTF-8"
    )
    with pytest.raises(MessageContentError) as ei:  # the fallback off: as before, AE 103
        hl7.decode(raw)
    assert ei.value.hl7_error == "103"
    assert hl7.decode_warning(raw, False) is None  # (decode raised: no message to warn about)


def test_known_msh18_gets_no_decode_warning() -> None:
    for msh18 in ("", "ASCII", "8859/1", "UNICODE UTF-8", "iso-8859-1"):
        raw = f"MSH|^~\\&|A|B|C|D|||ADT^A01|1|P|2.5||||||{msh18}\rPID|1||1||MULLER\r".encode()
        assert hl7.decode_warning(raw, True) is None and hl7.decode_warning(raw, False) is None


@pytest.mark.parametrize(
    ("msh18", "text"),
    [
        pytest.param("ISO IR6", "MULLER", id="iso-ir6"),
        pytest.param("US-ASCII", "MULLER", id="us-ascii"),
        pytest.param("ISO-8859-1", "Müller", id="iso-8859-1"),
        pytest.param("iso-8859-15", "Müller €", id="iso-8859-15-lowercase"),
        pytest.param("8859/15", "Müller €", id="8859-15"),
        pytest.param("GB 18030-2000", "王小明", id="gb18030"),
        pytest.param("KS X 1001", "김민준", id="ks-x-1001"),
        pytest.param("BIG-5", "陳大文", id="big5"),
        pytest.param("BIG5", "陳大文", id="big5-iana"),
    ],
)
def test_table_0211_and_iana_names_are_decoded(msh18: str, text: str) -> None:
    codec = hl7.CHARSETS[msh18.upper()]
    raw = f"MSH|^~\\&|A|B|C|D|||ADT^A01|1|P|2.5||||||{msh18}\rPID|1||1||{text}^Ann\r".encode(codec)
    for utf8_fallback in (False, True):
        msg = hl7.parse_bytes(raw, utf8_fallback=utf8_fallback)
        assert msg["PID-5.1"] == text and msg["PID-5.2"] == "Ann"
        assert hl7.decode_warning(raw, utf8_fallback) is None


def test_every_name_decoded_is_quoted_in_reasons() -> None:
    """engine.redact quotes table 0211 names and the names engine.hl7 decodes, nothing else."""
    from engine import redact

    assert {n for n in hl7.CHARSETS if n} <= redact.CHARSETS
    assert all(n == n.upper().strip() for n in hl7.CHARSETS)  # sniff_charset upper-cases and strips


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


def test_utf8_under_a_single_byte_msh18_is_read_as_utf8_when_asked() -> None:
    """Issue #14: a common mislabel, UTF-8 bytes under MSH-18 8859/1, ASCII or none (``source.utf8_fallback``)."""
    for msh18 in ("8859/1", "ASCII", ""):
        raw = f"MSH|^~\\&|A|B|C|D|||ADT^A01|1|P|2.5||||||{msh18}\rPID|1||1||NÚÑEZ\r".encode()
        assert hl7.utf8_mislabelled(raw)
        assert "NÚÑEZ" in hl7.decode(raw, "latin-1", utf8_fallback=True)
        assert "NÚÑEZ" in hl7.parse_bytes(raw, "latin-1", True)["PID-5"]
        if msh18 == "ASCII":  # as declared: not ASCII, AE 102
            with pytest.raises(MessageContentError):
                hl7.decode(raw, "latin-1")
        else:  # as declared: mojibake
            assert "NÃ\x9aÃ\x91EZ" in hl7.decode(raw, "latin-1")
    # real Latin-1 (not valid UTF-8) stays Latin-1; pure ASCII and declared UTF-8 are not mislabels
    latin = "MSH|^~\\&|A|B|C|D|||ADT^A01|1|P|2.5||||||8859/1\rPID|1||1||M\xfcller\r".encode("latin-1")
    assert not hl7.utf8_mislabelled(latin) and "Müller" in hl7.decode(latin, utf8_fallback=True)
    ascii_only = b"MSH|^~\\&|A|B|C|D|||ADT^A01|1|P|2.5||||||8859/1\rPID|1||1||MULLER\r"
    assert not hl7.utf8_mislabelled(ascii_only)
    declared = "MSH|^~\\&|A|B|C|D|||ADT^A01|1|P|2.5||||||UNICODE UTF-8\rPID|1||1||NÚÑEZ\r".encode()
    assert not hl7.utf8_mislabelled(declared)
    # another single-byte charset is trusted as declared
    greek = "MSH|^~\\&|A|B|C|D|||ADT^A01|1|P|2.5||||||8859/7\rPID|1||1||NÚÑEZ\r".encode()
    assert not hl7.utf8_mislabelled(greek)


@pytest.mark.parametrize(
    ("msh2", "pid5", "family", "given"),
    [
        pytest.param("^~\\", "O'BRIEN & SONS^ANN", "O'BRIEN & SONS", "ANN", id="no subcomponent separator"),
        pytest.param("^~", "SMITH\\JONES&CO^ANN", "SMITH\\JONES&CO", "ANN", id="no escape character"),
        pytest.param("^", "DOE~ROE^ANN", "DOE~ROE", "ANN", id="only a component separator"),
    ],
)
def test_msh2_with_fewer_than_four_encoding_characters_is_honoured(
    msh2: str, pid5: str, family: str, given: str
) -> None:
    """Issue #14: a separator MSH-2 does not declare is data, not a separator (``&`` in a name stays)."""
    text = f"MSH|{msh2}|A|B|C|D|20250101||ADT^A08|X1|P|2.5.1\rPID|1||M1^^^HOSP^MR||{pid5}\r"
    m = hl7.parse(text)
    assert m.delimiters.encoding_characters == msh2
    assert m["MSH-2"] == msh2
    assert m["PID-5.1"] == family and m["PID-5.2"] == given
    assert m["PID-5"] == pid5  # one repetition, nothing unescaped
    seg = m.first("PID")
    assert seg is not None and len(seg.reps(5)) == 1 and seg.rep(5).c(1, 2) == ""
    assert seg.rep(5).subs(1) == [family]
    # the ACK repeats MSH-2 as declared, and cannot break the message it answers
    from engine.ack import build as build_ack
    from engine.errors import MessageContentError as MCE

    ack = build_ack(m, "AE", MCE("PID-7 is not a valid HL7 date/time (no such date)", code="102"))
    assert ack.startswith(f"MSH|{msh2}|")
    ack_msg = hl7.parse(ack)
    assert ack_msg["MSA-2"] == "X1"


def test_default_delimiters_unchanged() -> None:
    d = hl7.parse("MSH|^~\\&|A|B|C|D|20250101||ADT^A08|X1|P|2.5.1\r").delimiters
    assert (d.component, d.repetition, d.escape, d.subcomponent) == ("^", "~", "\\", "&")
    assert d.encoding_characters == "^~\\&"
