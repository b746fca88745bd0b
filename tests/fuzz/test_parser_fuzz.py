"""Property-based fuzzing of the HL7 parser and the intake decision (bounded for CI).

Contract under test (engine/errors.py, engine/intake.py):

* ``engine.hl7.decode``, ``parse``, ``parse_bytes`` raise nothing but located ``SluiceError`` subclasses
  (never an internal error, AR 207);
* a parsed message's accessors (header shortcuts, ``msg[path]``) and the ACK builder never raise;
* ``Intake.decide`` never raises at all: every frame, however broken, becomes rows and/or an ACK.

Inputs are random bytes/text and mutations of synthetic corpus-like messages (delimiter swaps,
inserted framing bytes, truncation, duplicated or reordered segments, odd charsets and escapes).
``max_examples`` is ~200 per property; bench/fuzz_long.py runs the same targets for longer.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine import ack as ackmod
from engine import hl7
from engine.config import DEFAULT_TYPES, ChannelConfig, DedupeConfig, SourceConfig
from engine.errors import SluiceError
from engine.intake import Intake, render_ack, split_acks

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------
# a small synthetic corpus (no real PHI)

CORPUS: list[bytes] = [
    b"MSH|^~\\&|ALLSCRIPTS|NORTHCLINIC|SLUICE|HOSP|20250314083000||ADT^A01^ADT_A01|DEMO0001|P|2.5.1\r"
    b"EVN|A01|20250314083000\r"
    b"PID|1||MRN100234^^^NORTHCLINIC^MR~123-45-6789^^^USA^SS||Sampleton^Jordan^Q||19760412|F|||"
    b"12 Example Way^^Springfield^OR^97477^USA||^PRN^PH^^1^541^5550100\r"
    b"PV1|1|I|4N^401^A^NORTH||||1234567893^Carer^Casey^^^Dr^^^NPI|||MED||||||||V100234^^^NORTHCLINIC^VN\r",
    b"MSH|^~\\&|LAB|NORTHLAB|SLUICE|HOSP|20250314101500-0500||ORU^R01^ORU_R01|DEMO0002|P|2.5.1|||AL|NE||"
    b"UNICODE UTF-8\r"
    b"PID|1||MRN100234^^^NORTHCLINIC^MR||Sampleton^Jordan^Q||19760412|F\r"
    b"OBR|1|ORD555^NORTHCLINIC|FIL777^NORTHLAB|24331-1^Lipid panel^LN|||20250314090000|||||||||||||||"
    b"20250314101000|||F\r"
    b"OBX|1|NM|2093-3^Cholesterol total^LN||182|mg/dL^mg/dL^UCUM|<200||||F|||20250314100000\r"
    b"OBX|2|ED|PDF^Report^L||LAB^AP^PDF^Base64^JVBERi0xLjQKJcfsj6IK||||||F\r"
    b"NTE|1||Fasting sample.\\.br\\Reviewed \\X4\\ \\Q\\ \\XC3A9\\ \\F\\ \\S\\ \\T\\ \\R\\ \\E\\.\r",
    b"MSH|^~\\&|EHR|NORTHCLINIC|SLUICE|HOSP|20250314120000||SIU^S12^SIU_S12|DEMO0003|P|2.5.1\r"
    b"SCH|APT900^NORTHCLINIC|APT900^NORTHCLINIC|||||ROUTINE^Routine visit|FOLLOWUP|30|MIN|"
    b"^^30^20250320093000^20250320100000|||||||||||||||Booked\r"
    b"PID|1||MRN100234^^^NORTHCLINIC^MR||Sampleton^Jordan^Q||19760412|F\r"
    b"RGS|1|A\rAIS|1|A|99213^Office visit^CPT|20250320093000|||30|MIN\r",
    b"MSH!@#$%!EHR!NORTH!SL!HOSP!20250314083000!!ADT@A40@ADT_A39!D4!P!2.3\n"
    b"EVN!A40!20250314083000\nPID!1!!NEW1@@@NORTH@MR!!Testpatient@Alex\nMRG!OLD1@@@NORTH@MR\n",
    b"FHS|^~\\&|EHR|NORTH\r\nBHS|^~\\&|EHR|NORTH\r\n"
    b"MSH|^~\\&#|EHR|NORTH|SL|HOSP|20250101||ADT^A08|B1|P|2.7\r\nPID|1||M1^^^N^MR\r\n"
    b"MSH|^~\\|EHR|NORTH|SL|HOSP|20250101||ADT^A08|B2|T|2.3||||||8859/1\r\nPID|1||M\xfc^^^N^MR\r\n"
    b"BTS|2\r\nFTS|1\r\n",
    b"MSH|^~\\&|EHR|NORTH|SL|HOSP|20250101||ACK^A08^ACK|A1|P|2.5.1\rMSA|AA|X1\r",
    b"MSH|^~\\&|EHR|NORTH|SL|HOSP|20250230250000+9900||ADT^A99|Z1|Q|9.9||||NE|NE||KLINGON\rZXY|1|\\X4\r",
]

SPECIALS = [
    b"\r", b"\n", b"\r\n", b"|", b"^", b"~", b"\\", b"&", b"#", b"\x0b", b"\x1c", b"\x1c\r", b"\x00",
    b"\xff", b"\xc3", b"\xc3\xa9", b"\xed\xa0\x80", b"MSH", b"MSH|", b"FHS|", b"BHS|", b"BTS", b"\\X", b"\\X4\\",
    b"\\Xzz\\", b"\\.br\\", b"\\H\\", b"\\P\\", b"\\Q\\", b"UNICODE UTF-8", b"8859/1", b"UTF-16", b"ACK",
    b"\xe2\x80\x8b", b"\t", b" ", b"||||||||||||||||||||", b"^^^^^^", b"~~~~",
]  # fmt: skip


@st.composite
def mutated(draw: Any) -> bytes:
    """A corpus message with a few random edits (byte-level and segment-level)."""
    data = bytearray(draw(st.sampled_from(CORPUS)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.integers(0, 7))
        pos = draw(st.integers(0, len(data)))
        if op == 0:  # insert a special token
            data[pos:pos] = draw(st.sampled_from(SPECIALS))
        elif op == 1:  # insert random bytes
            data[pos:pos] = draw(st.binary(max_size=8))
        elif op == 2 and data:  # delete a run
            data[pos : pos + draw(st.integers(1, 12))] = b""
        elif op == 3:  # truncate
            del data[pos:]
        elif op == 4 and len(data) > 5:  # change a delimiter in MSH
            i = draw(st.integers(3, 7))
            if i < len(data):
                data[i] = draw(st.integers(0, 255))
        elif op == 5:  # duplicate or drop a segment
            segs = bytes(data).split(b"\r")
            j = draw(st.integers(0, max(0, len(segs) - 1)))
            if draw(st.booleans()):
                segs.insert(j, segs[j])
            elif len(segs) > 1:
                segs.pop(j)
            data = bytearray(b"\r".join(segs))
        elif op == 6:  # shuffle segments
            segs = bytes(data).split(b"\r")
            data = bytearray(b"\r".join(draw(st.permutations(segs))))
        else:  # flip a byte
            if data:
                k = min(pos, len(data) - 1)
                data[k] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


payloads = st.one_of(mutated(), st.binary(max_size=300), st.binary(max_size=40).map(lambda b: b"MSH" + b))
texts = st.one_of(
    mutated().map(lambda b: b.decode("latin-1")),
    st.text(max_size=200),
    st.text(alphabet="MSH|^~\\&#\r\n!@$%FBT0123456789.AXS", max_size=200),
)
fallbacks = st.sampled_from(["latin-1", "utf-8", "cp1252", "ascii"])

PATHS = [
    "MSH-9.1",
    "MSH-18",
    "PID-3",
    "PID-3(2).4",
    "PID-5.1.1",
    "OBX(2)-5",
    "OBX-5.5",
    "MRG-1",
    "SCH-25",
    "ZXY-3",
]


def exercise(msg: hl7.Message) -> None:
    """Everything downstream code reads from a message, and the ACKs for it; must not raise."""
    _ = (msg.control_id, msg.message_type, msg.trigger, msg.structure, msg.version, msg.processing_id)
    _ = (msg.accept_ack_type, msg.app_ack_type, msg.sending_application, msg.sending_facility)
    for p in PATHS:
        _ = msg[p]
    for seg in msg:
        for n in range(len(seg)):
            for rep in seg.reps(n):
                _ = (rep.text, rep.c(1), rep.c(2, 2), rep.subs(1))
    err = SluiceError("fuzz", code="207")
    for code in ("AA", "AE", "AR"):
        render_ack(msg, ackmod.Outcome(code, None if code == "AA" else err))


def only_documented(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, or None for a documented parser error: a located rejection or content error.  An
    internal error (AR 207, or one without a location) is a parser bug and fails the property."""
    try:
        return fn(*args)
    except SluiceError as exc:
        assert exc.hl7_error != "207", f"internal error from the parser: {exc}"
        assert exc.location is not None, f"parser error without a location: {exc}"
        return None


