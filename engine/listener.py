"""The asyncio MLLP listener: a thin adaptor around the sans-IO framer and intake.

``data_received`` feeds :class:`engine.mllp.Framer`; each complete frame goes to
:meth:`engine.intake.Intake.handle` (which commits before it answers) and the
ACKs are written back in frame order.  Reading pauses while a connection has too
many frames waiting (backpressure), a connection cap, an idle timeout and a
total per-frame deadline protect the engine from slow or idle peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import structlog

from engine import ack as ackmod
from engine import mllp
from engine.config import SourceConfig, TLSConfig
from engine.errors import FramingError, MessageRejected
from engine.intake import Intake, _msa1, render_ack, split_acks
from engine.metrics import Metrics

log = structlog.get_logger("sluice.listener")

HIGH_WATER = 32  # frames waiting on one connection before we stop reading
LOW_WATER = 4


@dataclass
class ListenerStats:
    connections: int = 0
    accepted_total: int = 0
    refused_total: int = 0
    frames: int = 0
    junk_bytes: int = 0
    framing_errors: int = 0
    frame_timeouts: int = 0
    idle_closed: int = 0
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
        self.queue: deque[bytes | mllp.Oversize] = deque()
        self.arrived: deque[float] = deque()  # when each queued frame was complete (ACK latency)
        self.metrics = listener.metrics
        self.worker: asyncio.Task[None] | None = None
        self.paused = False
        self.closing = False
        self.eof = False
        self.last_activity = self.clock()
        self.timer: asyncio.TimerHandle | None = None
        self.counted = False
        self.closing_abort = False

    # -- connection lifecycle ---------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it: no isinstance check.
        tr = cast(asyncio.Transport, transport)
        self.transport = tr
        stats = self.listener.stats
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        if stats.connections >= self.source.max_connections:
            stats.refused_total += 1
            log.warning(
                "connection_refused_cap", channel=self.listener.channel_name, cap=self.source.max_connections
            )
            tr.abort()
            return
        self.counted = True
        stats.connections += 1
        stats.accepted_total += 1
        self.listener.protocols.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None and self.source.keepalive:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.counted:
            self.listener.stats.connections -= 1
            self.counted = False
        self.listener.protocols.discard(self)
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # -- timers: idle timeout and the per-frame deadline -------------------
    def _arm_timer(self) -> None:
        if self.closing:
            return
        loop = asyncio.get_running_loop()
        now = self.clock()
        due = self.last_activity + self.source.idle_timeout
        deadline = self.framer.deadline
        if deadline is not None:
            due = min(due, deadline)
        if self.timer is not None:
            self.timer.cancel()
        self.timer = loop.call_at(loop.time() + max(0.0, due - now) + 0.01, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.closing or self.transport is None:
            return
        now = self.clock()
        if self.framer.expired(now):
            self.listener.stats.frame_timeouts += 1
            log.warning("frame_deadline_exceeded", channel=self.listener.channel_name, peer=self.peer)
            self._abort()
            return
        busy = bool(self.queue) or (self.worker is not None and not self.worker.done())
        if not busy and now - self.last_activity >= self.source.idle_timeout:
            self.listener.stats.idle_closed += 1
            log.info("connection_idle_closed", channel=self.listener.channel_name, peer=self.peer)
            self._close()
            return
        self._arm_timer()

    # -- data ---------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        now = self.clock()
        self.last_activity = now
        had_deadline = self.framer.deadline is not None
        self.framer.receive_data(data, now)
        self._drain_events()
        if not had_deadline and self.framer.deadline is not None:
            self._arm_timer()

    def eof_received(self) -> bool:
        self.eof = True
        self.framer.receive_data(b"")
        self._drain_events()
        # Keep the transport open for writing so ACKs of complete frames still go out (half-close).
        return True

    def _drain_events(self) -> None:
        framer = self.framer
        before = framer.junk_bytes
        try:
            while True:
                ev = framer.next_event()
                if ev is mllp.NEED_DATA:
                    break
                if isinstance(ev, mllp.Frame):
                    stats = self.listener.stats
                    stats.frames += 1
                    stats.last_frame_at = time.time()
                    self.queue.append(ev.payload)
                    self.arrived.append(time.monotonic())
                elif isinstance(ev, mllp.Oversize):
                    self.queue.append(ev)
                    self.arrived.append(time.monotonic())
                elif isinstance(ev, mllp.Closed):
                    if not ev.clean:
                        log.warning("eof_mid_frame", channel=self.listener.channel_name, peer=self.peer)
                    self._finish_after_queue()
                    break
        except FramingError as exc:
            self.listener.stats.framing_errors += 1
            log.warning(
                "framing_error", channel=self.listener.channel_name, peer=self.peer, error=exc.message
            )
            self._finish_after_queue(abort=True)
            if self.transport is not None and not self.paused:
                # Broken stream: stop buffering whatever the peer keeps sending while we answer
                # the frames already complete (the framer would re-raise on every read).
                self.paused = True
                self.transport.pause_reading()
        finally:
            junk = framer.junk_bytes - before
            if junk:
                self.listener.stats.junk_bytes += junk
                log.info("junk_discarded", channel=self.listener.channel_name, peer=self.peer, bytes=junk)
        if self.queue and (self.worker is None or self.worker.done()):
            self.worker = asyncio.get_running_loop().create_task(self._work())
        if len(self.queue) >= HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def _finish_after_queue(self, abort: bool = False) -> None:
        """Answer what is already complete, then close."""
        self.eof = True
        if abort:
            self.closing_abort = True
        if not self.queue and (self.worker is None or self.worker.done()):
            self._close()

    async def _work(self) -> None:
        intake = self.listener.intake
        transport = self.transport
        assert transport is not None
        while self.queue:
            item = self.queue.popleft()
            arrived = self.arrived.popleft()
            if self.paused and len(self.queue) <= LOW_WATER and not self.closing:
                self.paused = False
                transport.resume_reading()
            if isinstance(item, mllp.Oversize):
                err = MessageRejected(f"frame of {item.size} bytes is over the size cap", code="207")
                acks = split_acks(render_ack(None, ackmod.Outcome("AR", err))[0])
                if self.metrics is not None:
                    self.metrics.received.inc()
                    self.metrics.processed("rejected")
            else:
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
            if self.closing or transport.is_closing():
                # Connection gone: the message is committed already; a resend will be deduped.
                continue
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
            self.last_activity = self.clock()
        if self.eof:
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
    fake one and calls a connection's timer by hand.
    """

    def __init__(
        self,
        channel_name: str,
        source: SourceConfig,
        intake: Intake,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ):
        self.channel_name = channel_name
        # ACKs, their latency and frames refused for size are counted here; connections are read
        # from ``stats`` when scraped.
        self.metrics = metrics.channel(channel_name) if metrics is not None else None
        self.clock = clock
        self.source = source
        self.intake = intake
        self.stats = ListenerStats()
        self.protocols: set[MLLPProtocol] = set()
        self.server: asyncio.base_events.Server | None = None
        if metrics is not None:
            metrics.watch_listener(self)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def listening(self) -> bool:
        return self.server is not None and self.server.is_serving()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ctx = make_ssl_context(self.source.tls) if self.source.tls else None
        self.server = await loop.create_server(
            lambda: MLLPProtocol(self),
            host=self.source.host,
            port=self.source.port,
            ssl=ctx,
            backlog=2048,
            reuse_address=True,
        )

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
