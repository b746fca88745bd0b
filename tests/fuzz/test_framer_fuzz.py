"""Property tests for the MLLP framer: read boundaries never change the outcome.

Bounded for CI (max_examples=300 per property, about two seconds in all).  For a longer
run set ``SLUICE_FUZZ_EXAMPLES`` (e.g. ``SLUICE_FUZZ_EXAMPLES=100000 pytest tests/fuzz``).
"""

from __future__ import annotations

import itertools
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import FramingError
from engine.mllp import END, NEED_DATA, START, Closed, Event, Frame, Framer, Oversize, encode

VT, FS, CR = 0x0B, 0x1C, 0x0D
EXAMPLES = int(os.environ.get("SLUICE_FUZZ_EXAMPLES", "300"))

# Streams rich in framing bytes (pure random bytes rarely form frames).
_tokens = st.sampled_from([b"\x0b", b"\x1c", b"\x0d", b"\x1c\x0d", b"\n", b"A", b"MSH|^~\\&|", b"\x00\xff"])
streams = st.one_of(
    st.binary(max_size=400),
    st.lists(_tokens, max_size=80).map(b"".join),
    st.lists(st.one_of(_tokens, st.binary(max_size=30)), max_size=40).map(b"".join),
)
configs = st.fixed_dictionaries(
    {
        "max_frame": st.sampled_from([0, 3, 16, 1 << 20]),
        "max_junk": st.sampled_from([0, 5, 64, 1 << 20]),
        "lenient_end": st.booleans(),
    }
)

Outcome = tuple[list[Event], str | None, int | None]


def feed(chunks: list[bytes], cfg: dict[str, int | bool]) -> Outcome:
    """Events, the error type (if any) and junk_bytes (when no error) after feeding chunks then EOF."""
    framer = Framer(**cfg)  # type: ignore[arg-type]
    events: list[Event] = []
    try:
        for chunk in [*[c for c in chunks if c], b""]:
            framer.receive_data(chunk, now=0.0)
            while True:
                ev = framer.next_event()
                if ev is NEED_DATA:
                    break
                events.append(ev)
                if isinstance(ev, Closed):
                    return events, None, framer.junk_bytes
    except FramingError:
        return events, "FramingError", None
    raise AssertionError("no Closed event after EOF")


def reference(data: bytes, cfg: dict[str, int | bool]) -> Outcome:
    """A byte-at-a-time model of the grammar in engine/mllp.py's docstring."""
    max_frame, max_junk, lenient = int(cfg["max_frame"]), int(cfg["max_junk"]), bool(cfg["lenient_end"])
    events: list[Event] = []
    junk = run = 0
    state = "out"
    content = bytearray()
    swallow = False

    def add_junk(n: int) -> bool:
        nonlocal junk, run
        junk += n
        run += n
        return run > max_junk

    def emit() -> None:
        nonlocal run
        events.append(Oversize(len(content)) if len(content) > max_frame else Frame(bytes(content)))
        run = 0

    for b in data:
        if state == "fs":
            if b == CR:
                emit()
                state = "out"
                continue
            if not lenient:
                return events, "FramingError", None
            # (lenient frames were emitted on the 0x1C already)
            state = "out"
        if state == "out":
            if swallow:
                swallow = False
                if b == CR:
                    continue
            if b == VT:
                state, content = "in", bytearray()
            elif add_junk(1):
                return events, "FramingError", None
        elif b == VT:
            if add_junk(1 + len(content)):
                return events, "FramingError", None
            content = bytearray()
        elif b == FS:
            if lenient:
                emit()
                state, swallow = "out", True
            else:
                state = "fs"
        else:
            content.append(b)
    events.append(Closed(state == "out"))
    return events, None, junk


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=streams, cfg=configs, draw=st.data())
def test_any_split_gives_the_same_events(
    data: bytes, cfg: dict[str, int | bool], draw: st.DataObject
) -> None:
    whole = feed([data], cfg)
    assert feed(draw.draw(split(data)), cfg) == whole
    assert feed([bytes((b,)) for b in data], cfg) == whole


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=streams, cfg=configs)
def test_matches_reference_model(data: bytes, cfg: dict[str, int | bool]) -> None:
    events, error, junk = feed([data], cfg)
    ref_events, ref_error, ref_junk = reference(data, cfg)
    assert (events, error) == (ref_events, ref_error)
    if error is None:
        assert junk == ref_junk


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    payloads=st.lists(
        st.binary(max_size=200).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b"")), max_size=10
    ),
    junk=st.lists(st.binary(max_size=20).map(lambda b: b.replace(b"\x0b", b"")), max_size=11),
    draw=st.data(),
)
def test_encoded_frames_survive_junk_and_splits(
    payloads: list[bytes], junk: list[bytes], draw: st.DataObject
) -> None:
    junk = junk + [b""] * (len(payloads) + 1 - len(junk))
    stream = junk[0] + b"".join(encode(p) + j for p, j in zip(payloads, junk[1:], strict=False))
    events, error, _ = feed(
        draw.draw(split(stream)), {"max_frame": 1 << 20, "max_junk": 1 << 20, "lenient_end": False}
    )
    # Outside a frame 0x1C is plain junk, so well-formed frames between junk never fail.
    assert error is None
    assert [e for e in events if isinstance(e, Frame)] == [Frame(p) for p in payloads]


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.binary(max_size=2000), cfg=configs)
def test_never_raises_anything_but_framing_error(data: bytes, cfg: dict[str, int | bool]) -> None:
    framer = Framer(**cfg)  # type: ignore[arg-type]
    try:
        if data:  # b"" would be EOF
            framer.receive_data(data)
            while framer.next_event() is not NEED_DATA:
                pass
        framer.receive_data(b"")
        assert isinstance(framer.next_event(), Closed)
    except FramingError:
        pass


def test_constants() -> None:
    assert (START, END) == (b"\x0b", b"\x1c\x0d")
