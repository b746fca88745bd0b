"""Issue 4, RabbitMQ end to end: MLLP in → store → HL7→FHIR → rabbitmq destination (publisher confirms), with
the broker restarted (``rabbitmqctl stop_app`` / ``start_app``) while a stream of ADT messages is flowing.

A durable queue bound to the exchange must receive every message at least once; the engine is at-least-once,
so a publish whose confirm was lost in the restart may arrive twice: the test reports the number of duplicates
and checks that every copy carries the ids a consumer needs to dedupe.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.abc
import orjson
import pytest

from engine import store as st
from engine.client import MLLPClient, parse_ack
from tests.conftest import service_unavailable
from tests.support.engine import EngineProcess, fhir_channel, free_port, write_config

pytestmark = pytest.mark.rabbitmq

URL = "amqp://guest:guest@127.0.0.1/"
N = 300
RESTART_AT = 80
TRIGGERS = ("A04", "A08", "A01")


def rabbitmqctl(*args: str, timeout: float = 120) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=timeout)


@pytest.fixture(scope="module", autouse=True)
def broker() -> None:
    async def ping() -> None:
        conn = await aio_pika.connect(URL, timeout=5)
        await conn.close()

    try:
        asyncio.run(ping())
    except Exception as exc:
        service_unavailable(
            f"RabbitMQ on 127.0.0.1:5672 unavailable ({exc}); start it with `rabbitmq-server -detached`"
        )
    if not shutil.which("rabbitmqctl"):
        service_unavailable("rabbitmqctl not found; needed to restart the broker")


def adt(i: int) -> bytes:
    trigger = TRIGGERS[i % len(TRIGGERS)]
    return (
        f"MSH|^~\\&|ALLSCRIPTS|NORTHCLINIC|SLUICE|HOSP|20250314083000||ADT^{trigger}^ADT_A01|RQ{i:05d}|P|2.5.1\r"
        f"EVN|{trigger}|20250314083000\r"
        f"PID|1||RQ{i:05d}^^^NORTHCLINIC^MR||Streamtest^Sam^{i}||19800101|F\r"
        f"PV1|1|O|4N^401^A^NORTHCLINIC||||||||||||||||RV{i:05d}^^^NORTHCLINIC^VN\r"
    ).encode()


async def declare_queue(exchange: str, queue: str) -> None:
    conn = await aio_pika.connect(URL, timeout=5)
    try:
        ch = await conn.channel()
        ex = await ch.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        q = await ch.declare_queue(queue, durable=True)
        await q.bind(ex, "hl7.ADT.*")
    finally:
        await conn.close()


async def drain_and_delete(exchange: str, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    conn = await aio_pika.connect(URL, timeout=10)
    out: list[aio_pika.abc.AbstractIncomingMessage] = []
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(queue, durable=True)
        # The engine records a delivery only after the broker confirmed it, so everything the test
        # waited for is in the queue already: read until the broker says the queue is empty.
        while True:
            msg = await q.get(no_ack=False, fail=False, timeout=5)
            if msg is None:
                left = await ch.declare_queue(queue, durable=True, passive=True)
                if not left.declaration_result.message_count:
                    break
                continue
            await msg.ack()
            out.append(msg)
    finally:
        with contextlib.suppress(Exception):
            ch = await conn.channel()
            await ch.queue_delete(queue)
            await ch.exchange_delete(exchange)
        await conn.close()
    return out


def send_stream(port: int, on_progress: Any) -> None:
    async def go() -> None:
        client = MLLPClient("127.0.0.1", port)
        try:
            for i in range(N):
                info = parse_ack(await client.send(adt(i)))
                assert info.code == "AA", info
                on_progress(i)
                await asyncio.sleep(0.01)  # a steady stream, so the restart lands mid-stream
        finally:
            await client.close()

    asyncio.run(go())


@pytest.mark.parametrize("mandatory", [False, True], ids=["default", "mandatory"])
def test_broker_restart_mid_stream_loses_nothing(tmp_path: Path, mandatory: bool) -> None:
    exchange, queue = f"sluice-e2e-{uuid.uuid4().hex[:8]}", f"sluice-e2e-q-{uuid.uuid4().hex[:8]}"
    asyncio.run(declare_queue(exchange, queue))
    port = free_port()
    channel = fhir_channel(port, "bus")
    dest = {
        "kind": "rabbitmq",
        "url": URL,
        "exchange": exchange,
        "routing_key": "hl7.{type}.{trigger}",
        "payload": "both",
        "mandatory": mandatory,
        "confirm_timeout": 3,
        "connect_timeout": 2,
        "reconnect_initial": 0.2,
        "reconnect_max": 1,
        # enough attempts to outlast the restart (several seconds), small backoffs to keep the test fast
        "retry": {"max_attempts": 200, "backoff": 0.2, "max_backoff": 1},
    }
    cfg = write_config(tmp_path, channels={"adt": channel}, destinations={"bus": dest})
    db = tmp_path / "sluice.db"

    restart_done = threading.Event()
    restart_error: list[BaseException] = []
    restart_started = threading.Event()
    timings: dict[str, float] = {}

    def restart() -> None:
        try:
            timings["stop"] = time.monotonic()
            rabbitmqctl("stop_app")
            time.sleep(1.0)
        except BaseException as exc:
            restart_error.append(exc)
        finally:
            try:
                rabbitmqctl("start_app")
                rabbitmqctl("await_startup")
                timings["up"] = time.monotonic()
            except BaseException as exc:
                restart_error.append(exc)
            restart_done.set()

    restarter = threading.Thread(target=restart, name="broker-restart", daemon=True)

    def progress(i: int) -> None:
        if i == RESTART_AT and not restart_started.is_set():
            restart_started.set()
            restarter.start()

    got: list[aio_pika.abc.AbstractIncomingMessage] = []
    try:
        with EngineProcess(cfg, port) as eng:
            t0 = time.monotonic()
            send_stream(eng.port, progress)
            sent_done = time.monotonic()
            restart_done.wait(180)
            assert restart_done.is_set(), "broker restart did not finish"
            assert not restart_error, f"broker restart failed: {restart_error}"
            s = st.Store(f"sqlite:///{db}")
            try:
                deadline = time.monotonic() + 90
                while time.monotonic() < deadline:
                    counts = s.delivery_counts()
                    if counts.get(("bus", st.DELIVERED), 0) >= N and not counts.get(("bus", st.PENDING)):
                        break
                    assert not counts.get(("bus", st.DEAD)), [dict(r._mapping) for r in s.dead_letters()]
                    time.sleep(0.2)
                counts = s.delivery_counts()
                assert counts == {("bus", st.DELIVERED): N}, counts
                delivered_at = time.monotonic()
                messages = s.list_messages(limit=10 * N)
                rows = [d for m in messages for d in s.deliveries_of(m.id)]
                store_ids = {str(m.id) for m in messages}
                control_of = {str(m.id): m.control_id for m in messages}
            finally:
                s.close()
    finally:
        if restart_started.is_set():  # else the stream failed before the restart: nothing to restore
            restart_done.wait(180)
            with contextlib.suppress(Exception):
                rabbitmqctl("start_app")  # idempotent: make sure the broker is up whatever happened
                rabbitmqctl("await_startup")
        got = asyncio.run(drain_and_delete(exchange, queue))

    retried = [d.attempts for d in rows if d.attempts > 1]
    assert retried, "no delivery was retried: the restart did not hit the publisher"
    assert len(store_ids) == N

    ids = [m.message_id for m in got]
    missing = store_ids - set(ids)
    assert not missing, f"lost {len(missing)} of {N} messages across the broker restart"
    assert set(ids) == store_ids  # and nothing foreign
    duplicates = len(ids) - len(set(ids))
    copies: dict[str, list[int]] = {}
    for m in got:
        copies.setdefault(str(m.message_id), []).append(int(str(m.headers["x-sluice-attempt"])))
    for mid, attempts in copies.items():
        # a duplicate is a redelivery after a lost confirm: each copy comes from another attempt
        assert len(attempts) == len(set(attempts)), (
            f"message {mid} published twice in one attempt: {attempts}"
        )

    for m in got:
        h = m.headers
        assert m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert m.app_id == "sluice" and m.content_type == "application/json"
        assert str(h["x-sluice-message-id"]) == m.message_id
        assert h["x-sluice-channel"] == "adt"
        assert h["x-sluice-control-id"] == m.correlation_id == control_of[m.message_id]
        assert h["x-sluice-message-type"] == "ADT" and h["x-sluice-trigger"] in TRIGGERS
        assert isinstance(h["x-sluice-attempt"], int) and h["x-sluice-attempt"] >= 1
        assert (
            m.routing_key == f"hl7.ADT.{h['x-sluice-trigger']}" and m.type == f"ADT^{h['x-sluice-trigger']}"
        )
        env = orjson.loads(m.body)
        assert env["message_id"] == int(m.message_id) and env["control_id"] == m.correlation_id
        assert env["hl7"].startswith("MSH|") and f"|{m.correlation_id}|" in env["hl7"]
        assert env["payload"]["resourceType"] == "Bundle" and env["payload"]["type"] == "transaction"
        types = {e["resource"]["resourceType"] for e in env["payload"]["entry"]}
        assert {"Patient", "Encounter"} <= types

    print(
        f"\nrabbitmq e2e (mandatory={mandatory}): {N} sent over MLLP in {sent_done - t0:.1f}s; broker down for "
        f"{timings.get('up', 0) - timings.get('stop', 0):.1f}s (stop_app→start_app done); all delivered "
        f"{delivered_at - t0:.1f}s after the first send; {len(ids)} received, {len(set(ids))} distinct, "
        f"{duplicates} duplicate(s); {len(retried)} deliveries retried (max {max(retried)} attempts)"
    )
