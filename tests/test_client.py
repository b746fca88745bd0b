"""MLLPClient against tiny real asyncio servers on 127.0.0.1, and the pure parse_ack."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from engine import mllp
from engine.client import AckInfo, MLLPClient, parse_ack
from engine.errors import DeliveryError, PermanentDeliveryError
from tests.support.polling import wait_for_async

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def message(control_id: str) -> bytes:
    return (
        f"MSH|^~\\&|SENDER|FAC|SLUICE|FAC|20250101120000||ADT^A01^ADT_A01|{control_id}|P|2.5\r"
        "EVN|A01|20250101120000\rPID|1||MRN0001^^^HOSP^MR||DOE^JANE\r"
    ).encode()


def ack(payload: bytes, code: str = "AA") -> bytes:
    control_id = payload.split(b"\r", 1)[0].split(b"|")[9].decode()
    return (
        f"MSH|^~\\&|SLUICE|FAC|SENDER|FAC|20250101120001||ACK^A01^ACK|A{control_id}|P|2.5\r"
        f"MSA|{code}|{control_id}\r"
    ).encode()


async def read_frames(reader: asyncio.StreamReader, framer: mllp.Framer) -> list[bytes] | None:
    """The next complete frames from the reader (None at EOF)."""
    while True:
        out: list[bytes] = []
        while True:
            ev = framer.next_event()
            if isinstance(ev, mllp.Frame):
                out.append(ev.payload)
                continue
            if isinstance(ev, mllp.Closed):
                return out or None
            break
        if out:
            return out
        framer.receive_data(await reader.read(65536))


class Server:
    """A real TCP server on 127.0.0.1:0 running ``handler`` per connection."""

    def __init__(self, handler: Handler, ssl_ctx: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_ctx = ssl_ctx
        self.connections = 0
        self.received: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Server:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=self.ssl_ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def acking(server_ref: list[Server], code: str = "AA", chunk: int = 0) -> Handler:
    """Answer every frame with an ACK (optionally written ``chunk`` bytes at a time)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = mllp.Framer()
        while (frames := await read_frames(reader, framer)) is not None:
            for f in frames:
                server_ref[0].received.append(f)
                wire = mllp.encode(ack(f, code))
                if chunk:
                    for i in range(0, len(wire), chunk):
                        writer.write(wire[i : i + chunk])
                        await writer.drain()
                        await asyncio.sleep(0)
                else:
                    writer.write(wire)
                await writer.drain()

    return handle


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


async def serve(make: Callable[[list[Server]], Handler], ssl_ctx: ssl.SSLContext | None = None) -> Server:
    ref: list[Server] = []
    server = Server(make(ref), ssl_ctx)
    ref.append(server)
    return await server.__aenter__()


def test_send_returns_ack_and_reuses_connection() -> None:
    async def main() -> None:
        server = await serve(acking)
        async with MLLPClient("127.0.0.1", server.port) as client:
            for i in range(5):
                reply = await client.send(message(f"C{i}"))
                assert parse_ack(reply) == AckInfo("AA", f"C{i}", "", "")
        assert server.connections == 1
        assert server.received == [message(f"C{i}") for i in range(5)]
        await server.__aexit__()

    run(main())


def test_ack_arriving_one_byte_at_a_time() -> None:
    async def main() -> None:
        server = await serve(lambda ref: acking(ref, chunk=1))
        client = MLLPClient("127.0.0.1", server.port)
        assert parse_ack(await client.send(message("SLOW1"))).control_id == "SLOW1"
        await client.close()
        await server.__aexit__()

    run(main())


def test_concurrent_sends_on_one_client_are_serialised() -> None:
    async def main() -> None:
        server = await serve(acking)
        async with MLLPClient("127.0.0.1", server.port) as client:
            replies = await asyncio.gather(*(client.send(message(f"P{i}")) for i in range(20)))
        assert [parse_ack(r).control_id for r in replies] == [f"P{i}" for i in range(20)]
        assert server.connections == 1
        await server.__aexit__()

    run(main())


