"""Blocking-socket MLLP helpers for the hostile-client test and benchmark (tests/engine/test_hostile.py,
bench/hostile_bench.py): read one frame, push bytes at a peer that may stop reading."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable

VT, END = b"\x0b", b"\x1c\x0d"


def read_frame(sock: socket.socket, buf: bytearray, deadline: float | None = None) -> bytes:
    """The next frame's payload (bytes after it stay in ``buf``); ``deadline`` (monotonic) defaults to 60 s
    from now, after which the socket's timeout raises."""
    if deadline is None:
        deadline = time.monotonic() + 60.0
    while True:
        end = buf.find(END)
        if end >= 0:
            payload = bytes(buf[buf.find(VT) + 1 : end])
            del buf[: end + 2]
            return payload
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the engine closed the connection")
        buf += data


def push(
    sock: socket.socket, data: bytes | Callable[[int], bytes], total: int, stall: float, poll: float = 0.1
) -> int:
    """Send ``total`` bytes without ever reading (``data``: the bytes, or the chunk to send from an offset);
    give up once the peer has taken nothing for ``stall`` seconds.  The bytes sent."""
    sock.setblocking(False)
    sent, chunk, last = 0, b"", time.monotonic()
    while sent < total:
        if not chunk:
            chunk = data(sent) if callable(data) else data[sent : sent + (1 << 20)]
        _, writable, _ = select.select([], [sock], [], poll)
        if not writable:
            if time.monotonic() - last > stall:
                break
            continue
        try:
            n = sock.send(chunk[:262144])
        except BlockingIOError:
            continue
        except OSError:
            break
        sent, chunk, last = sent + n, chunk[n:], time.monotonic()
    return sent
