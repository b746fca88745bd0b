"""The ACK builder's plain-header path gives the general path's bytes (property tests over MSH headers)."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from engine import ack, hl7
from engine.errors import Location, MessageContentError, MessageRejected, SluiceError
from engine.intake import _codec, render_ack

NOW = datetime(2026, 12, 5, 2, 50, 0, tzinfo=UTC)
TS = NOW.strftime("%Y%m%d%H%M%S%z")

VERSIONS = ["", "2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.9",
            "3", "2.x", "v2.5", "2.5^2.5.1", "^2.5", "2.5~2.4", "2.5&x", "2.5\\T\\"]  # fmt: skip
CHARSETS = ["", *hl7.CHARSETS, "unicode utf-8", " 8859/1 ", "8859/1~UNICODE UTF-8", "UTF^8", "KOI8"]
ACK_TYPES = ["", "AL", "NE", "ER", "SU", "al", "XX"]
# MSH-1 then MSH-2: the usual ones, fewer than four, a truncation character, others
SEPARATORS = ["|^~\\&", "|^~\\&#", "|^~\\", "|^~", "|^", "#$%!@", "|^~&", "!^~\\&"]

text = st.text(alphabet="AB12 ^~\\&|#$%!@.-_\nÉ", max_size=8)
ordinary = st.text(alphabet="ABCXYZ0189 _-.", max_size=8)


@st.composite
def messages(draw: st.DrawFn) -> hl7.Message:
    seps = draw(st.sampled_from(SEPARATORS))
    fs, cs = seps[0], seps[1]
    field = st.one_of(ordinary, text).map(lambda v: v.replace(fs, "").replace("\n", "").replace("\r", ""))
    mtype = draw(st.sampled_from(["ADT", "ORU", "SIU", "ACK", "", "adt"]))
    trigger = draw(st.one_of(st.sampled_from(["A01", "R01", "S12", "", " a08 "]), field))
    structure = draw(st.sampled_from(["", "ADT_A01", "ORU_R01"]))
    msh9 = mtype + (cs + trigger if trigger or structure else "") + (cs + structure if structure else "")
    fields = [
        "MSH",
        seps[1:],
        *(draw(field) for _ in range(4)),  # MSH-3..6
        "20261205025014",
        "",
        msh9,
        draw(st.one_of(ordinary, field)),  # MSH-10
        draw(st.sampled_from(["P", "T", "", "D^T"])),
        draw(st.sampled_from(VERSIONS)).replace(fs, ""),
        "",
        "",
        draw(st.sampled_from(ACK_TYPES)),
        draw(st.sampled_from(ACK_TYPES)),
        "USA",
        draw(st.sampled_from(CHARSETS)),
    ]
    fields = fields[: draw(st.integers(min_value=9, max_value=len(fields)))]
    return hl7.parse(fs.join(fields) + "\rPID" + fs + "1\r")


errors = st.sampled_from(
    [
        None,
        MessageContentError("PID-3 is required", code="101", location=Location("PID", 1, 3)),
        MessageContentError("bad | value ^ here", code="102", location=Location("PV1", 1, 44, 1, 2)),
        MessageRejected("unsupported message type", code="200"),
    ]
)


@settings(max_examples=400, deadline=None)
@given(messages(), st.sampled_from(["AA", "AE", "AR", "CA", "CE", "CR"]), errors,
       st.sampled_from(["2.5.1", "2.3"]))  # fmt: skip
def test_build_equals_the_general_path(
    message: hl7.Message, code: str, error: SluiceError | None, version: str
) -> None:
    got = ack.build(message, code, error, now=NOW, control_id="CID1", version=version)
    want = ack._build_general(message, code, error, TS, "CID1", "", version)
    assert got == want


def _codec_before(message: hl7.Message | None) -> str:
    if message is None:
        return "ascii"
    cs = message.msh.get(18).strip().upper()
    return hl7.CHARSETS.get(cs, "latin-1") if cs else "latin-1"


@settings(max_examples=300, deadline=None)
@given(messages())
def test_ack_codec_equals_the_header_reading(message: hl7.Message) -> None:
    assert _codec(message) == _codec(message) == _codec_before(message)


@settings(max_examples=200, deadline=None)
@given(messages(), st.sampled_from(["AA", "AE", "AR"]), errors)
def test_render_ack_equals_each_built_ack(message: hl7.Message, code: str, error: SluiceError | None) -> None:
    outcome = ack.Outcome(code, error)
    data, codes = render_ack(message, outcome)
    plan = ack.plan(message, outcome)
    assert codes == "/".join(plan)
    if not plan:
        assert data is None
        return
    assert data is not None
    got = data.split(b"\x00")
    assert len(got) == len(plan)
    for raw, c in zip(got, plan, strict=True):
        text = ack._build_general(message, c, error, TS, "CID1", "", "2.5.1")
        for ch in "\x00\x0b\x1c":
            text = text.replace(ch, "")
        want = text.encode(_codec_before(message), "replace")
        # MSH-7 and MSH-10 are this second's and a counter's: compare the rest
        fs = hl7.read_delimiters(text).field.encode("latin-1")
        g, w = raw.split(b"\r", 1), want.split(b"\r", 1)
        assert g[1] == w[1]
        gf, wf = g[0].split(fs), w[0].split(fs)
        assert gf[:6] + gf[7:9] + gf[10:] == wf[:6] + wf[7:9] + wf[10:]
