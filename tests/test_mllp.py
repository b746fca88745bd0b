"""The sans-IO MLLP framer, tested with plain bytes: no sockets, no waiting.  The listener around it (timers,
limits, back-pressure) is tested on a fake clock and a fake transport in tests/test_listener.py."""

from __future__ import annotations

import time

import pytest

from engine.errors import FramingError
from engine.mllp import END, NEED_DATA, START, Closed, Event, Frame, Framer, Oversize, encode

VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"
MSG = b"MSH|^~\\&|APP|FAC|ENG|FAC|20250101120000||ADT^A01|CTRL1|P|2.5\rPID|1||123^^^HOSP^MR\r"


def drain(framer: Framer) -> list[Event]:
    """Events until NEED_DATA or Closed (inclusive of Closed)."""
    out: list[Event] = []
    while True:
        ev = framer.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
        if isinstance(ev, Closed):
            return out


def run(chunks: list[bytes], *, eof: bool = True, **kw: object) -> tuple[list[Event], Framer]:
    framer = Framer(**kw)  # type: ignore[arg-type]
    events: list[Event] = []
    for chunk in chunks:
        if chunk:  # b"" would mean EOF
            framer.receive_data(chunk, now=0.0)
            events += drain(framer)
    if eof:
        framer.receive_data(b"", now=0.0)
        events += drain(framer)
    return events, framer


def frames(*payloads: bytes) -> list[Event]:
    return [Frame(p) for p in payloads]


# -- the stream grammar: chunks → events (EOF appended) and junk count -------------------
CASES = [
    pytest.param([VT + MSG + END], [*frames(MSG), Closed(True)], 0, id="one-frame"),
    pytest.param([VT + END], [*frames(b""), Closed(True)], 0, id="empty-frame"),
    pytest.param([VT + b" \r\n" + END], [*frames(b" \r\n"), Closed(True)], 0, id="whitespace-frame"),
    pytest.param([b"hello" + VT + MSG + END], [*frames(MSG), Closed(True)], 5, id="junk-before-start"),
    pytest.param([b"\r\n", VT + MSG + END, b"\n"], [*frames(MSG), Closed(True)], 3, id="junk-between-reads"),
    pytest.param(
        [VT + b"a" + END + VT + b"b" + END + VT + b"c" + END],
        [*frames(b"a", b"b", b"c"), Closed(True)],
        0,
        id="three-frames-one-read",
    ),
    pytest.param(
        [VT + b"a" + END + b"\n" + VT + b"b" + END + b"\n"],
        [*frames(b"a", b"b"), Closed(True)],
        2,
        id="lf-after-each-frame",
    ),
    pytest.param([bytes([b]) for b in VT + MSG + END], [*frames(MSG), Closed(True)], 0, id="one-byte-reads"),
    pytest.param([VT + MSG[:10], MSG[10:] + FS, CR], [*frames(MSG), Closed(True)], 0, id="split-before-cr"),
    pytest.param(
        [VT + b"a" + END + VT + b"b", b"c" + END],
        [*frames(b"a", b"bc"), Closed(True)],
        0,
        id="frame-then-partial",
    ),
    pytest.param(
        [b"MSH|^~\\&|unframed\r"], [Closed(True)], len(b"MSH|^~\\&|unframed\r"), id="unframed-message"
    ),
    pytest.param(
        [VT + b"abc" + VT + b"def" + END], [*frames(b"def"), Closed(True)], 4, id="start-inside-frame"
    ),
    pytest.param(
        [VT + b"abc", VT + b"def", END], [*frames(b"def"), Closed(True)], 4, id="start-inside-frame-split"
    ),
    pytest.param(
        [VT + b"ab" + END + b"cd" + END], [*frames(b"ab"), Closed(True)], 4, id="end-block-inside-data"
    ),
    pytest.param([VT + b"partial"], [Closed(False)], 0, id="eof-mid-frame"),
    pytest.param([VT], [Closed(False)], 0, id="eof-after-start"),
    pytest.param([VT + b"abc" + FS], [Closed(False)], 0, id="eof-between-fs-and-cr"),
    pytest.param([], [Closed(True)], 0, id="connect-and-close"),
    pytest.param([b"junk"], [Closed(True)], 4, id="eof-after-junk"),
    pytest.param([VT + b"a" + END], [*frames(b"a"), Closed(True)], 0, id="eof-right-after-frame"),
]


@pytest.mark.parametrize(("chunks", "expected", "junk"), CASES)
def test_stream(chunks: list[bytes], expected: list[Event], junk: int) -> None:
    events, framer = run(chunks)
    assert events == expected
    assert framer.junk_bytes == junk


