"""Workers: claim → process → deliver → retry / dead-letter.

* :class:`ProcessingWorker` (one per channel) claims stored messages in order,
  runs the channel pipeline and records the result plus one delivery row per
  route in a single transaction.
* :class:`DeliveryWorker` (one per destination) delivers pending rows in lanes:
  rows with the same order key (the channel, plus the channel's ``order_by``
  value) go strictly in order; different keys run in parallel up to ``lanes``.
  ``on_failure: block`` (default): a failing row is retried with exponential
  backoff and jitter up to ``max_attempts`` while the later rows of its key wait
  (other keys go on), then dead-lettered with a reason and its key moves on.
  ``dead-letter``: a failing row is parked in the dead-letter queue at once and
  its key moves on.  Neither lets a late retry overwrite newer data silently.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from engine import logs, payloads, redact
from engine.config import DestinationConfig, RetryConfig
from engine.destinations.base import Destination, Outbound
from engine.errors import DeliveryError, SluiceError
from engine.intake import Committer, ProcessResult
from engine.metrics import UNAVAILABLE, ChannelMetrics, DestinationMetrics, Metrics, rejection_class
from engine.processing import ChannelRuntime
from engine.procpool import ProcessingPool
from engine.store import PROCESSED, Store

log = structlog.get_logger("sluice.workers")


def backoff_delay(
    retry: RetryConfig,
    attempts: int,
    retry_after: float | None = None,
    rnd: Callable[[], float] = random.random,
) -> float:
    """Seconds before the next try after ``attempts`` failed tries (exponential, capped, jittered)."""
    base = min(retry.max_backoff, retry.backoff * (2 ** max(0, attempts - 1)))
    jitter = 1.0 + retry.jitter * (2 * rnd() - 1)
    delay = base * jitter
    if retry_after is not None:
        delay = max(delay, retry_after)  # never sooner than the server asked
    return max(0.0, delay)


_WILL_RETRY = re.compile(r" \(will retry\)|[;,] will retry")


def dead_letter_reason(
    reason: str, attempts: int, *, block: bool, retryable: bool = True, message_id: int | None = None
) -> str:
    """The reason a dead letter keeps: the destination's error without its "will retry" (nothing retries a
    dead letter on its own) and what to do: fix the cause, then replay (unless the error already says)."""
    if not retryable:  # the receiver refused it (an AE/AR, an HTTP 4xx): its own words
        text, cause = reason, "fix the cause"
    else:
        text = _WILL_RETRY.sub("", reason)
        cause = "fix the cause (e.g. the target is up again)"
        if block:
            text = f"gave up after {attempts} attempts: {text}"
        else:
            text = f"parked at the first failure (on_failure: dead-letter): {text}"
    if "then replay" in text:  # (a path may hold the word: the phrase the destinations write)
        return text
    which = "<message id>" if message_id is None else str(message_id)
    return f"{text}; {cause}, then replay: sluice replay --id {which}"


class ProcessingWorker:
    """Runs one channel's pipeline over its stored messages."""

    def __init__(
        self,
        runtime: ChannelRuntime,
        store: Store,
        owner: str,
        wake_destinations: Callable[[], None],
        committer: Committer,
        batch: int = 200,
        pool: ProcessingPool | None = None,
        metrics: Metrics | None = None,
        batch_bytes: int = 0,
    ):
        self.pool = pool
        self.batch_bytes = batch_bytes  # a batch stops at this many stored body bytes (limits)
        self.metrics: ChannelMetrics | None = (
            metrics.channel(runtime.channel.name) if metrics is not None else None
        )
        self.runtime = runtime
        self.store = store
        self.committer = committer
        self.owner = owner
        self.batch = batch
        self.wake = asyncio.Event()
        self.wake_destinations = wake_destinations
        self.stopping = False
        self.processed = 0
        self.pace = 0.05  # seconds between partial batches (adds at most this to delivery latency)
        self.paused = False  # an operator paused the channel: messages are stored and ACKed, not processed

    async def run(self) -> None:
        if self.store.is_sqlite and self.pool is not None:
            await self._run_pipelined(self.pool)
            return
        while not self.stopping:
            if self.paused:
                await self._idle()
                continue
            try:
                n = await asyncio.to_thread(self._process_batch)
            except Exception as exc:  # store trouble: back off, never spin
                self._log_failure(exc)
                n = 0
                await asyncio.sleep(1.0)
            if n:
                self._progress(n)
                if n < self.batch:
                    # Let more arrive so one round covers many messages: the intake path keeps the
                    # engine's CPU; a full batch means we are behind: go straight on.
                    await asyncio.sleep(self.pace)
                continue
            await self._idle()

    async def _idle(self) -> None:
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout=0.5)
        await asyncio.sleep(self.pace / 5)  # a burst rarely comes alone

    def _progress(self, n: int) -> None:
        self.processed += n
        self.wake_destinations()

    def _log_failure(self, exc: Exception) -> None:
        log.error(
            "processing_batch_failed",
            channel=self.runtime.channel.name,
            error=type(exc).__name__,
            detail=str(exc)[:200],
        )

    async def _run_pipelined(self, pool: ProcessingPool) -> None:
        """One node (SQLite): keep every worker process busy with a batch of its own.

        The worker reads the bodies and converts; this process picks the ids (skipping those
        in flight) and records the results strictly in dispatch order, so a key's messages are
        recorded, and so delivered, in the order they arrived.  If recording fails, the batches
        behind it are dropped unrecorded (their messages stay 'received' and are read again):
        recording them first would let a later message of a key overtake an earlier one.
        """
        name = self.runtime.channel.name
        inflight: collections.deque[tuple[list[int], asyncio.Future[Any], int]] = collections.deque()
        busy: set[int] = set()
        while not self.stopping:
            try:
                # one converting, one queued, per worker (none while an operator has paused the channel)
                while not self.paused and len(inflight) < 2 * pool.workers:
                    sized = await asyncio.to_thread(
                        self.store.received_sizes, name, self.batch, busy, self.batch_bytes
                    )
                    if not sized:
                        break
                    ids = [i for i, _ in sized]
                    busy.update(ids)
                    size = sum(n for _, n in sized)
                    inflight.append((ids, asyncio.wrap_future(pool.read_and_run(name, ids)), size))
                    if len(ids) < self.batch:
                        break  # caught up: the next batch can wait for more to arrive
                if not inflight:
                    await self._idle()
                    continue
                ids, fut, size = inflight[0]
                prepared = await fut
                inflight.popleft()
                busy.difference_update(ids)
                n = await self._record(prepared, size) if prepared else 0
            except Exception as exc:
                self._log_failure(exc)
                for _, f, _ in inflight:
                    with contextlib.suppress(Exception):
                        await f
                inflight.clear()
                busy.clear()
                await asyncio.sleep(1.0)
                continue
            if n:
                self._progress(n)
            if not inflight and n < self.batch:
                await asyncio.sleep(self.pace)  # see run(): gather more per round while intake is busy

    def _process_batch(self) -> int:
        """Claim (PostgreSQL) or read (SQLite without workers) a batch, process it, record it."""
        ch = self.runtime.channel
        if self.store.is_sqlite:
            sized = self.store.received_sizes(ch.name, self.batch, max_bytes=self.batch_bytes)
            rows = self.store.received_by_id([i for i, _ in sized])
        else:
            rows = self.store.claim_received(ch.name, self.batch, self.owner, max_bytes=self.batch_bytes)
        # The pipeline runs outside any transaction (in worker processes when configured); the
        # results are then written in one short transaction by the committer.
        items = [(r.id, r.raw) for r in rows]
        if self.pool is not None:
            results = self.pool.run(ch.name, items)
        else:
            results = [self.runtime.run_raw(mid, raw) for mid, raw in items]
        prepared = list(zip(rows, results, strict=True))
        if not prepared:
            return 0
        size = sum(len(r.raw) for r in rows) + sum(
            len(r.output.payload) for r in results if r.output is not None
        )
        return self._count(self.committer.submit_op(self._writer(prepared), size).result())

    async def _record(self, prepared: list[tuple[Any, ProcessResult]], size: int) -> int:
        """``size``: the stored bytes of the messages (SQLite rewrites a row whole when its status
        changes) plus their payloads; the committer keeps large writes apart from small ones."""
        size += sum(len(r.output.payload) for _, r in prepared if r.output is not None)
        return self._count(await self.committer.run_op(self._writer(prepared), size))

    def _count(self, recorded: _Recorded) -> int:
        """Metrics for a batch the committer has written (only then are its statuses final)."""
        m = self.metrics
        if m is not None:
            for status, n in recorded.statuses.items():
                m.processed(status, n)
            if recorded.unmatched_patients:
                m.patient_match_failures.inc(recorded.unmatched_patients)
            for reason, n in recorded.writeback_skipped.items():
                m.writeback_skipped(reason, n)
            for kind, n in recorded.warnings.items():
                m.warned(kind, n)
        return recorded.n

    def _writer(self, prepared: list[tuple[Any, ProcessResult]]) -> Callable[[Any], _Recorded]:
        """The committer op that records a processed batch: statuses, ranks and delivery rows."""
        ch = self.runtime.channel

        def write(conn: Any) -> _Recorded:
            finished: list[tuple[int, str, str]] = []
            warned: list[tuple[int, str, str]] = []
            unmatched = 0
            deliveries: list[dict[str, Any]] = []
            view = self.store.rank_view(conn)
            skipped: collections.Counter[str] = collections.Counter()
            keys: list[str] = []  # every key the round will look at: fetched in one go
            for _, pre in prepared:
                if pre.output is not None:
                    f = pre.output.facts
                    keys += (
                        [k for k, _ in f.get("guards", ())]
                        + list(f.get("keys", ()))
                        + list(f.get("requires", ()))
                    )
            view.get(keys)
            for r, pre in prepared:
                only = r.replay_destinations.split(",") if r.replay_destinations else None
                result = self.runtime.record(conn, pre, only, bool(r.override_guards), view)
                if result.status == PROCESSED:
                    deliveries.extend(self.store.delivery_rows(r.id, ch.name, r.order_key, result.deliveries))
                if result.ranks:
                    view.set(r.id, result.ranks)
                finished.append((r.id, result.status, result.reason))
                unmatched += result.missing == "Patient"
                if result.writeback_skipped:
                    skipped[result.writeback_skipped] += 1
                warned.extend((r.id, kind, text) for kind, text in result.warnings)
            view.flush()
            self.store.insert_deliveries(conn, deliveries)
            self.store.insert_warnings(conn, warned)
            self.store.finish_messages(conn, finished)
            return _Recorded(
                len(prepared),
                collections.Counter(s for _, s, _ in finished),
                unmatched,
                dict(skipped),
                collections.Counter(kind for _, kind, _ in warned),
            )

        return write


