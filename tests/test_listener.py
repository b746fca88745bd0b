"""The asyncio MLLP listener on a fake clock and a fake transport: timers, fair connection limits and
back-pressure (issue #12), with no sockets and no waiting.  Against a real engine process and real
sockets: tests/engine/test_hostile.py."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any, cast

from engine.config import LimitsConfig, SourceConfig
from engine.intake import Intake
from engine.limits import InflightBudget
from engine.listener import Listener, MLLPProtocol
from engine.mllp import encode

VT = b"\x0b"
ACK_HEAD = b"MSH|^~\\&|ENG|FAC|APP|FAC|20250101120000||ACK^A01^ACK|A1|P|2.5\rMSA|AA|"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTransport:
    """What MLLPProtocol uses of an asyncio transport, recording what happens to it.

    With ``reads_acks=False`` the peer reads nothing: ACK bytes pile up as unsent and, past the
    protocol's high-water mark, the transport calls ``pause_writing`` as asyncio's do.
    """

    _ports = itertools.count(40000)

    def __init__(self, host: str = "127.0.0.1", *, reads_acks: bool = True) -> None:
        self.peer = (host, next(self._ports))
        self.reads_acks = reads_acks
        self.protocol: MLLPProtocol | None = None
        self.written = bytearray()  # what the peer has read
        self.unsent = bytearray()  # what it has not read yet
        self.high = 64 * 1024
        self.write_paused = False
        self.reading = True
        self.closed = False
        self.aborted = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = high if high is not None else self.high

    def write(self, data: bytes) -> None:
        if self.reads_acks:
            self.written += data
            return
        self.unsent += data
        if len(self.unsent) > self.high and not self.write_paused:
            self.write_paused = True
            assert self.protocol is not None
            self.protocol.pause_writing()

    def peer_reads(self) -> None:
        self.written += self.unsent
        self.unsent.clear()
        if self.write_paused:
            self.write_paused = False
            assert self.protocol is not None
            self.protocol.resume_writing()

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def acks(self) -> list[bytes]:
        """MSA-2 of every ACK the peer has read, in order."""
        return [bytes(f.split(b"MSA|AA|")[1].split(b"\r")[0]) for f in self.written.split(VT)[1:]]


def ack(payload: bytes) -> bytes:
    return ACK_HEAD + payload + b"\r"


class AckingIntake:
    """Answers each frame at once with an AA echoing the frame (as intake does for an empty frame)."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    async def handle(self, payload: bytes, peer: str) -> list[bytes]:
        self.seen.append(payload)
        return [ack(payload)]


class GatedIntake:
    """Answers each frame with an AA echoing it, one per ``release()`` (a slow store, by hand)."""

    def __init__(self) -> None:
        self.gate = asyncio.Semaphore(0)
        self.seen: list[bytes] = []

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()

    async def handle(self, payload: bytes, peer: str) -> list[bytes]:
        self.seen.append(payload)
        await self.gate.acquire()
        return [ack(payload)]


def listener(
    clock: Clock,
    intake: object | None = None,
    *,
    limits: LimitsConfig | None = None,
    budget: InflightBudget[MLLPProtocol] | None = None,
    **source: Any,
) -> Listener:
    src = SourceConfig(**{"idle_timeout": 10.0, "frame_timeout": 4.0, **source})
    return Listener(
        "c", src, cast(Intake, intake or AckingIntake()), clock=clock, limits=limits, budget=budget
    )


def connect(lst: Listener, transport: FakeTransport | None = None) -> tuple[MLLPProtocol, FakeTransport]:
    tr = transport or FakeTransport()
    proto = MLLPProtocol(lst)
    tr.protocol = proto
    proto.connection_made(cast(asyncio.Transport, tr))
    return proto, tr