@pytest.mark.parametrize(("chunks", "expected", "junk"), CASES)
def test_stream_any_single_split(chunks: list[bytes], expected: list[Event], junk: int) -> None:
    data = b"".join(chunks)
    for cut in range(len(data) + 1):
        events, framer = run([data[:cut], data[cut:]])
        assert events == expected, cut
        assert framer.junk_bytes == junk, cut


@pytest.mark.parametrize(("chunks", "expected", "junk"), CASES)
def test_drained_means_the_next_event_is_need_data(
    chunks: list[bytes], expected: list[Event], junk: int
) -> None:
    """The listener skips asking the framer when it says ``drained``: then the answer is always NEED_DATA
    (and asking changes nothing), at every point of every stream split anywhere."""
    data = b"".join(chunks)
    for cut in range(len(data) + 1):
        framer = Framer()
        for chunk in [c for c in (data[:cut], data[cut:]) if c] + [b""]:  # b"" is the EOF, last
            framer.receive_data(chunk, now=0.0)
            while True:
                if framer.drained:
                    before = (framer.buffered, framer.junk_bytes, framer.deadline)
                    assert framer.next_event() is NEED_DATA, cut
                    assert (framer.buffered, framer.junk_bytes, framer.deadline) == before
                    break
                ev = framer.next_event()
                if ev is NEED_DATA or isinstance(ev, Closed):
                    break
            if not chunk:
                assert not framer.drained  # after EOF: Closed, never NEED_DATA


def test_need_data_without_eof() -> None:
    events, _ = run([VT + b"abc"], eof=False)
    assert events == []


def test_need_data_while_fs_pending() -> None:
    framer = Framer()
    framer.receive_data(VT + b"abc" + FS)
    assert framer.next_event() is NEED_DATA
    framer.receive_data(CR)
    assert framer.next_event() == Frame(b"abc")
    assert framer.next_event() is NEED_DATA


# -- 0x1C without 0x0D ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param([VT + b"abc" + FS + b"x"], id="fs-then-letter"),
        pytest.param([VT + b"abc" + FS, b"x"], id="fs-then-letter-split"),
        pytest.param([VT + b"abc" + FS + VT + b"d" + END], id="fs-then-start"),
        pytest.param([VT + b"abc" + FS + FS + CR], id="fs-fs-cr"),
        pytest.param([VT + b"abc" + FS + b"\n"], id="fs-lf"),
    ],
)
def test_fs_without_cr_is_framing_error(chunks: list[bytes]) -> None:
    framer = Framer()
    with pytest.raises(FramingError, match="0x1C"):
        for chunk in chunks:
            framer.receive_data(chunk)
            drain(framer)
    # The framer stays broken: the connection must be closed.
    with pytest.raises(FramingError):
        framer.next_event()
    assert framer.deadline is None


@pytest.mark.parametrize(
    ("chunks", "expected", "junk"),
    [
        pytest.param([VT + b"abc" + FS], [*frames(b"abc"), Closed(True)], 0, id="fs-alone-at-eof"),
        pytest.param([VT + b"abc" + FS, CR], [*frames(b"abc"), Closed(True)], 0, id="cr-swallowed-next-read"),
        pytest.param([VT + b"abc" + END], [*frames(b"abc"), Closed(True)], 0, id="normal-end"),
        pytest.param(
            [VT + b"a" + FS + VT + b"b" + FS], [*frames(b"a", b"b"), Closed(True)], 0, id="back-to-back-no-cr"
        ),
        pytest.param(
            [VT + b"a" + FS + b"xy" + VT + b"b" + FS],
            [*frames(b"a", b"b"), Closed(True)],
            2,
            id="junk-after-fs",
        ),
        pytest.param(
            [VT + b"a" + FS + CR + CR], [*frames(b"a"), Closed(True)], 1, id="only-one-cr-swallowed"
        ),
        pytest.param([VT + b"a" + FS, b"\n"], [*frames(b"a"), Closed(True)], 1, id="lf-after-fs-is-junk"),
    ],
)
def test_lenient_end(chunks: list[bytes], expected: list[Event], junk: int) -> None:
    data = b"".join(chunks)
    for split in (chunks, [data], [bytes([b]) for b in data]):
        events, framer = run(split, lenient_end=True)
        assert events == expected
        assert framer.junk_bytes == junk


def test_lenient_emits_frame_without_waiting_for_cr() -> None:
    # A sender that omits the CR waits for its ACK: the frame must come out at once.
    framer = Framer(lenient_end=True)
    framer.receive_data(VT + b"abc" + FS)
    assert framer.next_event() == Frame(b"abc")
    assert framer.next_event() is NEED_DATA