def test_ack_timeout_closes_and_next_send_reconnects() -> None:
    answered: list[int] = []

    def make(ref: list[Server]) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            framer = mllp.Framer()
            first = not answered
            answered.append(1)
            while (frames := await read_frames(reader, framer)) is not None:
                for f in frames:
                    if first:
                        continue  # the first connection never answers
                    writer.write(mllp.encode(ack(f)))
                    await writer.drain()

        return handle

    async def main() -> None:
        server = await serve(make)
        client = MLLPClient("127.0.0.1", server.port, ack_timeout=0.3)
        with pytest.raises(DeliveryError, match=r"no ACK .* within 0\.3s") as info:
            await client.send(message("T1"))
        assert info.value.retryable
        assert not client.connected
        assert parse_ack(await client.send(message("T2"))).control_id == "T2"
        assert server.connections == 2
        await client.close()
        await server.__aexit__()

    run(main())


def test_peer_closes_before_ack() -> None:
    def make(ref: list[Server]) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_frames(reader, mllp.Framer())  # read one frame, then hang up

        return handle

    async def main() -> None:
        server = await serve(make)
        client = MLLPClient("127.0.0.1", server.port)
        for i in range(2):  # each send reconnects after the failure
            with pytest.raises(DeliveryError, match="closed before an ACK") as info:
                await client.send(message(f"X{i}"))
            assert info.value.retryable
        assert server.connections == 2
        await client.close()
        await server.__aexit__()

    run(main())


def test_peer_closing_idle_connection_is_transparent() -> None:
    def make(ref: list[Server]) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            frames = await read_frames(reader, mllp.Framer())
            assert frames
            writer.write(mllp.encode(ack(frames[0])))
            await writer.drain()  # then close: one message per connection

        return handle

    async def main() -> None:
        server = await serve(make)
        client = MLLPClient("127.0.0.1", server.port)
        assert parse_ack(await client.send(message("I1"))).code == "AA"
        await wait_for_async(lambda: not client.connected, what="the client to see the server's close")
        assert parse_ack(await client.send(message("I2"))).control_id == "I2"
        assert server.connections == 2
        await client.close()
        await server.__aexit__()

    run(main())


def test_connection_refused_is_retryable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens here

    async def main() -> None:
        client = MLLPClient("127.0.0.1", port, connect_timeout=2.0)
        with pytest.raises(DeliveryError, match=f"cannot connect to 127.0.0.1:{port}") as info:
            await client.send(message("R1"))
        assert info.value.retryable
        await client.close()

    run(main())


def test_payload_with_framing_byte_is_permanent() -> None:
    async def main() -> None:
        client = MLLPClient("127.0.0.1", 9)  # never contacted
        with pytest.raises(PermanentDeliveryError, match="framing byte"):
            await client.send(b"MSH|^~\\&|\x1c\r")

    run(main())


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        pytest.param(b"\x0bMSA|AA|1\x1cX", "broke MLLP framing", id="fs-without-cr"),
        pytest.param(b"\x0b" + b"x" * 200 + b"\x1c\x0d", "over the client's size cap", id="oversize-ack"),
    ],
)
def test_broken_reply_is_retryable(reply: bytes, match: str) -> None:
    def make(ref: list[Server]) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_frames(reader, mllp.Framer())
            writer.write(reply)
            await writer.drain()
            await reader.read()

        return handle

    async def main() -> None:
        server = await serve(make)
        client = MLLPClient("127.0.0.1", server.port, max_ack_size=100)
        with pytest.raises(DeliveryError, match=match) as info:
            await client.send(message("B1"))
        assert info.value.retryable
        assert not client.connected
        await client.close()
        await server.__aexit__()

    run(main())


