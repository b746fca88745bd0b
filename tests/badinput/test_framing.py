"""MLLP framing abuse against a real engine process, byte by byte over raw sockets.

One engine for the module with two channels: ``frm`` (short deadlines, 64 KiB frame cap, 4 KiB junk
cap) and ``cap`` (a 20-connection cap with a 60 s idle timeout).  Every test ends by checking that the
engine still answers a normal message on a fresh connection with AA.

Nothing here measures how long the engine took: a timeout is shown to happen, and to be the one
expected, by the event the engine logs for that connection (``connection_idle_closed``,
``frame_deadline_exceeded``, ``framing_error``).  The exact timing rules (idle time counted from the
last complete frame or ACK, never from junk; the frame deadline total however often bytes arrive) are
tested on a fake clock in tests/test_listener.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import store as st
from tests.badinput.conftest import (
    CR,
    FS,
    VT,
    Engine,
    Reader,
    adt,
    connect,
    frame,
    parse_ack,
    rst_close,
    send_one,
    start_engine,
    uid,
)
from tests.support.polling import wait_for

FRAME_TIMEOUT = 1.5
IDLE = 2.5
MAX_FRAME = 64 * 1024
MAX_JUNK = 4096
CAP = 20
CAP_IDLE = 60.0  # longer than any test here: only the cap closes connections on this channel


@pytest.fixture(scope="module")
def eng(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    base: Path = tmp_path_factory.mktemp("framing")
    yield from start_engine(
        base,
        {
            "frm": {
                "source": {
                    "idle_timeout": IDLE,
                    "frame_timeout": FRAME_TIMEOUT,
                    "max_frame": MAX_FRAME,
                    "max_junk": MAX_JUNK,
                }
            },
            "cap": {
                "source": {"max_connections": CAP, "idle_timeout": CAP_IDLE, "frame_timeout": FRAME_TIMEOUT}
            },
        },
    )


# A client connection as the engine log names it (host, port), and the log's length when it connected: the
# OS reuses ephemeral ports, so lines of an earlier test's connection from the same port are not this one's
Peer = tuple[str, int, int]


def _peer(eng: Engine, s: socket.socket) -> Peer:
    """Call right after connecting, before sending: what the engine logs of ``s`` comes after this mark."""
    host, port = s.getsockname()[:2]
    return host, port, eng.log_size()


def _lines_for_peer(eng: Engine, peer: Peer) -> list[dict[str, object]]:
    host, port, since = peer
    name = f"{host}:{port}"
    return [e for e in eng.log_lines(since) if e.get("peer") == name]


CLOSE_EVENTS = ("connection_idle_closed", "frame_deadline_exceeded", "framing_error")


def _close_reason(eng: Engine, peer: Peer) -> str:
    """The event the engine logged when it closed this connection (waits for the log line)."""

    def reasons() -> list[str]:
        return [str(e["event"]) for e in _lines_for_peer(eng, peer) if e.get("event") in CLOSE_EVENTS]

    found = wait_for(reasons, what=f"a close event for {peer[:2]} in the engine log")
    assert len(found) == 1, found
    return found[0]


def test_junk_before_start_block_is_discarded_counted_and_connection_kept(eng: Engine) -> None:
    port = eng.ports["frm"]
    c1, c2 = uid("J"), uid("J")
    with connect(port) as s:
        me = _peer(eng, s)
        r = Reader(s)
        s.sendall(b"\r\nnoise from a terminal\x00\xff" + frame(adt(c1)))
        a1 = parse_ack(r.one())
        assert (a1.code, a1.control_id) == ("AA", c1)
        # Same connection keeps working after the junk.
        s.sendall(b"more junk" + frame(adt(c2)))
        a2 = parse_ack(r.one())
        assert (a2.code, a2.control_id) == ("AA", c2)
    assert eng.rows(c1)[0].raw == adt(c1)  # the junk is not part of the message
    expected = len(b"\r\nnoise from a terminal\x00\xff") + len(b"more junk")

    def junk_logged() -> int:
        return sum(
            int(str(e["bytes"])) for e in _lines_for_peer(eng, me) if e.get("event") == "junk_discarded"
        )

    wait_for(
        lambda: junk_logged() >= expected, what=lambda: f"{expected} junk bytes logged (have {junk_logged()})"
    )
    assert junk_logged() == expected
    eng.assert_serving("frm")


def test_only_junk_is_closed_at_the_byte_cap(eng: Engine) -> None:
    with connect(eng.ports["frm"]) as s:
        me = _peer(eng, s)
        r = Reader(s)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b"X" * (MAX_JUNK + 100))
        r.wait_closed()
        assert not r.buf  # no ACK for junk
    assert _close_reason(eng, me) == "framing_error"  # the junk cap closed it, not the idle timeout
    eng.assert_serving("frm")


def test_only_junk_is_closed_at_idle_timeout(eng: Engine) -> None:
    with connect(eng.ports["frm"]) as s:
        me = _peer(eng, s)
        r = Reader(s)
        s.sendall(b"hello? anyone there?\r\n")
        r.wait_closed()
        assert not r.buf
    events = [str(e["event"]) for e in _lines_for_peer(eng, me)]
    assert _close_reason(eng, me) == "connection_idle_closed"
    # In order: the junk was read (and discarded: junk is not activity), then the connection was closed
    # for idling.
    assert events.index("junk_discarded") < events.index("connection_idle_closed"), events
    eng.assert_serving("frm")


def test_unframed_msh_gets_no_ack_and_is_not_stored_and_connection_still_usable(eng: Engine) -> None:
    cid, good = uid("U"), uid("U")
    with connect(eng.ports["frm"]) as s:
        r = Reader(s)
        s.sendall(adt(cid))  # no MLLP framing at all
        # A properly framed message on the same connection afterwards is answered (beat Google's receiver),
        # and its ACK is the first frame back: nothing answered the unframed bytes.
        s.sendall(frame(adt(good)))
        a = parse_ack(r.one())
        assert (a.code, a.control_id) == ("AA", good)
    assert eng.rows(cid) == []
    eng.assert_serving("frm")


def test_start_block_then_silence_hits_frame_deadline(eng: Engine) -> None:
    cid = uid("S")
    with connect(eng.ports["frm"]) as s:
        me = _peer(eng, s)
        r = Reader(s)
        s.sendall(VT + adt(cid)[:40])
        r.wait_closed()
        assert not r.buf
    # FRAME_TIMEOUT < IDLE: the frame deadline, not the idle timeout, closed it
    assert _close_reason(eng, me) == "frame_deadline_exceeded"
    assert eng.rows(cid) == []
    eng.assert_serving("frm")


# In the next two tests the engine closes the connection only after its last frame was answered, and
# a frame is committed before it is answered: so once the connection is closed, a row stored for the
# message would be there already.


def test_start_block_then_eof_is_dropped_without_ack(eng: Engine) -> None:
    cid = uid("E")
    with connect(eng.ports["frm"]) as s:
        r = Reader(s)
        s.sendall(VT + adt(cid))  # complete message, but the end block never comes
        s.shutdown(socket.SHUT_WR)
        r.wait_closed()
        assert not r.buf
    assert eng.rows(cid) == []
    eng.assert_serving("frm")


def test_fs_without_cr_is_a_protocol_error_and_closes(eng: Engine) -> None:
    cid = uid("F")
    with connect(eng.ports["frm"]) as s:
        me = _peer(eng, s)
        r = Reader(s)
        s.sendall(VT + adt(cid) + FS + b"X")
        r.wait_closed()
        assert not r.buf
    assert _close_reason(eng, me) == "framing_error"
    assert eng.rows(cid) == []
    eng.assert_serving("frm")


def test_end_block_inside_data_cuts_the_frame_and_rest_is_junk(eng: Engine) -> None:
    cid, after = uid("C"), uid("C")
    msg = adt(cid)
    cut = msg.index(b"\rPID") + 1  # cut after the MSH segment
    head, tail = msg[:cut], msg[cut:]
    with connect(eng.ports["frm"]) as s:
        r = Reader(s)
        s.sendall(VT + head + FS + CR + tail + FS + CR)
        a = parse_ack(r.one())
        # The cut frame is a (short) message of its own: its MSH is intact, so it is answered.
        assert a.control_id == cid and a.code in ("AA", "AE", "AR")
        # The remainder is junk: no second ACK, so the next frame back answers the next message.
        s.sendall(frame(adt(after)))
        a2 = parse_ack(r.one())
        assert (a2.code, a2.control_id) == ("AA", after)
    (row,) = eng.rows(cid)
    assert row.raw == head
    eng.assert_serving("frm")


def test_two_frames_in_one_write_get_two_acks_in_order(eng: Engine) -> None:
    ids = [uid("T") for _ in range(5)]
    with connect(eng.ports["frm"]) as s:
        s.sendall(b"".join(frame(adt(c)) for c in ids))
        acks = [parse_ack(a) for a in Reader(s).frames(len(ids))]
    assert [(a.code, a.control_id) for a in acks] == [("AA", c) for c in ids]
    eng.assert_serving("frm")


def test_frame_one_byte_at_a_time(eng: Engine) -> None:
    cid = uid("O")
    data = frame(adt(cid))
    with connect(eng.ports["frm"]) as s:
        for i in range(len(data)):
            s.send(data[i : i + 1])
            if i % 8 == 0:
                time.sleep(0.001)
        a = parse_ack(Reader(s).one())
    assert (a.code, a.control_id) == ("AA", cid)
    assert eng.rows(cid)[0].raw == adt(cid)
    eng.assert_serving("frm")


def test_slowloris_is_closed_by_total_frame_deadline(eng: Engine) -> None:
    """One byte every 0.2 s (far inside the idle timeout) keeps resetting any per-read timer; the total
    frame deadline still cuts the sender off before the frame is complete."""
    cid = uid("L")
    data = VT + adt(cid)
    sent = 0
    with connect(eng.ports["frm"]) as s:
        me = _peer(eng, s)
        s.settimeout(0.2)  # the pace: wait this long for a reply (there should be none) after each byte
        closed = False
        for i in range(len(data)):
            try:
                s.send(data[i : i + 1])
                sent += 1
                got = s.recv(100)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            assert got == b"", f"unexpected reply {got!r}"
            closed = True
            break
        assert closed, "slow sender was never cut off"
    assert sent < len(data)  # cut off mid-frame
    assert _close_reason(eng, me) == "frame_deadline_exceeded"
    assert eng.rows(cid) == []
    eng.assert_serving("frm")


@pytest.mark.parametrize("payload", [b"", b" \r\n\t ", b"\r\r\r"], ids=["empty", "whitespace", "crs"])
def test_empty_frame_is_ar_with_empty_msa2_and_nothing_stored(eng: Engine, payload: bytes) -> None:
    before = eng.count()
    a = parse_ack(send_one(eng.ports["frm"], payload))
    assert a.code == "AR" and a.control_id == ""
    assert eng.count() == before  # rows are committed before the ACK goes out: none was
    eng.assert_serving("frm")


def test_binary_garbage_is_ar_and_quarantined(eng: Engine) -> None:
    rnd = bytes(b for b in os.urandom(600) if b not in (0x0B, 0x1C))
    garbage = b"\x7fELF" + rnd
    a = parse_ack(send_one(eng.ports["frm"], garbage))
    assert a.code == "AR" and a.control_id == "" and a.err_code in ("100", "101")
    row = eng.latest("frm")
    assert row.raw == garbage and row.status == st.QUARANTINED
    eng.assert_serving("frm")


def test_frame_over_size_cap_is_ar_207_and_connection_continues(eng: Engine) -> None:
    cid, after = uid("Z"), uid("Z")
    big = adt(cid, extra="NTE|1||" + "A" * (MAX_FRAME + 1000) + "\r")
    before = eng.count()
    with connect(eng.ports["frm"]) as s:
        r = Reader(s)
        s.sendall(frame(big))
        a = parse_ack(r.one())
        assert a.code == "AR" and a.err_code == "207"
        s.sendall(frame(adt(after)))
        a2 = parse_ack(r.one())
        assert (a2.code, a2.control_id) == ("AA", after)
    assert eng.rows(cid) == [] and eng.count() == before + 1
    eng.assert_serving("frm")


def test_at_the_cap_newcomers_are_served_and_the_idle_longest_are_closed(eng: Engine) -> None:
    """300 connections (not thousands, to stay fast) against a cap of 20: every newcomer is let in and the
    connection idle the longest is closed for it, so the engine never holds more than 20 and the last 20
    to arrive are the ones open; one more newcomer with a message gets its AA.  (Which connection goes is
    tested exactly on a fake transport in tests/test_listener.py; 1,200 connections at the default cap
    in tests/engine/test_hostile.py.)"""
    port = eng.ports["cap"]
    first: list[socket.socket] = []
    later: list[socket.socket] = []

    def evictions() -> int:
        """connection_evicted lines, plus those the log flood control summarised instead."""
        lines = eng.log_lines()
        shown = sum(1 for e in lines if e.get("event") == "connection_evicted")
        left_out = sum(
            int(str(e["count"]))
            for e in lines
            if e.get("event") == "log_suppressed" and e.get("of") == "connection_evicted"
        )
        return shown + left_out

    before = evictions()
    try:
        for _ in range(CAP):  # fill the cap; each answers a message, so the engine has accepted it
            s = connect(port)
            first.append(s)
            cid = uid("CAP")
            s.sendall(frame(adt(cid)))
            a = parse_ack(Reader(s).one())
            assert (a.code, a.control_id) == ("AA", cid)
        for s in first:  # junk outside a frame is not activity: it keeps no slot
            s.sendall(b"\r")
        for _ in range(300 - CAP):
            later.append(connect(port))
            time.sleep(0.001)  # arrival order is idle order
        gone = [Reader(s) for s in first + later[:-CAP]]
        kept = [Reader(s) for s in later[-CAP:]]
        wait_for(
            lambda: not any(r.is_open() for r in gone),
            what=lambda: (
                f"the engine to close the 280 idle the longest ({sum(r.is_open() for r in gone)} open)"
            ),
        )
        assert not any(r.buf for r in gone)  # closed without a byte written
        assert all(r.is_open() for r in kept)
        # A newcomer with a message is served at the cap too, and the oldest of the 20 kept goes for it.
        eng.assert_serving("cap")
        wait_for(
            lambda: not kept[0].is_open(), what="the oldest kept connection to be closed for the newcomer"
        )
        assert all(r.is_open() for r in kept[1:])
        # One eviction per newcomer, each logged (or counted in a flood-control summary).
        wait_for(
            lambda: evictions() - before >= 281, what=lambda: f"281 evictions logged ({evictions() - before})"
        )
        assert evictions() - before == 281
        # Other channels keep serving while this one is saturated.
        eng.assert_serving("frm")
    finally:
        for s in first + later:
            s.close()
    eng.assert_serving("cap")
    eng.assert_serving("frm")


def test_connect_and_close_is_silent(eng: Engine) -> None:
    names = []
    for _ in range(20):
        s = connect(eng.ports["frm"])
        names.append(_peer(eng, s))
        s.close()
    # A full round trip through the engine after the 20 closes: the engine handled each close (and
    # logged anything it had to say about it) before it read this later connection's message.
    eng.assert_serving("frm")
    for n in names:
        noisy = [e for e in _lines_for_peer(eng, n) if e.get("level") in ("warning", "error")]
        assert noisy == []
    eng.assert_serving("frm")


def test_half_close_after_full_frame_is_processed_acked_and_closed(eng: Engine) -> None:
    cid = uid("H")
    with connect(eng.ports["frm"]) as s:
        s.sendall(frame(adt(cid)))
        s.shutdown(socket.SHUT_WR)
        r = Reader(s)
        a = parse_ack(r.one())
        assert (a.code, a.control_id) == ("AA", cid)
        r.wait_closed()
        assert not r.reset
    assert eng.rows(cid)[0].raw == adt(cid)
    eng.assert_serving("frm")


def test_half_close_after_several_frames_answers_all(eng: Engine) -> None:
    ids = [uid("H") for _ in range(3)]
    with connect(eng.ports["frm"]) as s:
        s.sendall(b"".join(frame(adt(c)) for c in ids))
        s.shutdown(socket.SHUT_WR)
        r = Reader(s)
        acks = [parse_ack(a) for a in r.frames(3)]
        r.wait_closed()
    assert [(a.code, a.control_id) for a in acks] == [("AA", c) for c in ids]


def test_reset_before_ack_commits_and_resend_is_deduped(eng: Engine) -> None:
    cid = uid("R")
    msg = adt(cid)
    s = connect(eng.ports["frm"])
    s.sendall(frame(msg))
    rst_close(s)  # the sender never reads the ACK
    row = eng.wait_row(cid, timeout=5)
    assert row.raw == msg and row.ack_code == "AA"
    # The sender resends (it never saw an ACK): same ACK, byte for byte, and still one row.
    again = send_one(eng.ports["frm"], msg)
    assert again == bytes(row.ack)
    assert len(eng.rows(cid)) == 1
    eng.assert_serving("frm")