# -- size cap --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        pytest.param([VT + b"x" * 10 + END], [Frame(b"x" * 10)], id="exactly-cap"),
        pytest.param([VT + b"x" * 11 + END], [Oversize(11)], id="one-over-one-read"),
        pytest.param([VT + b"x" * 5, b"x" * 20, b"x" * 5 + END], [Oversize(30)], id="over-split"),
        pytest.param([VT + b"x" * 12 + FS, CR], [Oversize(12)], id="over-fs-pending"),
        pytest.param([VT + b"x" * 12, FS, CR], [Oversize(12)], id="over-then-fs-read"),
        pytest.param(
            [VT + b"x" * 50 + END + VT + b"ok" + END],
            [Oversize(50), Frame(b"ok")],
            id="next-frame-after-over",
        ),
        pytest.param(
            [VT + b"x" * 50, b"y" * 5 + VT + b"ok" + END], [Frame(b"ok")], id="restart-while-skipping"
        ),
        pytest.param([bytes([b]) for b in VT + b"z" * 40 + END], [Oversize(40)], id="over-one-byte-reads"),
    ],
)
def test_max_frame(chunks: list[bytes], expected: list[Event]) -> None:
    events, _ = run(chunks, max_frame=10)
    assert events == [*expected, Closed(True)]


def test_oversize_frame_is_not_buffered() -> None:
    framer = Framer(max_frame=1000)
    framer.receive_data(VT)
    for _ in range(500):
        framer.receive_data(b"x" * 1000)
        assert framer.next_event() is NEED_DATA
        assert len(framer._buf) <= 2000  # only the cap plus one read is ever held
    framer.receive_data(END + VT + b"next" + END)
    assert drain(framer) == [Oversize(500_000), Frame(b"next")]


def test_oversize_then_eof_is_unclean() -> None:
    events, _ = run([VT + b"x" * 100], max_frame=10)
    assert events == [Closed(False)]


# -- junk cap --------------------------------------------------------------------------------
def test_junk_past_cap_is_framing_error() -> None:
    framer = Framer(max_junk=100)
    framer.receive_data(b"j" * 100)
    assert framer.next_event() is NEED_DATA
    framer.receive_data(b"j")
    with pytest.raises(FramingError, match="outside MLLP frames"):
        framer.next_event()
    assert framer.junk_bytes == 101


def test_junk_cap_counts_junk_between_frames_only() -> None:
    # A sender appending LF to every frame never hits the cap on a long-lived connection.
    framer = Framer(max_junk=5)
    for _ in range(100):
        framer.receive_data(VT + b"m" + END + b"\n\n\n")
        assert drain(framer) == [Frame(b"m")]
    assert framer.junk_bytes == 300


def test_abandoned_partial_counts_as_junk() -> None:
    framer = Framer(max_junk=5)
    framer.receive_data(VT + b"abcdef" + VT)
    with pytest.raises(FramingError):
        framer.next_event()


# -- EOF ---------------------------------------------------------------------------------------
def test_closed_repeats_and_no_data_after_eof() -> None:
    framer = Framer()
    framer.receive_data(b"")
    assert framer.next_event() == Closed(True)
    assert framer.next_event() == Closed(True)
    with pytest.raises(RuntimeError):
        framer.receive_data(b"more")


def test_half_close_after_full_frame() -> None:
    framer = Framer()
    framer.receive_data(VT + MSG + END)
    framer.receive_data(b"")
    assert drain(framer) == [Frame(MSG), Closed(True)]


# -- per-frame deadline ------------------------------------------------------------------------
def test_deadline_is_total_per_frame() -> None:
    framer = Framer(frame_timeout=30.0)
    assert framer.deadline is None
    framer.receive_data(b"junk", now=1.0)
    assert framer.next_event() is NEED_DATA
    assert framer.deadline is None  # junk does not start a frame
    framer.receive_data(VT + b"M", now=100.0)
    assert framer.next_event() is NEED_DATA
    assert framer.deadline == 130.0
    for t in range(101, 140):  # slowloris: one byte a second does not move the deadline
        framer.receive_data(b"x", now=float(t))
        assert framer.next_event() is NEED_DATA
        assert framer.deadline == 130.0
    assert not framer.expired(129.9)
    assert framer.expired(130.0)
    framer.receive_data(END, now=140.0)
    assert isinstance(framer.next_event(), Frame)
    assert framer.deadline is None
    assert not framer.expired(10_000.0)


def test_deadline_starts_per_frame() -> None:
    framer = Framer(frame_timeout=5.0)
    framer.receive_data(VT + b"a" + END + VT + b"b", now=10.0)
    assert framer.next_event() == Frame(b"a")
    assert framer.next_event() is NEED_DATA
    assert framer.deadline == 15.0
    framer.receive_data(END + VT, now=20.0)
    assert framer.next_event() == Frame(b"b")
    assert framer.next_event() is NEED_DATA
    assert framer.deadline == 25.0