def test_stray_frame_before_send_is_not_taken_as_ack() -> None:
    def make(ref: list[Server]) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            framer = mllp.Framer()
            while (frames := await read_frames(reader, framer)) is not None:
                for f in frames:
                    # Enhanced mode: a commit ACK then an application ACK.
                    writer.write(mllp.encode(ack(f, "CA")) + mllp.encode(ack(f, "AA")))
                    await writer.drain()

        return handle

    async def main() -> None:
        server = await serve(make)
        async with MLLPClient("127.0.0.1", server.port) as client:
            assert parse_ack(await client.send(message("E1"))).code == "CA"
            # The AA for E1 arrives while nothing is in flight: wait until the client holds it.
            proto = client._proto
            assert proto is not None
            await wait_for_async(lambda: len(proto.frames) == 1, what="E1's AA to reach the idle client")
            info = parse_ack(await client.send(message("E2")))
            assert (info.code, info.control_id) == ("CA", "E2")
        await server.__aexit__()

    run(main())


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed to make a throwaway certificate for the TLS test"
    d: Path = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
        check=True,
        capture_output=True,
    )  # fmt: skip
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    client_ctx = ssl.create_default_context(cafile=str(d / "cert.pem"))
    return server_ctx, client_ctx


def test_tls(tls_pair: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls_pair

    async def main() -> None:
        server = await serve(acking, ssl_ctx=server_ctx)
        async with MLLPClient("127.0.0.1", server.port, ssl=client_ctx) as client:
            assert parse_ack(await client.send(message("TLS1"))) == AckInfo("AA", "TLS1", "", "")
        untrusted = MLLPClient("127.0.0.1", server.port, ssl=ssl.create_default_context())
        with pytest.raises(DeliveryError, match="cannot connect"):
            await untrusted.send(message("TLS2"))
        await server.__aexit__()

    run(main())


# -- parse_ack ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(
            b"MSH|^~\\&|R|F|S|F|20250101||ACK^A01^ACK|9|P|2.5\rMSA|AA|CTRL42\r",
            AckInfo("AA", "CTRL42", "", ""),
            id="aa",
        ),
        pytest.param(
            b"MSH|^~\\&|R|F|S|F|20250101||ACK|9|P|2.5\nMSA|CA|C1\n", AckInfo("CA", "C1", "", ""), id="ca-lf"
        ),
        pytest.param(
            b"MSH|^~\\&|R|F|S|F|20250101||ACK^A01^ACK|9|P|2.5\rMSA|AE|C2\r"
            b"ERR||PID^1^3|101^Required field missing^HL70357|E\r",
            AckInfo("AE", "C2", "Required field missing", "101"),
            id="ae-v25-err3",
        ),
        pytest.param(
            b"MSH|^~\\&|R|F|S|F|20250101||ACK^A01|9|P|2.3\rMSA|AR|C3|Unsupported message type\r"
            b"ERR|MSH^1^9^200&Unsupported message type&HL70357\r",
            AckInfo("AR", "C3", "Unsupported message type", "200"),
            id="ar-v23-err1",
        ),
        pytest.param(
            b"MSH|^~\\&|R|F|S|F|20250101||ACK|9|P|2.5\rMSA|AR||bad frame\r",
            AckInfo("AR", "", "bad frame", ""),
            id="ar-empty-msa2",
        ),
        pytest.param(
            b"MSH!@#$%!R!F!S!F!20250101!!ACK@A01!9!P!2.5\rMSA!AA!C$F$4\r",
            AckInfo("AA", "C!4", "", ""),
            id="custom-delimiters-escaped",
        ),
        pytest.param(b"MSH|^~\\&|R|F|S|F|2025||ADT^A01|9|P|2.5\rPID|1\r", None, id="not-an-ack"),
        pytest.param(b"\x00\xffgarbage", None, id="garbage"),
        pytest.param(b"", None, id="empty"),
        pytest.param(
            b"MSH|^~\\&|R|F|S|F|2025||ACK|9|P|2.5||||||UNICODE UTF-8\rMSA|AA|\xff\r",
            AckInfo("AA", "\xff", "", ""),
            id="bad-utf8-read-as-latin1",
        ),
    ],
)
def test_parse_ack(payload: bytes, expected: AckInfo | None) -> None:
    info = parse_ack(payload)
    if expected is None:
        assert info.code == ""
        assert info.text  # says why
    else:
        assert info == expected
