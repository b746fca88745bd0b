"""The asyncio MLLP listener: a thin adaptor around the sans-IO framer and intake.

``data_received`` feeds :class:`engine.mllp.Framer`; each complete frame goes to
:meth:`engine.intake.Intake.handle` (which commits before it answers) and the
ACKs are written back in frame order.

What protects the engine from hostile or broken peers (issue #12; the decisions are pure, in
:mod:`engine.limits`, and the limits are in docs/security.md):

* Back-pressure.  Frames are taken from the framer only while the connection has room
  (``limits.connection_frames`` frames and ``limits.connection_inflight_bytes`` bytes not yet
  answered); the rest stays in the framer's buffer and reading pauses.  A peer that does not read its
  ACKs (more than ``limits.unsent_ack_bytes`` unsent) is not served further and not read from.
  Every connection reports what it holds to the engine-wide :class:`~engine.limits.InflightBudget`
  (``limits.inflight_bytes``); over it, connections holding bytes stop reading until frames are
  answered.  Nothing is dropped once read: every complete frame is stored and answered, in order.
* Fair connection limits.  At ``max_connections`` (or a peer's ``max_connections_per_peer``) a
  newcomer is served and an existing connection is closed instead (:class:`engine.limits.ConnectionSlots`).
  TLS handshakes run after the connection is counted (``loop.start_tls``) under ``handshake_timeout``.
* Timers.  ``idle_timeout`` counts from the last complete frame or ACK (junk outside frames does not
  keep a slot); a frame in progress is bounded by ``frame_timeout`` in total (the time the engine
  itself stopped reading is given back); a peer that reads no ACK for ``idle_timeout`` is cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

import structlog

from engine import ack as ackmod
from engine import logflood, mllp
from engine.config import LimitsConfig, SourceConfig, TLSConfig
from engine.errors import FramingError, MessageRejected
from engine.intake import Intake, _msa1, render_ack, split_acks
from engine.limits import ConnectionSlots, InflightBudget
from engine.metrics import Metrics

log = structlog.get_logger("sluice.listener")

YIELD_EVERY = 32  # frames answered without waiting (e.g. empty ones) before the worker lets others run


@dataclass
class ListenerStats:
    connections: int = 0
    accepted_total: int = 0
    refused_total: int = 0
    evicted_total: int = 0  # closed so a newcomer could be served (max_connections / per peer)
    frames: int = 0
    junk_bytes: int = 0
    framing_errors: int = 0
    frame_timeouts: int = 0
    idle_closed: int = 0
    stalled_closed: int = 0  # peers that read no ACK for idle_timeout
    handshake_failures: int = 0
    last_frame_at: float = 0.0  # wall-clock time of the last complete frame (admin API)


def make_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.cert, tls.key)
    if tls.ca:
        ctx.load_verify_locations(tls.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return ctx


class MLLPProtocol(asyncio.Protocol):
    def __init__(self, listener: Listener):
        self.listener = listener
        self.source = listener.source
        self.limits = listener.limits
        self.budget = listener.budget
        self.clock = listener.clock
        self.framer = mllp.Framer(
            max_frame=self.source.max_frame,
            frame_timeout=self.source.frame_timeout,
            max_junk=self.source.max_junk,
            lenient_end=self.source.lenient_end,
            clock=self.clock,
        )
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.host = ""  # the peer's address without the port: connections per peer are counted by it
        self.queue: deque[bytes | mllp.Oversize] = deque()
        self.arrived: deque[float] = deque()  # when each queued frame was complete (ACK latency)
        self.metrics = listener.metrics
        self.worker: asyncio.Task[None] | None = None
        self.handshaking = False
        self.closing = False
        self.eof = False
        self.framer_done = False  # the framer said Closed or failed: no more events from it
        self.framer_blocked = False  # the framer may hold more frames: not taken while the queue is full
        self.pending_bytes = 0  # payload bytes of complete frames not yet answered (queued or in intake)
        self.held = 0  # what this connection last reported to the budget
        self.reading = True  # as this protocol last set the transport
        self.budget_paused = False  # not reading because of the engine-wide budget (not its own limits)
        self.paused_at = 0.0  # when reading was paused (own limits: the frame deadline gets that time back)
        self.write_blocked = False  # the transport holds more than unsent_ack_bytes of ACKs
        self.blocked_since = 0.0
        self.writable: asyncio.Event | None = None
        self.last_activity = self.clock()  # last complete frame or ACK (connect time before any)
        self.timer: asyncio.TimerHandle | None = None
        self.counted = False
        self.evicted = False
        self.closing_abort = False

    # -- connection lifecycle ---------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it: no isinstance check.
        tr = cast(asyncio.Transport, transport)
        self.transport = tr
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer, self.host = f"{peer[0]}:{peer[1]}", str(peer[0])
        else:
            self.peer = self.host = str(peer or "")
        if not self.listener.admit(self):
            tr.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and self.source.keepalive:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self.listener.ssl_context is not None:
            # The handshake runs on a counted connection (so it is subject to the cap and can be
            # evicted) and under its own timeout; nothing is read as MLLP until it is done.
            self.handshaking = True
            self._handshake(tr)
        else:
            tr.set_write_buffer_limits(high=self.limits.unsent_ack_bytes)
        self._arm_timer()

    def _handshake(self, raw: asyncio.Transport) -> None:
        """Start TLS on the raw connection: ``loop.start_tls``, its first step run right here.

        uvloop starts reading a new connection as soon as ``connection_made`` returns, even when it
        paused reading itself, so a task started from here could see the ClientHello arrive in
        ``data_received`` first.  Running start_tls's first step now hands the socket to the TLS protocol
        before any byte is read (bytes that come before its own ``connection_made`` wait in its buffer);
        :meth:`_step` then resumes it like a task would, each time the future it waits for is done.
        """
        ctx = self.listener.ssl_context
        assert ctx is not None
        coro = asyncio.get_running_loop().start_tls(
            raw, self, ctx, server_side=True, ssl_handshake_timeout=self.source.handshake_timeout
        )
        self._step(coro, raw)

    def _step(self, coro: Coroutine[Any, Any, asyncio.Transport | None], raw: asyncio.Transport) -> None:
        try:
            waiting = coro.send(None)
        except StopIteration as done:
            self._handshake_done(raw, done.value, None)
        except Exception as exc:  # any failure (TLS alert, timeout, reset) closes this connection only
            self._handshake_done(raw, None, exc)
        else:
            waiting.add_done_callback(lambda _f: self._step(coro, raw))

    def _handshake_done(
        self, raw: asyncio.Transport, tr: asyncio.Transport | None, exc: BaseException | None
    ) -> None:
        if exc is not None or tr is None or self.closing:
            if not self.evicted:  # (an evicted one is counted and logged as such)
                self.listener.stats.handshake_failures += 1
                log.info(
                    "tls_handshake_failed",
                    channel=self.listener.channel_name,
                    peer=self.peer,
                    error=type(exc).__name__ if exc is not None else "closed",
                )
            if tr is not None:
                tr.abort()
            raw.abort()
            self.connection_lost(None)
            return
        self.transport = tr
        self.handshaking = False
        tr.set_write_buffer_limits(high=self.limits.unsent_ack_bytes)
        # Frames that came in with the end of the handshake are waiting in the framer or the queue.
        self._pull()
        self._start_worker()
        self._sync()

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.release(self)
        first = not self.closing
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.writable is not None:
            self.writable.set()  # a worker waiting to write: there is nobody to write to
        self.budget.forget(self)
        if self.worker is None or self.worker.done():
            # Frames already read are still stored (a resend is deduplicated); a partial one is dropped.
            self._pull()
            if not self._start_worker():
                self._drop()
        if first:
            logflood.flush_peer(self.peer)

    def _drop(self) -> None:
        """Nothing more will be read or answered: give back what this connection held."""
        self.framer = mllp.Framer(max_frame=0, clock=self.clock)  # frees the buffered bytes
        self.framer_done = True
        self.queue.clear()
        self.arrived.clear()
        self.pending_bytes = 0
        self._report()

    # -- timers: idle timeout, the per-frame deadline, a peer that reads no ACK ---------------------
    def _arm_timer(self) -> None:
        if self.closing:
            return
        loop = asyncio.get_running_loop()
        now = self.clock()
        due = self.last_activity + self.source.idle_timeout
        deadline = self.framer.deadline
        if deadline is not None and (self.reading or self.budget_paused):
            due = min(due, deadline)
        if self.write_blocked:
            due = min(due, self.blocked_since + self.source.idle_timeout)
        if self.timer is not None:
            self.timer.cancel()
        self.timer = loop.call_at(loop.time() + max(0.0, due - now) + 0.01, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.closing or self.transport is None:
            return
        now = self.clock()
        name = self.listener.channel_name
        if (self.reading or self.budget_paused) and self.framer.expired(now):
            self.listener.stats.frame_timeouts += 1
            log.warning("frame_deadline_exceeded", channel=name, peer=self.peer)
            self._abort()
            return
        if self.write_blocked and now - self.blocked_since >= self.source.idle_timeout:
            self.listener.stats.stalled_closed += 1
            log.warning("connection_stalled_closed", channel=name, peer=self.peer, unread_acks=True)
            self._abort()
            return
        if not self._busy() and now - self.last_activity >= self.source.idle_timeout:
            self.listener.stats.idle_closed += 1
            log.info("connection_idle_closed", channel=name, peer=self.peer)
            self._close()
            return
        self._arm_timer()

    def _busy(self) -> bool:
        """Frames being answered, or one arriving (bounded by its deadline): not idle."""
        if self.write_blocked:
            return False  # waiting for the peer to read: its own timer above
        return (
            bool(self.queue)
            or (self.worker is not None and not self.worker.done())
            or self.framer.deadline is not None
        )

    def _active(self) -> None:
        """A complete frame arrived or an ACK went out: idle time starts over."""
        self.last_activity = self.clock()
        self.listener.slots.touch(self, self.host)

    # -- data ---------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        had_deadline = self.framer.deadline is not None
        self.framer.receive_data(data, self.clock())
        self._pull()
        self._start_worker()
        self._sync()
        if not had_deadline and self.framer.deadline is not None:
            self._arm_timer()

    def eof_received(self) -> bool:
        self.eof = True
        self.framer.receive_data(b"")
        self._pull()
        self._start_worker()
        self._sync()
        # Keep the transport open for writing so ACKs of complete frames still go out (half-close).
        return True

    def _pull(self) -> None:
        """Take frames from the framer while this connection has room for them."""
        if self.framer_done:
            return
        framer = self.framer
        queue = self.queue
        max_frames = self.limits.connection_frames
        max_bytes = self.limits.connection_inflight_bytes
        before = framer.junk_bytes
        stats = self.listener.stats
        blocked = True
        try:
            while len(queue) < max_frames and self.pending_bytes < max_bytes:
                ev = framer.next_event()
                if ev is mllp.NEED_DATA:
                    blocked = False
                    break
                if isinstance(ev, mllp.Frame):
                    stats.frames += 1
                    stats.last_frame_at = time.time()
                    queue.append(ev.payload)
                    self.arrived.append(time.monotonic())
                    self.pending_bytes += len(ev.payload)
                    self._active()
                    if framer.drained:  # the read held this frame alone (the usual case): nothing to ask
                        blocked = False
                        break
                elif isinstance(ev, mllp.Oversize):
                    queue.append(ev)
                    self.arrived.append(time.monotonic())
                    self._active()
                elif isinstance(ev, mllp.Closed):
                    blocked = False
                    self.framer_done = True
                    if not ev.clean:
                        log.warning("eof_mid_frame", channel=self.listener.channel_name, peer=self.peer)
                    self._finish_after_queue()
                    break
        except FramingError as exc:
            blocked = False
            self.framer_done = True
            stats.framing_errors += 1
            log.warning(
                "framing_error", channel=self.listener.channel_name, peer=self.peer, error=exc.message
            )
            # Broken stream: stop reading whatever the peer keeps sending while we answer the frames
            # already complete (the framer would re-raise on every read), then close.
            self._finish_after_queue(abort=True)
        finally:
            junk = framer.junk_bytes - before
            if junk:
                stats.junk_bytes += junk
                log.info("junk_discarded", channel=self.listener.channel_name, peer=self.peer, bytes=junk)
        self.framer_blocked = blocked

    def _start_worker(self) -> bool:
        """Start answering the queue unless that is already under way; True when a worker runs."""
        if self.worker is not None and not self.worker.done():
            return True
        if not self.queue or self.handshaking:
            return False
        self.worker = asyncio.get_running_loop().create_task(self._work())
        return True

    def _report(self) -> None:
        """Tell the budget what this connection holds now."""
        held = self.framer.buffered + self.pending_bytes
        if held != self.held:
            old, self.held = self.held, held
            self.budget.update(old, held)

    def _sync(self) -> None:
        """Report to the budget, then read or stop reading as the limits say."""
        self._report()
        tr = self.transport
        if tr is None or self.handshaking:
            return
        own = (
            self.closing
            or self.eof
            or self.framer_done
            or self.write_blocked
            or self.framer_blocked
            or len(self.queue) >= self.limits.connection_frames
            or self.pending_bytes >= self.limits.connection_inflight_bytes
        )
        budget = not own and not self.budget.may_read(self.held)
        if budget:
            self.budget.wait(self)
        want = not (own or budget)
        if want == self.reading and budget == self.budget_paused:
            return
        now = self.clock()
        if not self.reading and not self.budget_paused:
            # Paused for this connection's own back-pressure until now: time its sender could not use.
            # Time paused for the engine-wide budget is not given back, so partial frames cannot hold the
            # budget (and every reader waiting on it) forever.
            self.framer.postpone(now - self.paused_at)
        self.paused_at = now
        self.budget_paused = budget
        if want != self.reading:
            self.reading = want
            if want:
                self.budget.forget(self)
                tr.resume_reading()
            elif not tr.is_closing():
                tr.pause_reading()
        if self.framer.deadline is not None:
            self._arm_timer()

    def budget_available(self) -> None:
        if not self.closing:
            self._sync()

    # -- flow control from the transport: the peer is (not) reading its ACKs --------------------------
    def pause_writing(self) -> None:
        self.write_blocked = True
        self.blocked_since = self.clock()
        if self.writable is None:
            self.writable = asyncio.Event()
        self.writable.clear()
        self._sync()
        self._arm_timer()

    def resume_writing(self) -> None:
        self.write_blocked = False
        self._active()  # the peer read its ACKs
        if self.writable is not None:
            self.writable.set()
        self._sync()

    def _finish_after_queue(self, abort: bool = False) -> None:
        """Answer what is already complete, then close."""
        self.eof = True
        if abort:
            self.closing_abort = True
        if not self.queue and (self.worker is None or self.worker.done()):
            self._close()

    async def _work(self) -> None:
        intake = self.listener.intake
        answered = 0
        while True:
            if not self.queue:
                # The framer is asked again only when it may hold frames it could not hand out (the
                # queue was full); otherwise it said NEED_DATA and only data_received can change that.
                if self.framer_blocked:
                    self._pull()
                if not self.queue:
                    break
            if self.write_blocked and not self.closing and self.writable is not None:
                await self.writable.wait()
                continue
            item = self.queue.popleft()
            arrived = self.arrived.popleft()
            size = 0
            if isinstance(item, mllp.Oversize):
                err = MessageRejected(f"frame of {item.size} bytes is over the size cap", code="207")
                acks = split_acks(render_ack(None, ackmod.Outcome("AR", err))[0])
                if self.metrics is not None:
                    self.metrics.received.inc()
                    self.metrics.processed("rejected")
            else:
                size = len(item)
                try:
                    acks = await intake.handle(item, self.peer)
                except Exception as exc:
                    # A bug below this point must not leave the sender waiting forever or kill this
                    # connection's worker: answer AR 207 (resend later) and keep serving.
                    log.error(
                        "intake_failed",
                        channel=self.listener.channel_name,
                        peer=self.peer,
                        error=type(exc).__name__,
                    )
                    acks = _internal_error_ack()
                del item
            transport = self.transport
            if not (self.closing or transport is None or transport.is_closing()):
                for a in acks:
                    try:
                        data = mllp.encode(a)
                    except ValueError:  # an ACK holding a framing byte would cut its own frame
                        log.error("ack_unframable", channel=self.listener.channel_name, peer=self.peer)
                        data = mllp.encode(_internal_error_ack()[0])
                    transport.write(data)
                m = self.metrics
                if m is not None and acks:
                    m.ack_latency.observe(time.monotonic() - arrived)
                    for a in acks:
                        m.ack(_msa1(a))
                self._active()
            # else: connection gone; the message is committed already and a resend will be deduped.
            self.pending_bytes -= size
            if self.framer_blocked:
                self._pull()
            self._sync()
            answered += 1
            if answered % YIELD_EVERY == 0:
                await asyncio.sleep(
                    0
                )  # frames answered without a wait (empty, oversize) must not hog the loop
        if self.closing:
            self._drop()
        elif self.eof:
            self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self.closing_abort:
                self.transport.abort()
            else:
                self.transport.close()
        self.closing = True

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.closing = True


def _internal_error_ack() -> list[bytes]:
    err = MessageRejected("internal error while accepting the message; resend it later", code="207")
    return split_acks(render_ack(None, ackmod.Outcome("AR", err))[0])


class Listener:
    """One channel's MLLP server.

    ``clock`` (monotonic seconds) times the idle timeout and the per-frame deadline; a test passes a
    fake one and calls a connection's timer by hand.  ``budget`` is the engine-wide in-flight budget,
    shared by every listener (one is made from ``limits`` when none is given).
    """

    def __init__(
        self,
        channel_name: str,
        source: SourceConfig,
        intake: Intake,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
        limits: LimitsConfig | None = None,
        budget: InflightBudget[MLLPProtocol] | None = None,
    ):
        self.channel_name = channel_name
        # ACKs, their latency and frames refused for size are counted here; connections are read
        # from ``stats`` when scraped.
        self.metrics = metrics.channel(channel_name) if metrics is not None else None
        self.clock = clock
        self.source = source
        self.intake = intake
        self.limits = limits or LimitsConfig()
        self.budget: InflightBudget[MLLPProtocol] = budget or InflightBudget(self.limits.inflight_bytes)
        self.stats = ListenerStats()
        self.protocols: set[MLLPProtocol] = set()
        self.slots: ConnectionSlots[MLLPProtocol] = ConnectionSlots()  # the same, by peer and idle time
        self.server: asyncio.base_events.Server | None = None
        self.ssl_context = make_ssl_context(source.tls) if source.tls else None
        if metrics is not None:
            metrics.watch_listener(self)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def listening(self) -> bool:
        return self.server is not None and self.server.is_serving()

    # -- connection slots ----------------------------------------------------------------------
    def admit(self, p: MLLPProtocol) -> bool:
        """Count a new connection, closing another one first when a cap is reached (False: refused)."""
        src = self.source
        slots = self.slots
        if src.max_connections_per_peer and slots.of(p.host) >= src.max_connections_per_peer:
            victim = slots.victim(MLLPProtocol._busy, only_peer=p.host)
            if victim is not None:
                self._evict(victim, "max_connections_per_peer")
        if self.stats.connections >= src.max_connections:
            victim = slots.victim(MLLPProtocol._busy)
            if victim is None:
                self.stats.refused_total += 1
                log.warning("connection_refused_cap", channel=self.channel_name, cap=src.max_connections)
                return False
            self._evict(victim, "max_connections")
        p.counted = True
        self.stats.connections += 1
        self.stats.accepted_total += 1
        self.protocols.add(p)
        slots.add(p, p.host)
        return True

    def _evict(self, victim: MLLPProtocol, cap: str) -> None:
        self.stats.evicted_total += 1
        log.info(
            "connection_evicted",
            channel=self.channel_name,
            peer=victim.peer,
            cap=cap,
            idle_seconds=round(self.clock() - victim.last_activity, 1),
            handshaking=victim.handshaking,
        )
        victim.evicted = True
        self.release(victim)
        victim._abort()

    def release(self, p: MLLPProtocol) -> None:
        """Free a connection's slot (once; closing or evicting it)."""
        if not p.counted:
            return
        p.counted = False
        self.stats.connections -= 1
        self.slots.remove(p, p.host)
        self.protocols.discard(p)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # TLS is started per connection (MLLPProtocol._handshake), after the connection is counted.
        self.server = await loop.create_server(
            lambda: MLLPProtocol(self),
            host=self.source.host,
            port=self.source.port,
            backlog=2048,
            reuse_address=True,
        )

    async def bind(self, source: SourceConfig) -> asyncio.base_events.Server:
        """A listening socket on ``source``'s address for this listener (live reload: a port that changed).

        Not used until :meth:`update` switches to it; close it if the reload is given up.
        """
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            lambda: MLLPProtocol(self), host=source.host, port=source.port, backlog=2048, reuse_address=True
        )

    def update(self, source: SourceConfig, server: asyncio.base_events.Server | None = None) -> None:
        """Live reload: new connections get ``source``'s settings (timeouts, sizes, TLS).

        With ``server`` (from :meth:`bind`), the listener moves to that address: the old listening socket
        stops accepting at once, while the connections it accepted stay open and are served (with the
        channel's new rules) until their senders close them; a sender reconnects to the new port.
        """
        self.source = source
        self.ssl_context = make_ssl_context(source.tls) if source.tls else None
        if server is not None:
            old, self.server = self.server, server
            if old is not None:
                old.close()  # the listening socket only: accepted connections are not closed by this

    async def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait for in-flight frames to be answered, then close every connection."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = [p for p in self.protocols if p.queue or (p.worker is not None and not p.worker.done())]
            if not busy:
                break
            await asyncio.sleep(0.02)
        for p in list(self.protocols):
            p._close()
        if self.server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 2.0)
