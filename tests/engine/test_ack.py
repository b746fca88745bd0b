"""ACK building per version and mode (pure)."""

from __future__ import annotations

import pytest

from engine import ack, hl7
from engine.errors import Location, MessageContentError, MessageRejected


def msg(version: str = "2.5.1", msh15: str = "", msh16: str = "", delims: str = "|^~\\&") -> hl7.Message:
    fs = delims[0]
    fields = ["MSH", delims[1:], "SENDAPP", "SENDFAC", "RECVAPP", "RECVFAC", "20250101120000", "",
              f"ADT{delims[1]}A08", "C123", "P", version, "", "", msh15, msh16]  # fmt: skip
    return hl7.parse(fs.join(fields) + "\rPID|1\r")


def segs(text: str) -> list[list[str]]:
    return [s.split("|") for s in text.strip("\r").split("\r")]


def test_swaps_and_copies() -> None:
    a = segs(ack.build(msg(), "AA"))
    msh, msa = a[0], a[1]
    assert msh[2:6] == ["RECVAPP", "RECVFAC", "SENDAPP", "SENDFAC"]
    assert msh[8] == "ACK^A08^ACK" and msh[10] == "P" and msh[11] == "2.5.1"
    assert msh[9] and msh[9] != "C123"
    assert msa == ["MSA", "AA", "C123"]


def test_v23_has_no_third_component_and_uses_msa3_err1() -> None:
    err = MessageContentError("PID-3 is required", code="101", location=Location("PID", 1, 3))
    a = segs(ack.build(msg("2.3"), "AE", err))
    assert a[0][8] == "ACK^A08"
    assert a[1] == ["MSA", "AE", "C123", "PID-3 is required"]
    assert (
        a[2][0] == "ERR"
        and a[2][1].startswith("PID^1^3^")
        and "101&Required field missing&HL70357" in a[2][1]
    )


def test_v25_err_segment() -> None:
    err = MessageContentError("PID-3 is required", code="101", location=Location("PID", 1, 3))
    a = segs(ack.build(msg("2.5"), "AE", err))
    err_seg = a[2]
    assert err_seg[2] == "PID^1^3"
    assert err_seg[3] == "101^Required field missing^HL70357"
    assert err_seg[4] == "E"


def test_custom_delimiters_used_in_ack() -> None:
    text = ack.build(msg(delims="!@#$%"), "AA")
    assert text.startswith("MSH!@#$%!RECVAPP")
    assert "ACK@A08@ACK" in text


def test_unparseable_message_ack_has_empty_msa2() -> None:
    a = segs(ack.build(None, "AR", MessageRejected("no MSH", code="100")))
    assert a[1][:3] == ["MSA", "AR", ""]


@pytest.mark.parametrize(
    ("msh15", "msh16", "outcome", "expected"),
    [
        pytest.param("", "", "AA", ["AA"], id="original-ok"),
        pytest.param("", "", "AE", ["AE"], id="original-error"),
        pytest.param("NE", "NE", "AA", [], id="ne-ne"),
        pytest.param("AL", "NE", "AA", ["CA"], id="commit-only"),
        pytest.param("AL", "NE", "AR", ["CR"], id="commit-reject"),
        pytest.param("NE", "AL", "AA", ["AA"], id="app-only"),
        pytest.param("AL", "AL", "AA", ["CA", "AA"], id="both"),
        pytest.param("ER", "NE", "AA", [], id="er-success-silent"),
        pytest.param("ER", "NE", "AE", ["CE"], id="er-error"),
        pytest.param("SU", "NE", "AA", ["CA"], id="su-success"),
        pytest.param("SU", "NE", "AR", [], id="su-error-silent"),
    ],
)
def test_plan(msh15: str, msh16: str, outcome: str, expected: list[str]) -> None:
    assert ack.plan(msg(msh15=msh15, msh16=msh16), ack.Outcome(outcome)) == expected


def test_never_ack_an_ack() -> None:
    m = hl7.parse("MSH|^~\\&|A|B|C|D|||ACK^A01|9|P|2.5\rMSA|AA|1\r")
    assert ack.plan(m, ack.Outcome("AA")) == []