@FUZZ
@given(payloads, fallbacks)
@example(b"MSH", "latin-1")
@example(b"MSH|", "latin-1")
@example(b"MSH|^~\\&|\xff", "ascii")
def test_decode_and_parse_bytes_raise_only_sluice_errors(raw: bytes, fallback: str) -> None:
    only_documented(hl7.decode, raw, fallback)
    msg = only_documented(hl7.parse_bytes, raw, fallback)
    if msg is not None:
        exercise(msg)


@FUZZ
@given(texts)
@example("MSH^")
@example("MSH|^~\\&|A\rPID|1||\\X4\\^\\Q\\")
@example("MSH\x1c^~\\&")
@example("MSH|^~\\&|A|B|C|D|20250101||ADT^A08|X1|P|\u00b2\r")  # MSH-12 '²': regression (engine/ack.py)
def test_parse_raises_only_sluice_errors(text: str) -> None:
    msg = only_documented(hl7.parse, text)
    if msg is not None:
        exercise(msg)
        for part in hl7.split_batch(text):
            only_documented(hl7.parse, part)


def _intake(**kw: Any) -> Intake:
    ch = ChannelConfig(
        name="fuzz",
        file="fuzz.yaml",
        source=SourceConfig(fallback_charset=kw.pop("fallback", "latin-1")),
        types=DEFAULT_TYPES,
        require=("PID-3", "OBX(2)-5.1"),
        order_by="PID-3",
        dedupe=DedupeConfig(),
        **kw,
    )
    return Intake(ch, committer=None)  # type: ignore[arg-type]  # decide() never touches the committer


