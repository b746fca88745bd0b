"""Delivery progress (issue 13): a destination with ``keeps_progress`` saves how far a multi-request delivery
got; the delivery worker stores it through the committer, hands it back on the next attempt (also from a new
worker and destination on the same store, as after an engine restart) and forgets it once the delivery is
finished.  Destinations without ``keeps_progress`` never read or write it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from engine import store as st
from engine.config import DestinationConfig, RetryConfig
from engine.destinations.base import Destination, DestinationContext, Outbound
from engine.errors import DeliveryError, PermanentDeliveryError
from engine.intake import Committer
from engine.workers import DeliveryWorker

CTX = DestinationContext(base_dir=Path("."))
CONFIG = DestinationConfig(
    name="steps", kind="steps", options={}, retry=RetryConfig(max_attempts=5, backoff=0.0, jitter=0.0)
)


class Steps(Destination):
    """A delivery of ``STEPS`` requests, resumed from the saved ``next``; fails once at ``fail_at``."""

    kind = "steps"
    keeps_progress = True
    STEPS: ClassVar[int] = 4

    def __init__(self, fail_at: int | None = None, permanent: bool = False) -> None:
        super().__init__("steps", {}, CTX)
        self.fail_at = fail_at
        self.permanent = permanent
        self.sent: list[int] = []
        self.seen: list[Any] = []

    async def deliver(self, item: Outbound) -> str:
        self.seen.append(item.progress)
        start = int((item.progress or {}).get("next", 0))
        for step in range(start, self.STEPS):
            if step == self.fail_at:
                self.fail_at = None
                if self.permanent:
                    raise PermanentDeliveryError(f"step {step} refused")
                raise DeliveryError(f"step {step} failed")
            self.sent.append(step)
            await self.save_progress(item, {"next": step + 1})
        return f"steps {start}..{self.STEPS - 1}"


class Plain(Destination):
    kind = "plain"

    def __init__(self) -> None:
        super().__init__("plain", {}, CTX)
        self.items: list[Outbound] = []

    async def deliver(self, item: Outbound) -> str:
        self.items.append(item)
        return "ok"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[st.Store]:
    s = st.Store(f"sqlite:///{tmp_path / 'sluice.db'}")
    try:
        yield s
    finally:
        s.close()


def queue_one(store: st.Store, destination: str) -> int:
    with store.write() as conn:
        (mid,) = store.insert_messages(
            conn, [st.NewMessage(channel="c", received_at=time.time(), peer="t", raw=b"MSH|^~\\&|\r")]
        )
        store.add_deliveries(conn, mid, "c", "k", [st.NewDelivery(destination, b"{}", "application/json")])
    (row,) = store.deliveries_of(mid)
    return int(row.id)


def saved(store: st.Store) -> dict[int, str]:
    with store.engine.connect() as conn:
        return {
            int(d): s for d, s in conn.exec_driver_sql("SELECT delivery_id, state FROM delivery_progress")
        }


def status(store: st.Store, did: int) -> str:
    with store.engine.connect() as conn:
        return str(conn.exec_driver_sql(f"SELECT status FROM deliveries WHERE id = {did}").scalar())


def run_round(store: st.Store, dest: Destination, config: DestinationConfig = CONFIG) -> None:
    async def go() -> None:
        committer = Committer(store)
        committer.start()
        try:
            worker = DeliveryWorker(config, dest, store, committer)
            await worker._round()
        finally:
            committer.stop()

    asyncio.run(go())


def test_progress_survives_a_new_worker_and_is_forgotten_when_delivered(store: st.Store) -> None:
    did = queue_one(store, "steps")
    first = Steps(fail_at=2)
    run_round(store, first)
    assert first.sent == [0, 1] and first.seen == [None]
    assert status(store, did) == st.PENDING
    assert saved(store) == {did: '{"next":2}'}  # durable: committed before the failing request
    second = Steps()  # a new process: nothing in memory
    run_round(store, second)
    assert second.seen == [{"next": 2}]
    assert second.sent == [2, 3]  # resumed at the failed request
    assert status(store, did) == st.DELIVERED
    assert saved(store) == {}


def test_progress_is_forgotten_when_dead_lettered(store: st.Store) -> None:
    did = queue_one(store, "steps")
    dest = Steps(fail_at=1, permanent=True)
    run_round(store, dest)
    assert dest.sent == [0]
    assert status(store, did) == st.DEAD
    assert saved(store) == {}  # a replay makes a new delivery row and starts over


def test_destinations_without_keeps_progress_never_touch_it(store: st.Store, monkeypatch: Any) -> None:
    queue_one(store, "plain")

    def refuse(*_: Any) -> Any:
        raise AssertionError("progress read or written for a destination without keeps_progress")

    monkeypatch.setattr(store, "load_progress", refuse)
    monkeypatch.setattr(store, "save_progress", refuse)
    monkeypatch.setattr(store, "forget_progress", refuse)
    dest = Plain()
    run_round(store, dest, DestinationConfig(name="plain", kind="plain", options={}))
    (item,) = dest.items
    assert item.progress is None and item.delivery_id > 0
    assert dest.progress_sink is None


def test_prune_drops_the_progress_of_pruned_deliveries(store: st.Store) -> None:
    did = queue_one(store, "steps")
    run_round(store, Steps(fail_at=3))
    assert did in saved(store)
    with store.write() as conn:  # an operator replayed it: the row is superseded, its progress orphaned
        conn.exec_driver_sql(f"UPDATE deliveries SET status = '{st.SUPERSEDED}' WHERE id = {did}")
        conn.exec_driver_sql(f"UPDATE messages SET status = '{st.PROCESSED}'")
    store.prune("c", bodies_before=None, rows_before=time.time() + 1)
    assert saved(store) == {}
