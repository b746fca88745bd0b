"""MLLP framing abuse against a real engine process, byte by byte over raw sockets.

One engine for the module with two channels: ``frm`` (short deadlines, 64 KiB frame cap, 4 KiB junk
cap) and ``cap`` (a 20-connection cap with a 2 s idle timeout).  Every test ends by checking that the
engine still answers a normal message on a fresh connection with AA.
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

FRAME_TIMEOUT = 1.5
IDLE = 2.5
MAX_FRAME = 64 * 1024
MAX_JUNK = 4096
CAP = 20
CAP_IDLE = 2.0


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


def _lines_for_peer(eng: Engine, sock_name: tuple[str, int]) -> list[dict[str, object]]:
    peer = f"{sock_name[0]}:{sock_name[1]}"
    return [e for e in eng.log_lines() if e.get("peer") == peer]


def test_junk_before_start_block_is_discarded_counted_and_connection_kept(eng: Engine) -> None:
    port = eng.ports["frm"]
    c1, c2 = uid("J"), uid("J")
    with connect(port) as s:
        me = s.getsockname()
        r = Reader(s)
        s.sendall(b"\r\nnoise from a terminal\x00\xff" + frame(adt(c1)))
        a1 = parse_ack(r.one())
        assert (a1.code, a1.control_id) == ("AA", c1)
        # Same connection keeps working after the junk.
        s.sendall(b"more junk" + frame(adt(c2)))
        a2 = parse_ack(r.one())
        assert (a2.code, a2.control_id) == ("AA", c2)
    assert eng.rows(c1)[0].raw == adt(c1)  # the junk is not part of the message
    time.sleep(0.2)
    junk = [e for e in _lines_for_peer(eng, me) if e.get("event") == "junk_discarded"]
    assert sum(int(e["bytes"]) for e in junk) == len(b"\r\nnoise from a terminal\x00\xff") + len(b"more junk")  # type: ignore[call-overload]
    eng.assert_serving("frm")


def test_only_junk_is_closed_at_the_byte_cap(eng: Engine) -> None:
    with connect(eng.ports["frm"]) as s:
        r = Reader(s)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b"X" * (MAX_JUNK + 100))
        took = r.wait_closed(IDLE - 0.5)  # closed by the cap, well before the idle timeout
        assert took < IDLE
        assert not r.buf  # no ACK for junk
    eng.assert_serving("frm")


def test_only_junk_is_closed_at_idle_timeout(eng: Engine) -> None:
    with connect(eng.ports["frm"]) as s:
        r = Reader(s)
        s.sendall(b"hello? anyone there?\r\n")
        took = r.wait_closed(IDLE + 3)
        assert IDLE - 0.5 <= took <= IDLE + 2.5
        assert not r.buf
    eng.assert_serving("frm")


def test_unframed_msh_gets_no_ack_and_is_not_stored_and_connection_still_usable(eng: Engine) -> None:
    cid, good = uid("U"), uid("U")
    with connect(eng.ports["frm"]) as s:
        r = Reader(s)
        s.sendall(adt(cid))  # no MLLP framing at all
        r.nothing(1.0)
        # A properly framed message on the same connection afterwards is answered (beat Google's receiver).
        s.sendall(frame(adt(good)))
        a = parse_ack(r.one())
        assert (a.code, a.control_id) == ("AA", good)
    assert eng.rows(cid) == []
    eng.assert_serving("frm")


def test_start_block_then_silence_hits_frame_deadline(eng: Engine) -> None:
    cid = uid("S")
    with connect(eng.ports["frm"]) as s:
        r = Reader(s)
        s.sendall(VT + adt(cid)[:40])
        took = r.wait_closed(FRAME_TIMEOUT + 3)
        assert FRAME_TIMEOUT - 0.3 <= took <= FRAME_TIMEOUT + 2, took
        assert not r.buf
    assert eng.rows(cid) == []
    eng.assert_serving("frm")


def test_start_block_then_eof_is_dropped_without_ack(eng: Engine) -> None:
    cid = uid("E")
    with connect(eng.ports["frm"]) as s:
        r = Reader(s)
        s.sendall(VT + adt(cid))  # complete message, but the end block never comes
        s.shutdown(socket.SHUT_WR)
        r.wait_closed(3)
        assert not r.buf
    time.sleep(0.2)
    assert eng.rows(cid) == []
    eng.assert_serving("frm")


def test_fs_without_cr_is_a_protocol_error_and_closes(eng: Engine) -> None:
    cid = uid("F")
    with connect(eng.ports["frm"]) as s:
        r = Reader(s)
        s.sendall(VT + adt(cid) + FS + b"X")
        r.wait_closed(3)
        assert not r.buf
    time.sleep(0.2)
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
        r.nothing(0.7)  # the remainder is junk: no second ACK
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
    """One byte every 0.2 s keeps resetting any per-read timer; the total frame deadline still wins."""
    cid = uid("L")
    data = VT + adt(cid)
    with connect(eng.ports["frm"]) as s:
        s.settimeout(0.05)
        t0 = time.monotonic()
        closed_at = None
        for i in range(len(data)):
            try:
                s.send(data[i : i + 1])
                got = s.recv(100)
                if got == b"":
                    closed_at = time.monotonic() - t0
                    break
                pytest.fail(f"unexpected reply {got!r}")
            except TimeoutError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                closed_at = time.monotonic() - t0
                break
            time.sleep(0.2)
            if time.monotonic() - t0 > FRAME_TIMEOUT + 4:
                break
        assert closed_at is not None, "slow sender was never cut off"
        assert closed_at < FRAME_TIMEOUT + 1.5 < IDLE + 1.5
    assert eng.rows(cid) == []
    eng.assert_serving("frm")


@pytest.mark.parametrize("payload", [b"", b" \r\n\t ", b"\r\r\r"], ids=["empty", "whitespace", "crs"])
def test_empty_frame_is_ar_with_empty_msa2_and_nothing_stored(eng: Engine, payload: bytes) -> None:
    before = eng.count()
    a = parse_ack(send_one(eng.ports["frm"], payload))
    assert a.code == "AR" and a.control_id == ""
    time.sleep(0.2)
    assert eng.count() == before
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


def test_many_idle_connections_cap_and_idle_timeout(eng: Engine) -> None:
    """300 idle connections (not thousands, to stay fast) against a cap of 20 with a 2 s idle timeout."""
    port = eng.ports["cap"]
    socks: list[socket.socket] = []
    try:
        for _ in range(300):
            socks.append(connect(port))
        # Other channels keep serving while this one is saturated.
        eng.assert_serving("frm")
        time.sleep(0.5)
        open_ = []
        for s in socks:
            r = Reader(s)
            s.setblocking(False)
            try:
                data = s.recv(10)
                assert data == b""
            except BlockingIOError:
                open_.append(s)  # still open
            except ConnectionResetError:
                pass  # refused at the cap
            finally:
                s.setblocking(True)
            del r
        assert 1 <= len(open_) <= CAP, len(open_)
        # The accepted idle ones are closed by the idle timeout.
        t0 = time.monotonic()
        for s in open_:
            Reader(s).wait_closed(CAP_IDLE + 4 - (time.monotonic() - t0))
        assert time.monotonic() - t0 < CAP_IDLE + 3
    finally:
        for s in socks:
            s.close()
    eng.assert_serving("cap")
    eng.assert_serving("frm")


def test_connect_and_close_is_silent(eng: Engine) -> None:
    names = []
    for _ in range(20):
        s = connect(eng.ports["frm"])
        names.append(s.getsockname())
        s.close()
    time.sleep(0.3)
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
        r.wait_closed(3)
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
        r.wait_closed(3)
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