@dataclass
class _Recorded:
    """What a processing batch recorded: the committer op's result, counted once it is written."""

    n: int
    statuses: dict[str, int]
    unmatched_patients: int  # messages referring to a Patient the engine has never received
    writeback_skipped: dict[str, int] = field(default_factory=dict)  # write-back: nothing sent, by reason
    warnings: dict[str, int] = field(default_factory=dict)  # conversion warnings recorded, by kind


# (delivery row, the exception or None when delivered, dead-lettered?, when the destination answered)
_Tally = list[tuple[Any, BaseException | None, bool, float]]


@dataclass
class _Lane:
    rows: list[Any] = field(default_factory=list)


class DeliveryWorker:
    """Delivers one destination's queue."""

    def __init__(
        self,
        config: DestinationConfig,
        destination: Destination,
        store: Store,
        committer: Committer,
        batch: int = 500,
        owner: str = "",
        metrics: Metrics | None = None,
        batch_bytes: int = 0,
    ):
        self.owner = owner
        self.batch_bytes = batch_bytes  # a round stops at this many stored payload bytes (limits)
        self.metrics = metrics
        self._m: DestinationMetrics | None = metrics.destination(config.name) if metrics is not None else None
        self.committer = committer
        self.config = config
        self.destination = destination
        self.store = store
        self.batch = batch
        self.wake = asyncio.Event()
        self.stopping = False
        self.delivered = 0
        self.failed = 0
        self.dead = 0
        self.consecutive_failures = 0  # failed attempts since the last delivery (engine/alerts/)
        self._sem = asyncio.Semaphore(max(1, config.lanes))
        self.paused = False  # an operator paused the destination: its deliveries wait in the queue
        # Multi-request deliveries keep their progress in the store (Destination.keeps_progress); the
        # others never read or write it.
        self.keeps_progress = bool(getattr(destination, "keeps_progress", False))
        self._with_progress: set[int] = set()  # delivery ids with saved progress (forgotten when finished)
        if self.keeps_progress:
            destination.progress_sink = self._save_progress

    async def run(self) -> None:
        while not self.stopping:
            try:
                progressed, next_due = (False, None) if self.paused else await self._round()
            except Exception as exc:
                log.error(
                    "delivery_round_failed",
                    destination=self.config.name,
                    error=type(exc).__name__,
                    detail=str(exc)[:200],
                )
                progressed, next_due = False, time.time() + 1.0
            if progressed:
                await asyncio.sleep(0.02)  # gather more per round: fewer writes, same order
                continue
            self.wake.clear()
            wait = 0.5 if next_due is None else min(0.5, max(0.0, next_due - time.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=max(0.01, wait))

    async def _round(self) -> tuple[bool, float | None]:
        rows = await asyncio.to_thread(self.store.pending_deliveries, self.config.name, self.batch)
        if not rows:
            return False, None
        now = time.time()
        block = self.config.on_failure == "block"
        lanes: dict[str, _Lane] = {}
        blocked: set[str] = set()
        next_due: float | None = None
        taken = 0  # stored payload bytes this round will load
        for r in rows:
            key = r.order_key
            if key in blocked:
                continue
            if r.lease_until > now and r.lease_owner != self.owner:
                blocked.add(key)  # another node is delivering this key right now: keep its order
                continue
            if r.next_attempt_at > now:
                next_due = r.next_attempt_at if next_due is None else min(next_due, r.next_attempt_at)
                if block:
                    blocked.add(key)
                continue
            if lanes and self.batch_bytes and taken + r.size > self.batch_bytes:
                break  # the rest waits for the next round (which starts at once): memory stays bounded
            taken += r.size
            lanes.setdefault(key, _Lane()).rows.append(r)
        if not lanes:
            return False, next_due
        ids = [r.id for lane in lanes.values() for r in lane.rows]
        leased = await asyncio.to_thread(self.store.lease_deliveries, ids, self.owner)
        if len(leased) != len(ids):
            # Lost a race with another node: keep each lane's prefix this node holds.
            for key, lane in list(lanes.items()):
                kept: list[Any] = []
                for r in lane.rows:
                    if r.id not in leased:
                        break
                    kept.append(r)
                if kept:
                    lane.rows = kept
                else:
                    del lanes[key]
            ids = [r.id for lane in lanes.values() for r in lane.rows]
        loaded = await asyncio.to_thread(self._load, ids)
        if getattr(self.destination, "batch_across_keys", False) and len(lanes) > 1:
            # The destination takes a whole batch in one call, in order, stopping at its first failure
            # (the file destination: one thread hop, one sync). One lane in arrival order keeps every
            # key's order, and a failure holds everything after it until the next round.
            merged = sorted((r for lane in lanes.values() for r in lane.rows), key=lambda r: r.id)
            lanes = {"": _Lane(merged)}
        delivered: list[tuple[int, str]] = []
        failed: list[tuple[int, int, str, float | None]] = []
        tally: _Tally = []
        await asyncio.gather(
            *(self._lane(lane, loaded, delivered, failed, block, tally) for lane in lanes.values())
        )
        finished: list[int] = []
        if self._with_progress:
            done = [d for d, _ in delivered] + [f[0] for f in failed if f[3] is None]
            finished = [d for d in done if d in self._with_progress]
            self._with_progress.difference_update(finished)

        def record(conn: Any) -> None:
            self.store.record_deliveries(delivered, failed, conn)
            if finished:
                self.store.forget_progress(conn, finished)

        await self.committer.run_op(record)
        self.delivered += len(delivered)
        if self._m is not None and tally:
            self._count(self._m, tally)  # after the outcomes are written: each counted once
        return bool(delivered or failed), next_due

    def _count(self, dm: DestinationMetrics, tally: _Tally) -> None:
        assert self.metrics is not None
        answered = unavailable = False
        for row, exc, dead, at in tally:
            if exc is None:
                dm.outcomes["delivered"].inc()
                dm.lag.observe(max(0.0, at - row.received_at))
                answered = True
                continue
            klass = rejection_class(exc)
            cm = self.metrics.channel(row.channel)
            cm.rejection(klass)
            if klass in UNAVAILABLE:
                unavailable = True
            else:
                answered = True  # it refused this message: it is up
            if dead:
                dm.outcomes["dead"].inc()
                dm.dead_letters.inc()
                if getattr(exc, "match_failure", None) == "Patient":
                    cm.patient_match_failures.inc()  # a conditional write matched several Patients
            else:
                dm.outcomes["retry"].inc()
        dm.up.set(0 if unavailable and not answered else 1)

    def _load(self, ids: list[int]) -> dict[int, tuple[Any, Outbound]]:
        """Rows and their outbound items (payloads unpacked here, off the event loop)."""
        if not self.keeps_progress:
            return {r.id: (r, self._item(r)) for r in self.store.load_deliveries(ids)}
        saved = self.store.load_progress(ids)
        self._with_progress.update(saved)
        return {
            r.id: (r, self._item(r, orjson.loads(saved[r.id]) if r.id in saved else None))
            for r in self.store.load_deliveries(ids)
        }

    async def _save_progress(self, item: Outbound, state: Mapping[str, Any]) -> None:
        """The destination's progress sink: durable (committed) before the destination sends more.  A
        failure to save is logged, not raised: the delivery goes on, a retry then resends more (the writes
        of such destinations are idempotent)."""
        if not item.delivery_id:
            return
        text = orjson.dumps(state).decode()
        try:
            await self.committer.run_op(lambda conn: self.store.save_progress(conn, item.delivery_id, text))
        except Exception as exc:
            log.warning(
                "delivery_progress_not_saved",
                destination=self.config.name,
                message_id=item.message_id,
                error=type(exc).__name__,
            )
            return
        self._with_progress.add(item.delivery_id)

    @staticmethod
    def _item(row: Any, progress: Mapping[str, Any] | None = None) -> Outbound:
        return Outbound(
            message_id=row.message_id,
            channel=row.channel,
            destination=row.destination,
            control_id=row.control_id,
            message_type=row.message_type,
            trigger=row.trigger,
            raw=row.raw or b"",
            payload=payloads.unpack(row.payload),
            content_type=row.content_type,
            attempt=row.attempts + 1,
            meta=orjson.loads(row.meta or "{}"),
            delivery_id=row.id,
            progress=progress,
        )

    async def _lane(
        self,
        lane: _Lane,
        loaded: dict[int, tuple[Any, Outbound]],
        delivered: list[tuple[int, str]],
        failed: list[tuple[int, int, str, float | None]],
        block: bool,
        tally: _Tally,
    ) -> None:
        async with self._sem:
            work: list[tuple[Any, Any, Outbound]] = []
            for r in lane.rows:
                got = loaded.get(r.id)
                if got is None:
                    continue
                work.append((r, *got))
            # A destination that can take several items at once (one thread hop, one directory
            # sync...) gets the lane's run; it stops at its first failure and leaves the rest.
            many = getattr(self.destination, "deliver_many", None)
            results: list[Any] | None = None
            if many is not None and len(work) > 1:
                results = await many([it for _, _, it in work])
            for idx, (r, row, item) in enumerate(work):
                try:
                    if results is None:
                        detail = await self.destination.deliver(item)
                    else:
                        res = results[idx]
                        if res is None:
                            return  # not attempted: stays pending for the next round, in order
                        if isinstance(res, BaseException):
                            raise res
                        detail = res
                except Exception as exc:
                    attempts = row.attempts + 1
                    retryable = exc.retryable if isinstance(exc, DeliveryError) else False
                    retry_after = exc.retry_after if isinstance(exc, DeliveryError) else None
                    reason = str(exc) if isinstance(exc, SluiceError) else f"{type(exc).__name__}: {exc}"
                    if block and retryable and attempts < self.config.retry.max_attempts:
                        next_at = time.time() + backoff_delay(self.config.retry, attempts, retry_after)
                        failed.append((r.id, attempts, reason, next_at))
                        self.failed += 1
                        self.consecutive_failures += 1
                        log.warning(
                            "delivery_retry",
                            destination=self.config.name,
                            message_id=row.message_id,
                            control_id=redact.control_id(row.control_id),
                            attempt=attempts,
                            retry_in=round(next_at - time.time(), 2),
                            error=type(exc).__name__,
                        )
                    else:
                        why = dead_letter_reason(
                            reason, attempts, block=block, retryable=retryable, message_id=row.message_id
                        )
                        failed.append((r.id, attempts, why, None))
                        self.dead += 1
                        self.consecutive_failures += 1
                        log.error(
                            "delivery_dead_lettered",
                            destination=self.config.name,
                            message_id=row.message_id,
                            control_id=redact.control_id(row.control_id),
                            attempts=attempts,
                            error=type(exc).__name__,
                        )
                    tally.append((row, exc, failed[-1][3] is None, 0.0))
                    if block and failed[-1][3] is not None:
                        return  # hold the rest of this key while the failing one waits for its retry
                    continue  # dead-lettered: the key moves on (replaying it later is an operator's call)
                delivered.append((r.id, detail or ""))
                tally.append((row, None, False, time.time()))
                self.consecutive_failures = 0
                if logs.DEBUG:  # (no fields built per message for a line nobody writes)
                    log.debug(
                        "delivered",
                        destination=self.config.name,
                        message_id=row.message_id,
                        control_id=redact.control_id(row.control_id),
                    )
