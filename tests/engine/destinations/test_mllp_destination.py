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


# ------------------------------------------------------------------ concurrency and rate limit


class PairingPeer:
    """An MLLP peer that holds every ACK until ``hold`` messages are waiting for one, then answers them all.

    A destination that keeps fewer than ``hold`` messages in flight would wait forever (the test's timeout
    fails it), so finishing proves it had ``hold`` in flight at once; ``max_waiting`` and ``connections``
    show it never had more.
    """

    def __init__(self, hold: int) -> None:
        self.hold = hold
        self.waiting: list[tuple[hl7.Message, asyncio.StreamWriter]] = []
        self.max_waiting = 0
        self.connections = 0
        self.received: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        framer = mllp.Framer()
        while True:
            data = await reader.read(65536)
            framer.receive_data(data)
            while (ev := framer.next_event()) is not mllp.NEED_DATA:
                if isinstance(ev, mllp.Frame):
                    msg = hl7.parse(ev.payload.decode())
                    self.received.append(msg.control_id)
                    self.waiting.append((msg, writer))
                    self.max_waiting = max(self.max_waiting, len(self.waiting))
                    if len(self.waiting) >= self.hold:
                        for m, w in self.waiting:
                            w.write(mllp.encode(ackmod.build(m, "AA").encode()))
                        self.waiting.clear()
                elif isinstance(ev, mllp.Closed):
                    writer.close()
                    return
            if not data:
                return


async def pairing_peer(hold: int) -> tuple[asyncio.base_events.Server, int, PairingPeer]:
    p = PairingPeer(hold)
    server = await asyncio.start_server(p.handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], p


def test_default_is_one_connection_one_message_in_flight() -> None:
    async def go() -> None:
        server, port, p = await pairing_peer(hold=1)
        d = dest(port)
        try:
            results = await asyncio.gather(*(d.deliver(item(f"C{i}")) for i in range(5)))
            assert results == ["AA"] * 5
            assert sorted(p.received) == [f"C{i}" for i in range(5)]
            assert p.connections == 1 and p.max_waiting == 1
            assert d.limiter.max_in_flight == 1
        finally:
            await d.close()
            server.close()

    run(go())


def test_concurrency_opens_that_many_connections_and_no_more() -> None:
    async def go() -> None:
        server, port, p = await pairing_peer(hold=3)
        d = dest(port, concurrency=3)
        try:
            # The peer answers only when 3 messages wait: this finishes only with 3 in flight at once.
            results = await asyncio.wait_for(
                asyncio.gather(*(d.deliver(item(f"C{i}")) for i in range(9))), timeout=20
            )
            assert results == ["AA"] * 9
            assert p.connections == 3 and p.max_waiting == 3
            assert len(d.clients) == 3 and d.limiter.max_in_flight == 3
            # the connections are reused: three more messages open nothing new
            await asyncio.wait_for(asyncio.gather(*(d.deliver(item(f"D{i}")) for i in range(3))), timeout=20)
            assert p.connections == 3
        finally:
            await d.close()
            server.close()

    run(go())


def test_rate_limit_makes_sends_wait_for_tokens() -> None:
    async def go() -> tuple[int, int]:
        server, port, p = await pairing_peer(hold=1)
        d = dest(port, concurrency=4, rate_limit=2)
        bucket = d.limiter.bucket
        assert bucket is not None and bucket.rate == 2.0
        waited = 0
        real_try = bucket.try_acquire

        def counting_try() -> bool:
            nonlocal waited
            ok = real_try()
            waited += not ok
            return ok

        bucket.try_acquire = counting_try  # type: ignore[method-assign]
        try:
            results = await asyncio.gather(*(d.deliver(item(f"C{i}")) for i in range(4)))
            assert results == ["AA"] * 4
            return waited, len(p.received)
        finally:
            await d.close()
            server.close()

    waited, received = run(go())
    # The bucket holds 2 tokens (burst = the rate): the 3rd and 4th message, sent at once, waited for
    # tokens (the bucket's timing itself is tested with a fake clock in tests/destinations/test_fhir.py).
    assert waited >= 1
    assert received == 4


def test_concurrency_and_rate_limit_are_validated() -> None:
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match="concurrency must be a whole number") as bad_conc:
        dest(1, concurrency=-1)
    assert "destinations.down.concurrency" in str(bad_conc.value)
    with pytest.raises(ConfigError, match="rate_limit must be a number") as bad_rate:
        dest(1, rate_limit="fast")
    assert "destinations.down.rate_limit" in str(bad_rate.value)