INTAKES = [
    _intake(),
    _intake(batch="reject", fallback="utf-8"),
    _intake(ack="after-processing", processing_ids=("P",), versions=("2.5.1",)),
]


@FUZZ
@given(payloads, st.sampled_from(range(len(INTAKES))))
@example(b"", 0)
@example(b" \r\n", 0)
@example(b"FHS|^~\\&\rBTS|0\rFTS|1\r", 0)
@example(b"BHS|^~\\&\rBTS", 1)
@example(b"MSH|^~\\&|A|B|C|D|20250101||ADT^A08|X1|P|\xb2\r", 0)  # MSH-12 '²' (latin-1): regression
@example(b"MSH\x00^~\\&\x00A\x00B\x00C\x00D\x0020250101\x00\x00ADT^A08\x00X2\x00P\x002.5.1\r", 0)  # NUL sep
def test_intake_decide_never_raises(payload: bytes, which: int) -> None:
    # What the framer can hand over: a frame's content never holds 0x0B or 0x1C.
    payload = payload.replace(b"\x0b", b"").replace(b"\x1c", b"")
    jobs, immediate = INTAKES[which].decide(payload, "127.0.0.1:1")
    assert jobs or immediate, "a frame must produce rows or an immediate answer"
    if not jobs:
        assert immediate is not None and all(a.startswith(b"MSH") for a in split_acks(immediate))
    for j in jobs:
        assert j.row.status and j.outcome.code in ("AA", "AE", "AR")
        err = j.outcome.error
        # decide() does no I/O: an application internal error (207) here could only be a bug
        assert err is None or err.hl7_error != "207", f"internal error from intake: {err}"
        assert isinstance(j.row.raw, bytes)
        for a in split_acks(j.row.ack):
            assert a.startswith(b"MSH")
            assert b"\x0b" not in a and b"\x1c" not in a, "an ACK must be framable"


def test_nul_inside_a_copied_field_does_not_split_the_ack() -> None:
    """Regression (bench/fuzz_long.py): MSH-11 '\\x00P' was copied into the ACK, which is stored
    NUL-joined with a commit ACK, so the sender got fragments instead of one ACK."""
    payload = (
        b"MSH|^~\\&|LAB|NORTH|SL|HOSP|20250314101500||ORU^R01|C1|\x00P|2.5.1|||AL|AL\r"
        b"PID|1||M1^^^NORTH^MR\rOBX|1|NM|1^X^LN||\x00182\r"
    )
    jobs, immediate = INTAKES[0].decide(payload, "127.0.0.1:1")
    assert immediate is None
    (job,) = jobs
    acks = split_acks(job.row.ack)
    assert [a[:4] for a in acks] == [b"MSH|", b"MSH|"]  # commit ACK + application ACK, both whole
    assert all(b"MSA|" in a for a in acks)