def one_connection(
    intake: object | None = None, transport: FakeTransport | None = None, **options: Any
) -> tuple[Clock, Listener, MLLPProtocol, FakeTransport]:
    """A listener on a clock of its own (``options`` as for :func:`listener`) and one connection to it."""
    clock = Clock()
    lst = listener(clock, intake, **options)
    proto, tr = connect(lst, transport)
    return clock, lst, proto, tr


def assert_idle_closed_after_10s(clock: Clock, lst: Listener, proto: MLLPProtocol, tr: FakeTransport) -> None:
    """Open 9.5 s from the last activity, closed (an orderly close, counted idle) at the idle_timeout of 10 s."""
    clock.now += 9.5
    proto._on_timer()
    assert not tr.is_closing()
    clock.now += 0.5
    proto._on_timer()
    assert tr.closed and not tr.aborted and lst.stats.idle_closed == 1


def frames(*payloads: bytes) -> bytes:
    return b"".join(encode(p) for p in payloads)


async def settle(proto: MLLPProtocol) -> None:
    """Let the connection's worker run until it waits for something."""
    for _ in range(200):
        await asyncio.sleep(0)
    del proto


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())  # type: ignore[arg-type]


# -- timers ------------------------------------------------------------------------------------------
def test_idle_timeout_counts_complete_frames_not_junk() -> None:
    async def main() -> None:
        clock, lst, proto, tr = one_connection()
        clock.now += 9.5
        proto.data_received(b"noise, then more noise")  # junk outside a frame is not activity
        proto._on_timer()
        assert not tr.is_closing()
        clock.now += 0.5  # idle_timeout after connecting
        proto._on_timer()
        assert tr.closed and not tr.aborted  # an orderly close
        assert (lst.stats.idle_closed, lst.stats.frame_timeouts) == (1, 0)
        proto.connection_lost(None)

    run(main)


def test_a_complete_frame_and_its_ack_restart_the_idle_time() -> None:
    async def main() -> None:
        clock, lst, proto, tr = one_connection()
        clock.now += 9.5
        proto.data_received(encode(b"M1"))
        await settle(proto)
        assert tr.acks() == [b"M1"]
        assert_idle_closed_after_10s(clock, lst, proto, tr)
        proto.connection_lost(None)

    run(main)


def test_frame_deadline_is_total_however_often_bytes_arrive() -> None:
    async def main() -> None:
        clock, lst, proto, tr = one_connection()
        proto.data_received(VT + b"MSH|")
        for _ in range(7):  # slowloris: a byte every 0.5 s
            clock.now += 0.5
            proto.data_received(b"x")
            proto._on_timer()
            assert not tr.is_closing()
        clock.now += 0.5  # frame_timeout after the start block, 0.5 s after the last byte
        proto._on_timer()
        assert tr.aborted and not tr.written  # cut off, no ACK
        assert (lst.stats.frame_timeouts, lst.stats.idle_closed) == (1, 0)
        proto.connection_lost(None)

    run(main)


def test_a_frame_being_answered_is_not_idle_and_the_ack_is_activity() -> None:
    async def main() -> None:
        intake = GatedIntake()
        clock, lst, proto, tr = one_connection(intake)
        proto.data_received(encode(b"M1"))
        await settle(proto)
        assert intake.seen == [b"M1"]
        clock.now += 60  # far past idle_timeout, but intake has not answered yet
        proto._on_timer()
        assert not tr.is_closing()
        intake.release()
        await settle(proto)
        assert tr.acks() == [b"M1"]
        assert_idle_closed_after_10s(clock, lst, proto, tr)  # idle time counts from the ACK
        proto.connection_lost(None)

    run(main)