def test_start_inside_frame_does_not_restart_deadline() -> None:
    framer = Framer(frame_timeout=5.0)
    framer.receive_data(VT + b"a", now=10.0)
    assert framer.next_event() is NEED_DATA
    framer.receive_data(VT + b"b", now=14.0)
    assert framer.next_event() is NEED_DATA
    assert framer.deadline == 15.0


def test_deadline_cleared_on_unclean_eof() -> None:
    framer = Framer()
    framer.receive_data(VT + b"a", now=0.0)
    framer.receive_data(b"", now=1.0)
    assert framer.next_event() == Closed(False)
    assert framer.deadline is None


def test_deadline_without_now_reads_the_framers_clock() -> None:
    assert Framer().clock is time.monotonic  # the default
    clock = Clock()
    framer = Framer(frame_timeout=30.0, clock=clock)
    framer.receive_data(VT + b"a")
    assert framer.next_event() is NEED_DATA
    assert framer.deadline == 1030.0
    clock.now = 1029.5
    assert not framer.expired(clock())
    clock.now = 1030.0
    assert framer.expired(clock())


# -- linear time -------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_one_byte_at_a_time_is_linear() -> None:
    # Quadratic rescans would take minutes here (200k reads x 100 KB average rescans).
    payload = b"A" * 200_000
    framer = Framer()
    framer.receive_data(VT)
    assert framer.next_event() is NEED_DATA
    for b in payload:
        framer.receive_data(bytes((b,)), now=0.0)
        assert framer.next_event() is NEED_DATA
    framer.receive_data(END)
    assert framer.next_event() == Frame(payload)


@pytest.mark.timeout(60)
def test_many_start_blocks_then_end_is_linear() -> None:
    data = VT * 200_000 + b"x" + END
    framer = Framer(max_junk=10**9)
    framer.receive_data(data)
    assert framer.next_event() == Frame(b"x")
    assert framer.junk_bytes == 199_999


# -- encode ------------------------------------------------------------------------------------
def test_encode_round_trip() -> None:
    wire = encode(MSG)
    assert wire == START + MSG + END
    events, _ = run([wire * 3])
    assert events == [*frames(MSG, MSG, MSG), Closed(True)]


@pytest.mark.parametrize("bad", [pytest.param(b"a\x0bb", id="vt"), pytest.param(b"a\x1cb", id="fs")])
def test_encode_rejects_framing_bytes(bad: bytes) -> None:
    with pytest.raises(ValueError, match="framing byte"):
        encode(bad)


def test_bad_settings() -> None:
    with pytest.raises(ValueError):
        Framer(frame_timeout=0)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- what the listener reads from the framer ----------------------------------------------------------
def test_buffered_counts_what_is_not_handed_out() -> None:
    framer = Framer()
    framer.receive_data(encode(MSG) + VT + b"MSH|part")
    assert framer.buffered == len(encode(MSG)) + 9  # nothing taken yet
    assert framer.next_event() == Frame(MSG)
    assert framer.buffered == 9  # the partial frame (its start block included)
    assert framer.next_event() is NEED_DATA
    framer.receive_data(b"ial" + END)
    assert framer.next_event() == Frame(b"MSH|partial")
    assert framer.buffered == 0


def test_consumed_input_is_freed_when_a_frame_ends_the_read() -> None:
    framer = Framer()
    framer.receive_data(encode(b"A" * 1_000_000))
    assert framer.next_event() == Frame(b"A" * 1_000_000)
    assert framer.buffered == 0 and len(framer._buf) == 0  # not kept until the next read


def test_oversize_frame_holds_at_most_the_cap() -> None:
    framer = Framer(max_frame=1000)
    framer.receive_data(VT + b"x" * 100_000)
    assert framer.next_event() is NEED_DATA
    assert framer.buffered <= 1001
    framer.receive_data(b"y" * 100_000 + END)
    assert framer.next_event() == Oversize(200_000)
    assert framer.buffered == 0


def test_postpone_moves_only_a_running_deadline() -> None:
    framer = Framer(frame_timeout=30.0, clock=lambda: 100.0)
    framer.postpone(5.0)
    assert framer.deadline is None  # no frame in progress: nothing to move
    framer.receive_data(VT + b"MSH|")
    assert framer.next_event() is NEED_DATA
    assert framer.deadline == 130.0
    framer.postpone(7.5)
    assert framer.deadline == 137.5
    assert not framer.expired(137.0) and framer.expired(137.5)
