"""A fault-injecting HTTP/1.1 reverse proxy for tests (asyncio, no third-party code).

    proxy = FaultProxy("http://127.0.0.1:8103")
    await proxy.start()                      # proxy.url -> http://127.0.0.1:<free port>
    proxy.http_error(500, times=1)           # next request gets a 500
    proxy.http_error(429, retry_after=7)     # then a 429 with Retry-After: 7
    proxy.stall(times=1)                     # then one request that never gets an answer
    proxy.reset(times=1)                     # then one connection reset (RST)
    ...                                      # after the queued faults: pass through to the upstream
    await proxy.stop()

Faults are consumed in order, one per request.  ``proxy.log`` records ``(method, path, action)`` per
request; ``proxy.forwarded`` counts requests that reached the upstream.  For code that runs its own loop
(a ``sluice`` subprocess, sync tests) use :class:`ThreadedFaultProxy`, same API, own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import urlsplit


@dataclass
class Fault:
    kind: str  # "status" | "stall" | "reset" | "forward"
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    seconds: float | None = None  # stall length; None = until the client gives up or the proxy stops


REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    409: "Conflict",
    412: "Precondition Failed",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]]] | None:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = raw.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    return lines[0], headers


def _get(headers: list[tuple[str, str]], name: str) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


async def _read_body(
    reader: asyncio.StreamReader, headers: list[tuple[str, str]], *, until_eof: bool
) -> bytes:
    if (_get(headers, "transfer-encoding") or "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return body
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    length = _get(headers, "content-length")
    if length is not None:
        return await reader.readexactly(int(length))
    return await reader.read() if until_eof else b""


class FaultProxy:
    def __init__(self, upstream: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        u = urlsplit(upstream)
        if u.scheme != "http" or not u.hostname:
            raise ValueError("upstream must be an http:// URL")
        self.upstream_host, self.upstream_port = u.hostname, u.port or 80
        self.upstream_prefix = u.path.rstrip("/")
        self.host, self.port = host, port
        self.faults: deque[Fault] = deque()
        self.log: list[tuple[str, str, str]] = []
        self.forwarded = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---------------------------------------------------------------- fault queue
    def http_error(
        self,
        status: int,
        *,
        times: int = 1,
        retry_after: float | str | None = None,
        body: bytes = b"",
        content_type: str = "application/fhir+json",
        headers: dict[str, str] | None = None,
    ) -> None:
        hdrs = dict(headers or {})
        if retry_after is not None:
            hdrs["Retry-After"] = str(retry_after)
        if body:
            hdrs["Content-Type"] = content_type
        for _ in range(times):
            self.faults.append(Fault("status", status=status, headers=hdrs, body=body))

    def forward(self, *, times: int = 1) -> None:
        """Let ``times`` requests through before the next queued fault."""
        for _ in range(times):
            self.faults.append(Fault("forward"))

    def stall(self, *, times: int = 1, seconds: float | None = None) -> None:
        for _ in range(times):
            self.faults.append(Fault("stall", seconds=seconds))

    def reset(self, *, times: int = 1) -> None:
        for _ in range(times):
            self.faults.append(Fault("reset"))

    def clear(self) -> None:
        self.faults.clear()

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._track, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # ---------------------------------------------------------------- serving
    async def _track(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await _read_head(reader)
            if head is None:
                return
            request_line, headers = head
            body = await _read_body(reader, headers, until_eof=False)
            method, path, _ = request_line.split(" ", 2)
            fault = self.faults.popleft() if self.faults else None
            if fault is not None and fault.kind == "forward":
                fault = None
            action = (
                "forward" if fault is None else (str(fault.status) if fault.kind == "status" else fault.kind)
            )
            self.log.append((method, path, action))
            if fault is not None and fault.kind == "reset":
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            if fault is not None and fault.kind == "stall":
                if fault.seconds is None:
                    await asyncio.Event().wait()  # until cancelled by the client closing or stop()
                await asyncio.sleep(fault.seconds or 0)
                writer.transport.abort()
                return
            if fault is not None:
                status, rheaders, rbody = fault.status, list(fault.headers.items()), fault.body
            else:
                status, rheaders, rbody = await self._forward(method, path, headers, body)
            keep = (_get(headers, "connection") or "").lower() != "close"
            out = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
            for k, v in rheaders:
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "keep-alive"):
                    out.append(f"{k}: {v}")
            out += [
                f"Content-Length: {len(rbody)}",
                f"Connection: {'keep-alive' if keep else 'close'}",
                "",
                "",
            ]
            writer.write("\r\n".join(out).encode("latin-1") + rbody)
            await writer.drain()
            if not keep:
                return

    async def _forward(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        ur, uw = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        try:
            out = [f"{method} {self.upstream_prefix}{path} HTTP/1.1"]
            for k, v in headers:
                if k.lower() not in (
                    "content-length",
                    "transfer-encoding",
                    "connection",
                    "keep-alive",
                    "host",
                ):
                    out.append(f"{k}: {v}")
            out += [
                f"Host: {self.upstream_host}:{self.upstream_port}",
                f"Content-Length: {len(body)}",
                "Connection: close",
                "",
                "",
            ]
            uw.write("\r\n".join(out).encode("latin-1") + body)
            await uw.drain()
            head = await _read_head(ur)
            if head is None:
                return 502, [], b"upstream closed the connection"
            status_line, rheaders = head
            rbody = await _read_body(ur, rheaders, until_eof=True)
            self.forwarded += 1
            return int(status_line.split(" ", 2)[1]), rheaders, rbody
        except OSError as exc:
            return 502, [("Content-Type", "text/plain")], f"upstream unreachable: {exc}".encode()
        finally:
            uw.close()


class ThreadedFaultProxy(FaultProxy):
    """The same proxy on its own event loop in a daemon thread; ``start_sync()`` / ``stop_sync()``.

    Only ``http_error``/``stall``/``reset``/``clear`` and the counters should be touched from other threads
    (deque appends are atomic).
    """

    def __init__(self, upstream: str, **kw: object) -> None:
        super().__init__(upstream, **kw)  # type: ignore[arg-type]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)

    def start_sync(self) -> ThreadedFaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.start(), self._loop).result(10)
        return self

    def stop_sync(self) -> None:
        asyncio.run_coroutine_threadsafe(self.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> ThreadedFaultProxy:
        return self.start_sync()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_sync()