# -- fair connection limits --------------------------------------------------------------------------
def test_at_the_cap_a_newcomer_is_served_and_the_longest_idle_is_closed() -> None:
    async def main() -> None:
        clock = Clock()
        lst = listener(clock, max_connections=3)
        conns = []
        for _ in range(3):
            conns.append(connect(lst))
            clock.now += 1
        (p1, t1), (p2, t2), (p3, t3) = conns
        p1.data_received(encode(b"M1"))  # p1 is the oldest but has just sent a frame: p2 is idle longest
        await settle(p1)
        p4, t4 = connect(lst)
        assert (t1.aborted, t2.aborted, t3.aborted, t4.aborted) == (False, True, False, False)
        assert (lst.stats.connections, lst.stats.accepted_total, lst.stats.evicted_total) == (3, 4, 1)
        assert lst.stats.refused_total == 0
        p2.connection_lost(None)  # the evicted one's slot was freed when it was chosen, not again
        assert lst.stats.connections == 3
        for p in (p1, p3, p4):
            p.connection_lost(None)
        assert lst.stats.connections == 0 and lst.slots.peers() == {}

    run(main)


def test_busy_connections_are_kept_at_the_cap() -> None:
    async def main() -> None:
        clock = Clock()
        intake = GatedIntake()
        lst = listener(clock, intake, max_connections=2)
        p1, t1 = connect(lst)
        p1.data_received(encode(b"M1"))  # waiting for its store: closing it would cost a resend
        await settle(p1)
        clock.now += 100
        _p2, t2 = connect(lst)
        clock.now += 1
        _p3, t3 = connect(lst)
        assert (t1.aborted, t2.aborted, t3.aborted) == (False, True, False)
        intake.release()
        await settle(p1)
        assert t1.acks() == [b"M1"]

    run(main)


def test_the_peer_with_the_most_connections_loses_one_first() -> None:
    async def main() -> None:
        clock = Clock()
        lst = listener(clock, max_connections=4)
        _b1, tb1 = connect(lst, FakeTransport("10.0.0.2"))  # idle the longest, but its peer has one
        clock.now += 1
        flood = []
        for _ in range(3):
            flood.append(connect(lst, FakeTransport("10.0.0.9")))
            clock.now += 1
        _c1, tc1 = connect(lst, FakeTransport("10.0.0.3"))
        assert not tb1.aborted and not tc1.aborted
        assert [t.aborted for _, t in flood] == [True, False, False]
        assert lst.slots.peers() == {"10.0.0.2": 1, "10.0.0.9": 2, "10.0.0.3": 1}

    run(main)


def test_max_connections_per_peer_closes_that_peers_own_longest_idle() -> None:
    async def main() -> None:
        clock = Clock()
        lst = listener(clock, max_connections=100, max_connections_per_peer=2)
        _b1, tb1 = connect(lst, FakeTransport("10.0.0.2"))
        clock.now += 1
        _a1, ta1 = connect(lst, FakeTransport("10.0.0.9"))
        clock.now += 1
        _a2, ta2 = connect(lst, FakeTransport("10.0.0.9"))
        clock.now += 1
        _a3, ta3 = connect(lst, FakeTransport("10.0.0.9"))
        assert (tb1.aborted, ta1.aborted, ta2.aborted, ta3.aborted) == (False, True, False, False)
        assert lst.slots.peers() == {"10.0.0.2": 1, "10.0.0.9": 2}
        assert lst.stats.evicted_total == 1

    run(main)


def test_max_connections_zero_refuses() -> None:
    async def main() -> None:
        lst = listener(Clock(), max_connections=0)
        p, t = connect(lst)
        assert t.aborted and lst.stats.refused_total == 1 and lst.stats.connections == 0
        p.connection_lost(None)
        assert lst.stats.connections == 0

    run(main)


