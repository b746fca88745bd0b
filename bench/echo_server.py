"""A plain asyncio MLLP echo-ACK server: the ceiling the engine is measured against.

Why this exists: it does what an MLLP receiver must do at the least (split frames,
answer each with a minimal AA ACK whose MSA-2 echoes MSH-10) and nothing else: no
parsing, no store.  Whatever msg/s it reaches with the same load generator on the
same machine is the ceiling for Sluice's listener.

    python bench/echo_server.py --port 2576          # prints "listening on 127.0.0.1:2576"
    python bench/echo_server.py --port 0             # a free port, printed on stdout

Uses uvloop when it is installed and ``--uvloop`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import mllp
from engine.errors import FramingError

_STAMP = time.strftime("%Y%m%d%H%M%S").encode()


def ack_for(payload: bytes) -> bytes:
    """A minimal original-mode AA ACK; MSA-2 = MSH-10 of ``payload`` (empty if unreadable)."""
    end = payload.find(b"\r")
    msh = payload[: end if end >= 0 else len(payload)]
    fields = msh.split(b"|") if msh.startswith(b"MSH|") else []
    control_id = fields[9] if len(fields) > 9 else b""
    return (
        b"MSH|^~\\&|ECHO|BENCH|LOAD|BENCH|" + _STAMP + b"||ACK^A01^ACK|A" + control_id + b"|P|2.5\r"
        b"MSA|AA|" + control_id + b"\r"
    )


class EchoAck(asyncio.Protocol):
    def __init__(self) -> None:
        self.framer = mllp.Framer()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        framer = self.framer
        framer.receive_data(data, 0.0)
        out: list[bytes] = []
        try:
            while True:
                ev = framer.next_event()
                if isinstance(ev, mllp.Frame):
                    out.append(mllp.START + ack_for(ev.payload) + mllp.END)
                elif isinstance(ev, mllp.Oversize):
                    out.append(mllp.encode(b"MSH|^~\\&|ECHO|BENCH|||" + _STAMP + b"||ACK|A|P|2.5\rMSA|AR|\r"))
                else:
                    break
        except FramingError:
            assert self.transport is not None
            self.transport.abort()
            return
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def eof_received(self) -> bool | None:
        return None


async def serve(host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(EchoAck, host, port, backlog=1024)


async def main(host: str, port: int) -> None:
    server = await serve(host, port)
    sock_port = server.sockets[0].getsockname()[1]
    print(f"listening on {host}:{sock_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2576)
    parser.add_argument("--uvloop", action="store_true", help="use uvloop if it is installed")
    args = parser.parse_args()
    if args.uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            print("uvloop is not installed; using asyncio's default loop", file=sys.stderr)
    asyncio.run(main(args.host, args.port))
