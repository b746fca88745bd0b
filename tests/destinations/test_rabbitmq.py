"""RabbitMQ destination against the real broker on 127.0.0.1:5672 (guest/guest)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aio_pika
import aio_pika.abc
import orjson
import pytest

from engine.destinations.base import CONTENT_FHIR, CONTENT_HL7, CONTENT_JSON, DestinationContext
from engine.destinations.rabbitmq import RabbitMQDestination
from engine.errors import ConfigError, DeliveryError, PermanentDeliveryError
from tests.destinations.conftest import make_item
from tests.support.ci import service_unavailable

T = TypeVar("T")
URL = "amqp://guest:guest@127.0.0.1/"
BUNDLE = orjson.dumps(
    {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {"resourceType": "MessageHeader"},
                "request": {"method": "POST", "url": "MessageHeader"},
            },
            {
                "resource": {"resourceType": "Patient", "id": "syn1"},
                "request": {"method": "PUT", "url": "Patient/syn1"},
            },
        ],
    }
)

pytestmark = pytest.mark.rabbitmq


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.fixture(scope="module", autouse=True)
def broker() -> None:
    async def ping() -> None:
        conn = await aio_pika.connect(URL, timeout=5)
        await conn.close()

    try:
        run(ping())
    except Exception as exc:
        service_unavailable(
            f"RabbitMQ on 127.0.0.1:5672 unavailable ({exc}); start it with `rabbitmq-server -detached`"
        )


@contextlib.asynccontextmanager
async def bound_queue(exchange: str, binding: str = "#") -> AsyncIterator[aio_pika.abc.AbstractQueue]:
    """A durable queue bound to ``exchange`` (declared like the destination does), deleted afterwards."""
    conn = await aio_pika.connect(URL, timeout=5)
    ch = await conn.channel()
    ex = await ch.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    q = await ch.declare_queue(f"test-{exchange}", durable=True)
    await q.bind(ex, binding)
    try:
        yield q
    finally:
        with contextlib.suppress(Exception):
            await q.delete(if_unused=False, if_empty=False)
            await ex.delete()
        await conn.close()


Messages = list[aio_pika.abc.AbstractIncomingMessage]


async def drain(
    q: aio_pika.abc.AbstractQueue, complete: Callable[[Messages], bool], *, timeout: float = 30.0
) -> Messages:
    """Everything in the queue, read until it is empty and what arrived is ``complete``.

    The destination's publishes were confirmed, so they are in the queue already and ``complete``
    holds at the first empty read; the poll (bounded by ``timeout``) only guards against a broker
    that confirms before a basic.get can see the message.  Any extra message is read too, for the
    caller to see.
    """
    out: Messages = []
    deadline = time.monotonic() + timeout
    while True:
        msg = await q.get(no_ack=False, fail=False, timeout=5)
        if msg is not None:
            await msg.ack()
            out.append(msg)
            continue
        if complete(out):
            return out
        assert time.monotonic() < deadline, f"queue empty after {len(out)} message(s), more were published"
        await asyncio.sleep(0.05)


def dest(ctx: DestinationContext, exchange: str, **opts: Any) -> RabbitMQDestination:
    return RabbitMQDestination("bus", {"url": URL, "exchange": exchange, **opts}, ctx)


def name() -> str:
    return f"sluice-test-{uuid.uuid4().hex[:10]}"


def test_publish_confirmed_with_headers(ctx: DestinationContext) -> None:
    ex = name()

    async def go() -> list[aio_pika.abc.AbstractIncomingMessage]:
        async with bound_queue(ex, "hl7.ADT.*") as q:
            d = dest(ctx, ex)
            await d.start()
            detail = await d.deliver(make_item(BUNDLE, message_id=41, control_id="CTRL0041"))
            await d.close()
            assert detail == f"confirmed {ex}/hl7.ADT.A04"
            return await drain(q, lambda got: len(got) >= 1)

    (msg,) = run(go())
    assert msg.body == BUNDLE
    assert msg.content_type == CONTENT_FHIR
    assert msg.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert msg.message_id == "41" and msg.correlation_id == "CTRL0041"
    assert msg.routing_key == "hl7.ADT.A04" and msg.type == "ADT^A04" and msg.app_id == "sluice"
    assert msg.headers["x-sluice-message-id"] == 41
    assert msg.headers["x-sluice-channel"] == "adt-in"
    assert msg.headers["x-sluice-control-id"] == "CTRL0041"


def test_payload_modes_and_resource_type_key(ctx: DestinationContext) -> None:
    ex = name()

    async def go() -> list[aio_pika.abc.AbstractIncomingMessage]:
        async with bound_queue(ex) as q:
            for i, payload in enumerate(("hl7", "both", "fhir")):
                d = dest(ctx, ex, payload=payload, routing_key="fhir.{resourceType}.{channel}")
                await d.deliver(make_item(BUNDLE, message_id=i))  # deliver() connects on demand
                await d.close()
            d = dest(ctx, ex, routing_key="fhir.{resourceType}")
            await d.deliver(make_item(BUNDLE, message_id=9, meta={"resourceType": "Encounter"}))
            await d.close()
            return await drain(q, lambda got: len(got) >= 4)

    hl7, both, fhir, meta = run(go())
    item = make_item(BUNDLE)
    assert hl7.body == item.raw and hl7.content_type == CONTENT_HL7
    env = orjson.loads(both.body)
    assert both.content_type == CONTENT_JSON
    assert env["hl7"] == item.raw.decode() and env["payload"] == orjson.loads(BUNDLE)
    assert env["control_id"] == item.control_id and env["message_id"] == 1
    assert fhir.body == BUNDLE and fhir.routing_key == "fhir.Patient.adt-in"
    assert meta.routing_key == "fhir.Encounter"


def test_unroutable_with_mandatory_is_retryable(ctx: DestinationContext) -> None:
    ex = name()

    async def go() -> DeliveryError:
        d = dest(ctx, ex, mandatory=True)
        try:
            with pytest.raises(DeliveryError) as info:
                await d.deliver(make_item(BUNDLE))
            return info.value
        finally:
            await d.close()
            conn = await aio_pika.connect(URL)
            ch = await conn.channel()
            await ch.exchange_delete(ex)
            await conn.close()

    err = run(go())
    assert err.retryable and "unroutable" in err.message and "bind a queue" in err.message


def test_missing_template_field_is_permanent(ctx: DestinationContext) -> None:
    d = dest(ctx, name(), routing_key="x.{ward}")
    with pytest.raises(PermanentDeliveryError, match="needs 'ward'"):
        run(d.deliver(make_item(BUNDLE)))


def test_broker_down_fails_fast_with_backoff(
    ctx: DestinationContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = RabbitMQDestination(
        "bus", {"url": "amqp://guest:guest@127.0.0.1:1/", "connect_timeout": 1, "reconnect_initial": 5}, ctx
    )
    now = [100.0]
    d.clock = lambda: now[0]  # the backoff's clock: moves only when the test moves it
    attempts: list[str] = []
    real_connect = aio_pika.connect

    async def counting_connect(*args: Any, **kwargs: Any) -> Any:
        attempts.append("connect")
        return await real_connect(*args, **kwargs)

    monkeypatch.setattr(aio_pika, "connect", counting_connect)

    async def go() -> tuple[DeliveryError, DeliveryError, DeliveryError]:
        with pytest.raises(DeliveryError) as first:
            await d.deliver(make_item(BUNDLE))
        with pytest.raises(DeliveryError) as second:
            await d.deliver(make_item(BUNDLE))
        attempts.append("-- inside the backoff --")
        assert first.value.retry_after is not None
        now[0] += first.value.retry_after  # the backoff has run out: the next delivery reconnects
        with pytest.raises(DeliveryError) as third:
            await d.deliver(make_item(BUNDLE))
        attempts.append("-- after the backoff --")
        await RabbitMQDestination("bus", {"url": "amqp://guest:guest@127.0.0.1:1/"}, ctx).start()  # not fatal
        return first.value, second.value, third.value

    first, second, third = run(go())
    assert first.retryable and "cannot connect" in first.message
    assert first.retry_after is not None and 4 <= first.retry_after <= 6  # reconnect_initial ± 20 % jitter
    # No hang: inside the backoff window the second delivery fails without trying to connect, and
    # says how long is left (all of it: no time passed on the destination's clock).
    assert second.retryable and "next reconnect attempt" in second.message
    assert second.retry_after == pytest.approx(first.retry_after)
    # After the backoff it tries again, fails again and doubles the backoff.
    assert third.retryable and "cannot connect" in third.message
    assert third.retry_after is not None and 8 <= third.retry_after <= 12
    assert attempts[:4] == ["connect", "-- inside the backoff --", "connect", "-- after the backoff --"]


def test_config(ctx: DestinationContext, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="must not be written in the YAML"):
        dest(ctx, "x", url="amqp://sluice:hunter2@127.0.0.1/")
    monkeypatch.setenv("SYN_AMQP_URL", "amqp://sluice:hunter2@127.0.0.1/")
    assert dest(ctx, "x", url={"env": "SYN_AMQP_URL"}).url.endswith("@127.0.0.1/")
    with pytest.raises(ConfigError, match="not one of"):
        dest(ctx, "x", payload="xml")


def test_exchange_type_mismatch_is_config_error(ctx: DestinationContext) -> None:
    ex = name()

    async def go() -> None:
        conn = await aio_pika.connect(URL)
        ch = await conn.channel()
        await ch.declare_exchange(ex, aio_pika.ExchangeType.FANOUT, durable=True)
        try:
            with pytest.raises(ConfigError, match="exists with other settings"):
                await dest(ctx, ex).start()
        finally:
            ch = await conn.channel()
            await ch.exchange_delete(ex)
            await conn.close()

    run(go())


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


def test_broker_restart_mid_stream_loses_nothing(ctx: DestinationContext) -> None:
    if not shutil.which("rabbitmqctl"):
        service_unavailable("rabbitmqctl not found; needed to restart the broker")
    ex, n = name(), 300

    async def go() -> tuple[list[aio_pika.abc.AbstractIncomingMessage], int, int]:
        async with bound_queue(ex) as _q:
            qname = _q.name
        # the queue outlives the consumer connection; re-open it after the restart
        conn0 = await aio_pika.connect(URL)
        ch0 = await conn0.channel()
        exo = await ch0.declare_exchange(ex, aio_pika.ExchangeType.TOPIC, durable=True)
        q0 = await ch0.declare_queue(qname, durable=True)
        await q0.bind(exo, "#")
        await conn0.close()

        d = dest(ctx, ex, reconnect_initial=0.2, reconnect_max=1, confirm_timeout=5)
        await d.start()
        errors = 0
        restarted = asyncio.Event()
        down = asyncio.Event()  # stop_app has returned
        hit = asyncio.Event()  # a publish has failed on the outage

        async def restart() -> None:
            try:
                await asyncio.to_thread(rabbitmqctl, "stop_app")
                down.set()
                # The broker stays down until the publisher has run into the outage (bounded).
                await asyncio.wait_for(hit.wait(), 120)
            finally:
                await asyncio.to_thread(rabbitmqctl, "start_app")
                restarted.set()

        async def publish(i: int) -> None:
            nonlocal errors
            deadline = time.monotonic() + 120
            while True:
                try:
                    await d.deliver(make_item(BUNDLE, message_id=i, control_id=f"C{i:05d}"))
                    return
                except DeliveryError as exc:  # what the engine's worker does: retry later
                    assert exc.retryable, exc.message
                    errors += 1
                    if down.is_set():
                        hit.set()
                    assert time.monotonic() < deadline, "broker did not come back"
                    await asyncio.sleep(min(exc.retry_after or 0.2, 0.5))

        restarter: asyncio.Task[None] | None = None
        try:
            for i in range(n):
                if i == n // 3:
                    restarter = asyncio.create_task(restart())  # stops the broker while we publish
                if i == 2 * n // 3:
                    # The rest of the stream goes out with the broker down (then back): never all of
                    # it before stop_app has taken effect.
                    await asyncio.wait_for(down.wait(), 120)
                await publish(i)
            if restarter is not None:
                await restarter
        finally:
            if restarter is not None and not restarted.is_set():
                with contextlib.suppress(Exception):
                    await restarter
            if not restarted.is_set():
                await asyncio.to_thread(rabbitmqctl, "start_app")
            await d.close()

        await asyncio.to_thread(rabbitmqctl, "await_startup")
        conn = await aio_pika.connect(URL)
        ch = await conn.channel()
        q = await ch.declare_queue(qname, durable=True)
        every = {str(i) for i in range(n)}
        got = await drain(q, lambda got: {m.message_id for m in got} >= every)
        await q.delete(if_unused=False, if_empty=False)
        await ch.exchange_delete(ex)
        await conn.close()
        return got, errors, d.connects

    got, errors, connects = run(go())
    ids = [m.message_id for m in got]
    assert set(ids) == {str(i) for i in range(n)}, f"lost {n - len(set(ids))} of {n}"
    assert errors > 0 and connects >= 2  # the restart really hit the publisher, and it reconnected
    print(
        f"\nbroker restart: {n} published, {len(ids)} received, {len(ids) - len(set(ids))} duplicates, "
        f"{errors} retryable errors, {connects} connections"
    )