# -- back-pressure -----------------------------------------------------------------------------------
def test_reading_pauses_at_connection_frames_and_everything_is_answered_in_order() -> None:
    async def main() -> None:
        intake = GatedIntake()
        _, lst, proto, tr = one_connection(intake, limits=LimitsConfig(connection_frames=4))
        payloads = [b"M%02d" % i for i in range(10)]
        proto.data_received(frames(*payloads))
        await settle(proto)
        # One frame in intake, three queued; the other six stay in the framer's buffer, unread.
        assert len(proto.queue) == 3 and intake.seen == [b"M00"]
        assert not tr.reading and proto.framer.buffered == 6 * len(encode(b"M00"))
        for _ in range(10):
            intake.release()
            await settle(proto)
            assert len(proto.queue) <= 4
        assert tr.acks() == payloads
        assert tr.reading and proto.held == 0 and lst.budget.total == 0

    run(main)


def test_reading_pauses_at_connection_inflight_bytes() -> None:
    async def main() -> None:
        intake = GatedIntake()
        _, _, proto, tr = one_connection(intake, limits=LimitsConfig(connection_inflight_bytes=1000))
        payloads = [b"%03d" % i + b"x" * 397 for i in range(8)]
        proto.data_received(frames(*payloads))
        await settle(proto)
        assert proto.pending_bytes == 1200 and not tr.reading  # 3 frames of 400 bytes reach the bound
        intake.release(8)
        await settle(proto)
        assert len(tr.acks()) == 8 and tr.reading and proto.pending_bytes == 0

    run(main)


def test_a_peer_that_reads_no_acks_is_not_served_further_then_cut_off() -> None:
    async def main() -> None:
        intake = AckingIntake()
        clock, lst, proto, tr = one_connection(
            intake, FakeTransport(reads_acks=False), limits=LimitsConfig(unsent_ack_bytes=500)
        )
        proto.data_received(frames(*(b"M%02d" % i for i in range(40))))
        await settle(proto)
        # Answered until more than 500 ACK bytes are unsent; then neither answered nor read further.
        one = len(encode(ack(b"M00")))
        assert len(intake.seen) == 500 // one + 1 and len(tr.unsent) <= 500 + one
        assert proto.write_blocked and not tr.reading
        tr.peer_reads()  # it reads: serving resumes
        await settle(proto)
        assert len(intake.seen) > 500 // one + 1
        # It stops reading again, for good: cut off idle_timeout later, however much it has queued.
        while not proto.write_blocked:
            proto.data_received(frames(b"more"))
            await settle(proto)
        clock.now += 9.9
        proto._on_timer()
        assert not tr.aborted
        clock.now += 0.1
        proto._on_timer()
        assert tr.aborted and lst.stats.stalled_closed == 1
        proto.connection_lost(None)
        await settle(proto)
        assert lst.budget.total == 0

    run(main)


def test_empty_frame_flood_is_answered_a_bounded_slice_at_a_time() -> None:
    async def main() -> None:
        intake = AckingIntake()
        _, lst, proto, tr = one_connection(intake)
        other, tr2 = connect(lst)
        proto.data_received(encode(b"") * 20_000)  # 60 KB: 20,000 frames in one read
        assert len(proto.queue) == 32 and not tr.reading
        # The worker answers without waiting on anything, yet other connections get the loop.
        other.data_received(encode(b"OTHER"))
        for _ in range(10):
            await asyncio.sleep(0)
        assert tr2.acks() == [b"OTHER"] and len(intake.seen) < 20_000
        while proto.worker is not None and not proto.worker.done():
            await asyncio.sleep(0)
            assert len(proto.queue) <= 32
        assert len(tr.acks()) == 20_000 and tr.reading and lst.budget.total == 0

    run(main)


