"""Asyncio MLLP client: one message out, one ACK back, connection kept between sends.

Why this exists: ``sluice send``, the ``mllp`` destination and the load generator all
need the same small thing: frame a message, wait for the answering ACK frame within a
deadline, and recover from a dead connection by reconnecting on the next send.  The
framing itself is :mod:`engine.mllp`; this is the thin asyncio shell around it (an
``asyncio.Protocol``, no stream internals).

Failures are :class:`~engine.errors.DeliveryError`: ``retryable=True`` for connect
errors, timeouts and dropped connections (the connection is closed, so a late ACK can
never be read as the answer to the next message); ``PermanentDeliveryError`` for a
payload that cannot be framed.  :func:`parse_ack` reads the ACK; it never raises.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_mod
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import cast

from engine import hl7, mllp
from engine.errors import (
    DeliveryError,
    FramingError,
    MessageContentError,
    PermanentDeliveryError,
    SluiceError,
)


@dataclass(frozen=True, slots=True)
class AckInfo:
    """What an ACK says.  ``code`` is MSA-1 (AA/AE/AR/CA/CE/CR), ``""`` when the payload is no ACK."""

    code: str
    control_id: str  # MSA-2: the control id of the message acknowledged
    text: str  # MSA-3, else ERR-3.2 (v2.5+) or ERR-1.4.2 (before 2.5)
    error_code: str  # ERR-3.1 (v2.5+) or ERR-1.4.1 (before 2.5), HL7 table 0357


def parse_ack(payload: bytes) -> AckInfo:
    """Read MSA-1/2/3 and the ERR code of an ACK.  Never raises: garbage gives ``code=""``."""
    try:
        text = hl7.decode(payload)
    except MessageContentError:
        text = payload.decode("latin-1")
    try:
        msg = hl7.parse(text)
    except SluiceError as exc:
        return AckInfo("", "", f"not an HL7 message: {exc}", "")
    if msg.first("MSA") is None:
        return AckInfo("", "", f"not an ACK: no MSA segment in a {msg.message_type or 'message'}", "")
    error_code = msg["ERR-3.1"] or msg["ERR-1.4.1"]
    info = msg["MSA-3"] or msg["ERR-3.2"] or msg["ERR-1.4.2"]
    return AckInfo(msg["MSA-1"].strip().upper(), msg["MSA-2"].strip(), info.strip(), error_code.strip())


class _AckProtocol(asyncio.Protocol):
    """Collects ACK frames from the peer; wakes the sender."""

    def __init__(self, peer: str, max_frame: int) -> None:
        self.peer = peer
        # The ACK deadline is enforced by the client around the whole exchange.
        self.framer = mllp.Framer(max_frame=max_frame, frame_timeout=1e9)
        self.frames: deque[bytes] = deque()
        self.error: DeliveryError | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._can_write: asyncio.Future[None] | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio callbacks ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it (the engine runs on
        # uvloop): an isinstance check here failed every delivery of the mllp destination in the engine.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.framer.receive_data(data, 0.0)
        self._drain()

    def eof_received(self) -> bool | None:
        self.framer.receive_data(b"", 0.0)
        self._drain()
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.error is None:
            why = f": {exc}" if exc else ""
            self.error = DeliveryError(
                f"connection to {self.peer} closed before an ACK arrived{why}; the message may or may "
                "not have been received, resend it (the receiver deduplicates)",
                retryable=True,
                category="network",
            )
        self._wake()
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self._can_write = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)
        self._can_write = None

    # -- helpers for the client -------------------------------------------------
    def _drain(self) -> None:
        try:
            while True:
                ev = self.framer.next_event()
                if ev is mllp.NEED_DATA or isinstance(ev, mllp.Closed):
                    break
                if isinstance(ev, mllp.Frame):
                    self.frames.append(ev.payload)
                elif isinstance(ev, mllp.Oversize):
                    self._fail(f"{self.peer} sent an ACK of {ev.size} bytes, over the client's size cap")
        except FramingError as exc:
            self._fail(f"{self.peer} broke MLLP framing: {exc}")
        self._wake()

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = DeliveryError(reason, retryable=True, category="server")  # the peer broke MLLP
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        if self._can_write is not None:
            await self._can_write

    async def next_frame(self) -> bytes:
        while not self.frames:
            if self.error is not None:
                raise self.error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.frames.popleft()


class MLLPClient:
    """Send HL7 messages over MLLP and return their ACKs; one message in flight at a time.

    ``async with MLLPClient(host, port) as c: ack = await c.send(payload)``.  The
    connection is opened on first use (or by ``connect``/``async with``), kept between
    sends and reopened on the next send after any failure.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl: ssl_mod.SSLContext | None = None,
        connect_timeout: float = 10.0,
        ack_timeout: float = 30.0,
        max_ack_size: int = 16 * 1024 * 1024,
        server_hostname: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl = ssl
        self.connect_timeout = connect_timeout
        self.ack_timeout = ack_timeout
        self.max_ack_size = max_ack_size
        self.server_hostname = server_hostname
        self.peer = f"{host}:{port}"
        self._proto: _AckProtocol | None = None
        self._lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._proto is not None and not self._proto.closed

    async def connect(self) -> None:
        """Open the connection if it is not open.  DeliveryError(retryable=True) on failure."""
        if self.connected:
            return
        await self._drop()
        loop = asyncio.get_running_loop()
        hostname = (self.server_hostname or self.host) if self.ssl is not None else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: _AckProtocol(self.peer, self.max_ack_size),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=hostname,
                )
        except TimeoutError:
            raise DeliveryError(
                f"cannot connect to {self.peer}: no answer within {self.connect_timeout:g}s "
                "(is the receiver up and reachable?)",
                retryable=True,
                category="network",
            ) from None
        except OSError as exc:  # refused, unreachable, TLS handshake (ssl.SSLError is an OSError)
            raise DeliveryError(
                f"cannot connect to {self.peer}: {exc} (check host, port and TLS settings)",
                retryable=True,
                category="network",
            ) from None
        self._proto = proto

    async def send(self, payload: bytes) -> bytes:
        """Send one message and return the payload of the ACK frame that answers it."""
        try:
            wire = mllp.encode(payload)
        except ValueError as exc:
            raise PermanentDeliveryError(str(exc), category="validation") from None
        async with self._lock:
            await self.connect()
            proto = self._proto
            assert proto is not None
            proto.frames.clear()  # a stray frame from before this message is not its ACK
            try:
                async with asyncio.timeout(self.ack_timeout):
                    await proto.write(wire)
                    return await proto.next_frame()
            except TimeoutError:
                await self._drop()
                raise DeliveryError(
                    f"no ACK from {self.peer} within {self.ack_timeout:g}s; the connection was closed and "
                    "the next send reconnects (the receiver deduplicates a resend)",
                    retryable=True,
                    category="network",
                ) from None
            except DeliveryError:
                await self._drop()
                raise
            except OSError as exc:
                await self._drop()
                raise DeliveryError(
                    f"sending to {self.peer} failed: {exc}", retryable=True, category="network"
                ) from None

    async def close(self) -> None:
        """Close the connection (idempotent)."""
        async with self._lock:
            await self._drop(graceful=True)

    async def _drop(self, graceful: bool = False) -> None:
        proto, self._proto = self._proto, None
        if proto is None or proto.transport is None:
            return
        if graceful:
            proto.transport.close()
        else:
            proto.transport.abort()
        try:
            async with asyncio.timeout(1.0):
                await proto.lost
        except TimeoutError:
            proto.transport.abort()

    async def __aenter__(self) -> MLLPClient:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
