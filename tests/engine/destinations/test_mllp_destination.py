"""The MLLP destination against a real MLLP peer on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from engine import ack as ackmod
from engine import hl7, mllp
from engine.destinations.base import CONTENT_HL7, DestinationContext, Outbound
from engine.destinations.mllp import MLLPDestination
from engine.errors import DeliveryError, PermanentDeliveryError

Reply = Callable[[hl7.Message], bytes | None]


async def peer(reply: Reply) -> tuple[asyncio.base_events.Server, int, list[bytes]]:
    got: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = mllp.Framer()
        while True:
            data = await reader.read(65536)
            framer.receive_data(data)
            while True:
                ev = framer.next_event()
                if ev is mllp.NEED_DATA:
                    break
                if isinstance(ev, mllp.Frame):
                    got.append(ev.payload)
                    out = reply(hl7.parse(ev.payload.decode()))
                    if out is not None:
                        writer.write(mllp.encode(out))
                        await writer.drain()
                elif isinstance(ev, mllp.Closed):
                    writer.close()
                    return
            if not data:
                return

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], got


def item(control: str = "C1") -> Outbound:
    raw = f"MSH|^~\\&|A|B|C|D|||ADT^A01|{control}|P|2.5\rPID|1||X\r".encode()
    return Outbound(1, "ch", "down", control, "ADT", "A01", raw, raw, CONTENT_HL7)


def answer(code: str) -> Reply:
    return lambda m: ackmod.build(m, code).encode()


def dest(port: int, **opts: object) -> MLLPDestination:
    return MLLPDestination("down", {"host": "127.0.0.1", "port": port, **opts}, DestinationContext(Path(".")))


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_aa_delivers_and_reuses_connection() -> None:
    async def go() -> None:
        server, port, got = await peer(answer("AA"))
        d = dest(port)
        try:
            assert await d.deliver(item("C1")) == "AA"
            assert await d.deliver(item("C2")) == "AA"
            assert len(got) == 2
        finally:
            await d.close()
            server.close()

    run(go())


def test_ae_dead_letters_by_default_and_retries_when_asked() -> None:
    async def go() -> None:
        server, port, _ = await peer(answer("AE"))
        d1, d2 = dest(port), dest(port, on_error="retry")
        try:
            with pytest.raises(PermanentDeliveryError, match="receiver answered AE"):
                await d1.deliver(item())
            with pytest.raises(DeliveryError) as ei:
                await d2.deliver(item())
            assert ei.value.retryable
        finally:
            await d1.close()
            await d2.close()
            server.close()

    run(go())


def test_msa2_mismatch_is_an_error() -> None:
    async def go() -> None:
        server, port, _ = await peer(lambda m: ackmod.build(m, "AA").replace("|C1", "|OTHER").encode())
        d = dest(port)
        try:
            with pytest.raises(DeliveryError, match="MSA-2"):
                await d.deliver(item("C1"))
        finally:
            await d.close()
            server.close()

    run(go())


def test_ack_timeout_is_retryable() -> None:
    async def go() -> None:
        server, port, _ = await peer(lambda m: None)
        d = dest(port, ack_timeout=0.3)
        try:
            with pytest.raises(DeliveryError) as ei:
                await d.deliver(item())
            assert ei.value.retryable
        finally:
            await d.close()
            server.close()

    run(go())


def test_unreachable_is_retryable() -> None:
    from tests.support.engine import free_port

    async def go() -> None:
        d = dest(free_port(), connect_timeout=0.5)
        with pytest.raises(DeliveryError) as ei:
            await d.deliver(item())
        assert ei.value.retryable
        await d.close()

    run(go())


def test_tls_config_errors_name_the_key(tmp_path: Path) -> None:
    from engine.errors import ConfigError

    ctx = DestinationContext(tmp_path)
    with pytest.raises(ConfigError, match="cannot load the TLS files") as missing:
        MLLPDestination("down", {"host": "127.0.0.1", "port": 1, "tls": {"ca": "nope.pem"}}, ctx)
    assert "destinations.down.tls" in str(missing.value)
    with pytest.raises(ConfigError, match="unknown tls option"):
        MLLPDestination("down", {"host": "127.0.0.1", "port": 1, "tls": {"ca_file": "x.pem"}}, ctx)