def test_global_budget_pauses_holders_and_lets_empty_connections_read() -> None:
    async def main() -> None:
        clock = Clock()
        budget: InflightBudget[MLLPProtocol] = InflightBudget(1000)
        lst = listener(clock, AckingIntake(), budget=budget)
        big, tbig = connect(lst)
        big.data_received(VT + b"x" * 1500)  # a partial frame over the whole budget
        assert budget.total == 1500 and not tbig.reading
        small, tsmall = connect(lst)  # holds nothing: may read, and is answered
        small.data_received(encode(b"S1"))
        await settle(small)
        assert tsmall.acks() == [b"S1"] and tsmall.reading and small.held == 0
        partial, tpartial = connect(lst)
        partial.data_received(VT + b"abc")  # holds bytes while over budget: paused
        assert not tpartial.reading and budget.waiting == 2
        clock.now += 2  # within frame_timeout (the budget's pauses count towards it: see below)
        partial._on_timer()
        assert not tpartial.aborted
        big.connection_lost(None)  # the big one goes: its bytes are given back, the others resume
        assert budget.total == 3 and tpartial.reading and budget.waiting == 0
        assert partial.framer.deadline is not None and not partial.framer.expired(clock.now)
        partial.data_received(b"d\x1c\x0d")
        await settle(partial)
        assert tpartial.acks() == [b"abcd"]
        assert budget.total == 0

    run(main)


def test_frames_read_before_the_peer_left_are_still_answered_and_the_budget_returns_to_zero() -> None:
    async def main() -> None:
        intake = GatedIntake()
        _, lst, proto, tr = one_connection(intake, limits=LimitsConfig(connection_frames=2))
        proto.data_received(frames(b"A", b"B", b"C", b"D") + VT + b"partial")
        await settle(proto)
        assert lst.budget.total > 0
        proto.connection_lost(ConnectionResetError())
        intake.release(4)
        await settle(proto)
        assert intake.seen == [b"A", b"B", b"C", b"D"]  # stored (a resend is deduplicated), not answered
        assert not tr.written and lst.budget.total == 0 and proto.held == 0

    run(main)


def test_partial_frames_cannot_hold_the_budget_forever() -> None:
    """Connections whose partial frames fill the budget all wait for it, and none has a complete frame
    to answer: the frame deadline keeps running while a connection waits for the budget (unlike while it
    waits on its own back-pressure), so they are cut off and the budget frees."""

    async def main() -> None:
        clock = Clock()
        budget: InflightBudget[MLLPProtocol] = InflightBudget(1000)
        lst = listener(clock, AckingIntake(), budget=budget)
        (p1, t1), (p2, t2) = connect(lst), connect(lst)
        p1.data_received(VT + b"a" * 600)
        p2.data_received(VT + b"b" * 600)
        p1.data_received(b"a")  # (a connection stops at its next read once the budget is over)
        assert budget.over and not t1.reading and not t2.reading
        clock.now += 4.0  # frame_timeout after the start blocks
        p1._on_timer()
        p2._on_timer()
        assert t1.aborted and t2.aborted and lst.stats.frame_timeouts == 2
        p1.connection_lost(None)
        p2.connection_lost(None)
        assert budget.total == 0
        p3, t3 = connect(lst)  # a well-behaved sender gets through
        p3.data_received(encode(b"OK"))
        await settle(p3)
        assert t3.acks() == [b"OK"]

    run(main)


def test_own_back_pressure_time_is_given_back_to_the_frame_deadline() -> None:
    async def main() -> None:
        intake = GatedIntake()
        clock, _, proto, tr = one_connection(intake, limits=LimitsConfig(connection_frames=1))
        proto.data_received(encode(b"M1") + VT + b"M2 in prog")  # M1 in intake, M2 half read: paused
        await settle(proto)
        assert not tr.reading and proto.framer.deadline is None  # M2 not taken from the framer yet
        clock.now += 60  # the store is slow: a minute paused on this connection's own limit
        proto._on_timer()
        assert not tr.aborted
        intake.release()
        await settle(proto)  # M1 answered; M2's start is read now, its deadline starts now
        assert tr.reading and proto.framer.deadline == clock.now + 4.0
        proto.data_received(b"ress" + b"\x1c\x0d")
        intake.release()
        await settle(proto)
        assert tr.acks() == [b"M1", b"M2 in progress"]

    run(main)
