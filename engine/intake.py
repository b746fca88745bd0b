"""Intake: one received frame → checks → durable write → the ACK(s) to send.

This is the one boundary where errors become ACK codes: every check raises an
``engine.errors`` exception carrying ``ack_code``/``hl7_error``; :meth:`Intake.decide`
turns that into a row status and an ACK.  Writes go through the group
:class:`Committer`, which commits the rows of every connection waiting at that
moment in one transaction (one fsync), and only then are the ACKs released.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from engine import ack as ackmod
from engine import hl7, logs, redact
from engine.admin.search import patient_hash
from engine.config import ChannelConfig
from engine.errors import Location, MessageContentError, MessageRejected, SluiceError, StoreError
from engine.metrics import ChannelMetrics, Metrics
from engine.store import (
    IGNORED,
    PROCESSED,
    QUARANTINED,
    RECEIVED,
    REJECTED,
    NewDelivery,
    NewMessage,
    Store,
)

log = structlog.get_logger("sluice.intake")


@dataclass
class ProcessResult:
    """What processing decided for one message (used inline for ``ack: after-processing``)."""

    status: str
    reason: str = ""
    error: SluiceError | None = None
    deliveries: list[NewDelivery] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)
    output: Output | None = None  # the pipeline's output, between ``run`` and ``record``
    missing: str = ""  # resource type of a required earlier record never received (e.g. Patient)
    writeback_skipped: str = ""  # a write-back channel sent nothing: why (engine/writeback.py)
    # (kind, text) located, PHI-free conversion warnings, stored with the message (engine.store.WarningRow)
    warnings: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Output:
    """What a channel's steps produced for one message (plain data: crosses process boundaries)."""

    payload: bytes
    content_type: str
    meta: dict[str, str]
    facts: dict[str, Any]
    routes: list[str]  # destinations whose route filter accepted the message
    packed: bool = False  # payload already in its stored form (engine.payloads.pack, done in the worker)


class Processor(Protocol):
    """A channel's processing, split so the pipeline runs outside the store transaction."""

    def run(self, message_id: int, msg: hl7.Message, raw: bytes) -> ProcessResult: ...

    def record(self, conn: Any, prepared: ProcessResult, only: list[str] | None = None) -> ProcessResult: ...


@dataclass
class Job:
    """One message waiting for the group commit."""

    channel: ChannelConfig
    row: NewMessage
    message: hl7.Message | None
    outcome: ackmod.Outcome
    dedupe: bool = False
    process: Processor | None = None  # set for ack: after-processing
    prepared: ProcessResult | None = None
    # filled by the committer
    message_id: int = 0
    duplicate_of: int = 0
    replay_ack: bytes | None = None
    final_outcome: ackmod.Outcome | None = None
    error: Exception | None = None
    result: ProcessResult | None = None  # what inline processing (ack: after-processing) recorded


Op = Callable[[Any], Any]


class Committer:
    """The single writer: one thread commits everything waiting at that moment in one transaction.

    Intake jobs (new messages) and write operations from the workers (processing results,
    delivery outcomes) share the thread, so SQLite never has two writers fighting over its lock
    and a burst from many connections costs one fsync, not one per message.  If a batch fails,
    its parts are retried on their own, so one bad operation cannot fail unrelated messages.
    """

    def __init__(self, store: Store, *, max_batch: int = 1000, max_batch_bytes: int = 8 * 1024 * 1024):
        self.store = store
        self.max_batch = max_batch
        # Message bodies per transaction: past it, large messages wait for the next transaction, so a
        # small message is never written (and fsynced) behind a group of 15 MB ones.
        self.max_batch_bytes = max_batch_bytes
        self._large_turn = True  # may the next transaction take large items while small ones wait?
        self._q: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.backlog = 0
        self.batches = 0
        self.committed = 0
        self._conn: Any = None  # the writer thread's own connection

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sluice-committer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    async def submit(self, job: Job) -> Job:
        """Commit one intake job; resolves after the durable write (or with ``job.error`` set)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Job] = loop.create_future()
        self.backlog += 1
        self._q.put((job, fut))
        try:
            return await fut
        finally:
            self.backlog -= 1

    def submit_op(self, op: Op, size: int = 0, *, durable: bool = False) -> concurrent.futures.Future[Any]:
        """Run ``op(conn)`` inside the next write transaction (thread-safe; for worker threads).

        ``durable``: the transaction is fsynced like an intake commit (a source storing new messages
        answers its sender after it); other operations are safe to redo and commit relaxed."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if durable:
            self._q.put((_DurableOp(op, size), fut))
        else:
            self._q.put((_SizedOp(op, size) if size > LARGE_WRITE else op, fut))
        return fut

    async def run_op(self, op: Op, size: int = 0, *, durable: bool = False) -> Any:
        """``size``: bytes the operation writes, when large (a processed batch's payloads)."""
        return await asyncio.wrap_future(self.submit_op(op, size, durable=durable))

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None

    def _loop(self) -> None:
        pending: list[tuple[Any, Any]] = []  # taken from the queue, not yet committed
        stop = False
        while True:
            if not pending:
                if stop:
                    return
                first = self._q.get()
                if first is None:
                    return
                pending.append(first)
            while not stop:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True  # commit what is pending first
                else:
                    pending.append(nxt)
            batch, pending = self._take(pending)
            jobs = [(j, f) for j, f in batch if isinstance(j, Job)]
            ops = [(o, f) for o, f in batch if not isinstance(o, Job)]
            try:
                self._commit(jobs, ops)
            except Exception as exc:
                # The single writer must never die: every later message on every channel would wait
                # for an ACK forever.  Fail this batch (AR 207, nothing kept) and carry on.
                log.error("committer_failed", error=type(exc).__name__, batch=len(batch))
                self._fail(jobs, ops, exc)

    def _take(self, pending: list[tuple[Any, Any]]) -> tuple[list[tuple[Any, Any]], list[tuple[Any, Any]]]:
        """This transaction's share of what is waiting, and the rest.

        Everything, in order, up to ``max_batch`` items, except large items (messages or operations
        writing over ``LARGE_WRITE``): when small ones are waiting, large ones go only in every
        other transaction, and at most ``max_batch_bytes`` of them together.  So a small message waits
        for at most one large write besides its own, and a stream of small ones cannot starve the
        large.  An item held back holds back everything after it from the same connection (its order
        is kept).
        """
        if len(pending) == 1:
            self._large_turn = _size(pending[0][0]) <= LARGE_WRITE
            return pending, []
        any_small = any(_size(item[0]) <= LARGE_WRITE for item in pending)
        allow_large = self._large_turn or not any_small
        batch: list[tuple[Any, Any]] = []
        rest: list[tuple[Any, Any]] = []
        large = 0
        held: set[str] = set()
        for item in pending:
            job = item[0]
            n = _size(job)
            peer = job.row.peer if isinstance(job, Job) else None
            if len(batch) >= self.max_batch or (peer is not None and peer in held):
                rest.append(item)
            elif n > LARGE_WRITE and not (allow_large and (not large or large + n <= self.max_batch_bytes)):
                rest.append(item)
                if peer is not None:
                    held.add(peer)
            else:
                if n > LARGE_WRITE:
                    large += n
                batch.append(item)
        self._large_turn = not large  # after a large write, small ones get the next transaction alone
        return batch, rest

    @staticmethod
    def _fail(
        batch: list[tuple[Job, asyncio.Future[Job]]], ops: list[tuple[Op, Any]], exc: Exception
    ) -> None:
        for _, fut in ops:
            if not fut.done():
                fut.set_exception(exc)
        for j, afut in batch:
            j.error = exc
            j.message_id = 0
            afut.get_loop().call_soon_threadsafe(_resolve, afut, j)

    def _commit(self, batch: list[tuple[Job, asyncio.Future[Job]]], ops: list[tuple[Op, Any]]) -> None:
        jobs = [j for j, _ in batch]
        for j in jobs:  # the pipeline runs before the transaction, never holding the write lock
            if j.process is not None and j.row.status == RECEIVED and j.message is not None:
                try:
                    j.prepared = j.process.run(0, j.message, j.row.raw)
                except Exception as exc:  # a bug outside the pipeline's own error handling
                    log.error("processing_run_failed", channel=j.channel.name, error=type(exc).__name__)
                    j.error = exc
        failed = [(j, f) for j, f in batch if j.error is not None]
        if failed:  # AR 207 for these alone; the others are still written
            self._fail(failed, [], failed[0][0].error or RuntimeError("processing failed"))
            batch = [(j, f) for j, f in batch if j.error is None]
            jobs = [j for j, _ in batch]
        results: list[Any] = []
        try:
            with self._transaction(durable=bool(jobs) or any(type(o) is _DurableOp for o, _ in ops)) as conn:
                if jobs:
                    self._write_jobs(conn, jobs)
                results = [op(conn) for op, _ in ops]
            self.batches += 1
            self.committed += len(jobs)
        except Exception as exc:
            if ops and jobs:
                # Retry the parts alone so one failing operation cannot fail unrelated messages.
                for j in jobs:
                    j.error, j.message_id, j.duplicate_of = None, 0, 0
                self._commit(batch, [])
                for op_fut in ops:
                    self._commit([], [op_fut])
                return
            if ops and len(ops) > 1:
                for op_fut in ops:
                    self._commit([], [op_fut])
                return
            if len(batch) > 1:
                # One message the store refuses must not fail the others in its group commit.
                for j in jobs:
                    j.error, j.message_id, j.duplicate_of = None, 0, 0
                for job_fut in batch:
                    self._commit([job_fut], [])
                return
            log.error("store_write_failed", error=type(exc).__name__, batch=len(jobs) + len(ops))
            for j in jobs:  # the durable write failed: AR 207 for all, nothing half-written
                j.error = exc
                j.message_id = 0
            for _, fut in ops:
                fut.set_exception(exc)
            ops = []
        for (_, fut), res in zip(ops, results, strict=False):
            fut.set_result(res)
        _resolve_all(batch)

    @contextlib.contextmanager
    def _transaction(self, *, durable: bool) -> Iterator[Any]:
        """A write transaction on the committer's own long-lived connection (no pool round trip)."""
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            self._conn = self.store.engine.connect()
        try:
            with self.store.writer_transaction(self._conn, durable=durable) as conn:
                yield conn
        except Exception:
            # A broken connection is replaced on the next batch; the error still fails this one.
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
            raise

    def _write_jobs(self, conn: Any, jobs: list[Job]) -> None:
        self._dedupe(conn, jobs)
        fresh = [j for j in jobs if not j.duplicate_of]
        if fresh:
            ids = self.store.insert_messages(conn, [j.row for j in fresh])
            for j, mid in zip(fresh, ids, strict=True):
                j.message_id = mid
                if j.process is not None and j.row.status == RECEIVED:
                    self._process_inline(conn, j)
        dup_counts: dict[str, int] = {}
        for j in jobs:
            if j.duplicate_of:
                dup_counts[j.channel.name] = dup_counts.get(j.channel.name, 0) + 1
        for ch, n in dup_counts.items():
            self.store.bump(conn, ch, "duplicates_prevented", n)

    def _dedupe(self, conn: Any, jobs: list[Job]) -> None:
        by_channel: dict[str, list[Job]] = {}
        for j in jobs:
            if j.dedupe and j.row.dedupe_key:
                by_channel.setdefault(j.channel.name, []).append(j)
        for name, cj in by_channel.items():
            window = cj[0].channel.dedupe.window_days * 86400.0
            found = self.store.find_duplicates(
                conn,
                name,
                [j.row.dedupe_key for j in cj],
                time.time() - window,
                [j.row.control_id for j in cj],
            )
            seen: dict[str, Job] = {}
            for j in cj:
                key = j.row.dedupe_key
                prior = found.get(key)
                earlier = seen.get(key)
                if prior is not None:
                    same = prior.content_hash == j.row.content_hash
                    prior_ack = prior.ack
                elif earlier is not None:
                    same = earlier.row.content_hash == j.row.content_hash
                    prior_ack = earlier.row.ack
                else:
                    seen[key] = j
                    continue
                if same:
                    j.duplicate_of = prior.message_id if prior is not None else -1
                    j.replay_ack = prior_ack
                elif j.channel.dedupe.on_conflict == "reject":
                    err = MessageContentError(
                        "a message with this sending application/facility and control id (MSH-10) was already "
                        "received with different content",
                        code="205",
                        location=Location("MSH", 1, 10),
                    )
                    j.row.status = QUARANTINED
                    j.row.reason = str(err)
                    j.final_outcome = ackmod.Outcome("AE", err)
                    j.row.ack, j.row.ack_code = render_ack(j.message, j.final_outcome)

    def _process_inline(self, conn: Any, j: Job) -> None:
        assert j.process is not None and j.message is not None
        assert j.prepared is not None
        result = j.process.record(conn, j.prepared)
        from sqlalchemy import update

        from engine.store import M

        if result.status == PROCESSED:
            self.store.add_deliveries(conn, j.message_id, j.channel.name, j.row.order_key, result.deliveries)
            self.store.set_resource_ranks(conn, j.message_id, result.ranks)
        if result.warnings:
            self.store.insert_warnings(conn, [(j.message_id, k, t) for k, t in result.warnings])
        outcome = (
            ackmod.ACCEPTED if result.error is None else ackmod.Outcome(result.error.ack_code, result.error)
        )
        ack_bytes, code = render_ack(j.message, outcome)
        conn.execute(
            update(M)
            .where(M.c.id == j.message_id)
            .values(
                status=result.status,
                reason=result.reason[:4000],
                processed_at=time.time(),
                ack=ack_bytes,
                ack_code=code,
            )
        )
        j.final_outcome = outcome
        j.row.ack = ack_bytes
        j.result = result


class _SizedOp:
    """A committer operation that writes many bytes (the committer keeps those apart from small ones)."""

    __slots__ = ("op", "size")

    def __init__(self, op: Op, size: int):
        self.op, self.size = op, size

    def __call__(self, conn: Any) -> Any:
        return self.op(conn)


class _DurableOp(_SizedOp):
    """A committer operation whose transaction is fsynced (new messages from a source other than MLLP)."""

    __slots__ = ()


def _size(item: Any) -> int:
    if isinstance(item, Job):
        return len(item.row.raw)
    return item.size if isinstance(item, _SizedOp) else 0


def _resolve_all(batch: list[tuple[Job, asyncio.Future[Job]]]) -> None:
    """Hand a whole group commit back to its event loop(s) with one wake-up each."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, asyncio.Future[Job]]]] = {}
    for j, fut in batch:
        by_loop.setdefault(fut.get_loop(), []).append((j, fut))
    for loop, items in by_loop.items():
        loop.call_soon_threadsafe(_resolve_many, items)


def _resolve_many(items: list[tuple[Job, asyncio.Future[Job]]]) -> None:
    for j, fut in items:
        _resolve(fut, j)


def _resolve(fut: asyncio.Future[Job], job: Job) -> None:
    if not fut.done():
        fut.set_result(job)


def render_ack(
    message: hl7.Message | None, outcome: ackmod.Outcome, inbound_control_id: str = ""
) -> tuple[bytes | None, str]:
    """The ACK bytes to send for an outcome (None when the sender asked for none) and their MSA-1 codes."""
    codes = ackmod.plan(message, outcome)
    if not codes:
        return None, ""
    if len(codes) == 1:
        text = ackmod.build(message, codes[0], outcome.error, inbound_control_id=inbound_control_id)
        if _UNFRAMABLE_CHAR.search(text):
            text = text.translate(_UNFRAMABLE)
        return text.encode(_codec(message), "replace"), codes[0]
    texts = [ackmod.build(message, c, outcome.error, inbound_control_id=inbound_control_id) for c in codes]
    # Several ACKs (commit + application) are stored NUL-joined and framed separately; a NUL (or an
    # MLLP framing byte) copied from the inbound message would split or cut an ACK, so drop them.
    # (str.translate looks up every character: searched first, an ACK without them is used as it is)
    joined = "\x00".join(t.translate(_UNFRAMABLE) if _UNFRAMABLE_CHAR.search(t) else t for t in texts)
    return joined.encode(_codec(message), "replace"), "/".join(codes)


_UNFRAMABLE = {0x00: None, 0x0B: None, 0x1C: None}
_UNFRAMABLE_CHAR = re.compile("[\x00\x0b\x1c]")
_CONTROL_CHAR = re.compile("[\x00-\x1f\x7f]")
_BLANK = re.compile(rb"[ \t\r\n\x00]*")
OFFLOAD_BYTES = 256 * 1024  # frames this large are checked in a thread: the event loop keeps serving others
_LARGE_DECIDES: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}


def _large_decides() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    sem = _LARGE_DECIDES.get(loop)
    if sem is None:
        sem = _LARGE_DECIDES[loop] = asyncio.Semaphore(1)
    return sem


LARGE_WRITE = 1024 * 1024  # a message or operation writing more is kept apart from small ones (Committer)


def _codec(message: hl7.Message | None) -> str:
    if message is None:
        return "ascii"
    fields = message.msh.fields
    raw = fields[18] if len(fields) > 18 else ""
    if not raw:
        return "latin-1"
    key = (message.delimiters, raw)
    codec = _CODECS.get(key)
    if codec is None:
        cs = message.msh.get(18).strip().upper()
        codec = hl7.CHARSETS.get(cs, "latin-1") if cs else "latin-1"
        if len(_CODECS) < 64:
            _CODECS[key] = codec
    return codec


# the ACK codec per (delimiters, raw MSH-18) seen: a feed declares one or two; bounded against junk
_CODECS: dict[tuple[hl7.Delimiters, str], str] = {}


def split_acks(data: bytes | None) -> list[bytes]:
    if not data:
        return []
    return data.split(b"\x00")


class Intake:
    """Checks one channel's frames and decides their rows and ACKs."""

    def __init__(
        self,
        channel: ChannelConfig,
        committer: Committer,
        process: Processor | None = None,
        *,
        patient_key: bytes | None = None,
        metrics: Metrics | None = None,
    ):
        self.channel = channel
        # Key of the patient-search hash (engine/admin/search.py); None stores no patient column.
        self.patient_key = patient_key
        self._metrics: ChannelMetrics | None = metrics.channel(channel.name) if metrics is not None else None
        self.committer = committer
        self.process = process if channel.ack == "after-processing" else None
        self.on_stored: Callable[[], None] | None = None  # wakes the processing worker
        self._types = {t: set(tr) for t, tr in channel.types.items()}
        self._versions = set(channel.versions)
        self._pids = set(channel.processing_ids)

    # -- pure part --------------------------------------------------------
    def check(self, msg: hl7.Message) -> None:
        """Header and required-field checks; raises the error that decides the ACK."""
        if not msg.control_id:
            raise MessageRejected(
                "MSH-10 message control id is missing", code="101", location=Location("MSH", 1, 10)
            )
        mtype, trig = msg.message_type, msg.trigger
        if not mtype:
            raise MessageRejected("MSH-9 message type is missing", code="101", location=Location("MSH", 1, 9))
        # Reasons quote a header value only when it is a known code (engine.redact): they are stored,
        # logged and sent back in the ACK's ERR segment.
        if mtype not in self._types:
            raise MessageRejected(
                f"message type {redact.message_type(mtype)} is not accepted by channel {self.channel.name}",
                code="200",
                location=Location("MSH", 1, 9, None, 1),
            )
        triggers = self._types[mtype]
        if triggers and trig not in triggers:
            raise MessageRejected(
                f"trigger event {mtype}^{redact.trigger(trig, triggers)} is not accepted by channel "
                f"{self.channel.name}",
                code="201",
                location=Location("MSH", 1, 9, None, 2),
            )
        if msg.processing_id not in self._pids:
            raise MessageRejected(
                f"processing id {redact.code(msg.processing_id, redact.PROCESSING_IDS) if msg.processing_id else '(empty)'} "
                "is not accepted",
                code="202",
                location=Location("MSH", 1, 11),
            )
        if msg.version not in self._versions:
            raise MessageRejected(
                f"HL7 version {redact.code(msg.version, redact.VERSIONS) if msg.version else '(empty)'} is not accepted",
                code="203",
                location=Location("MSH", 1, 12),
            )
        for path in self.channel.require:
            if not msg[path].strip():
                seg, occ, fld, _rep, comp, _sub = hl7.parse_path(path)
                raise MessageContentError(
                    f"required field {path} is missing",
                    code="101",
                    location=Location(seg, occ, fld, None, comp),
                )

    def decide(self, payload: bytes, peer: str) -> tuple[list[Job], bytes | None]:
        """Build the jobs to commit for a frame, or an immediate answer when nothing is stored."""
        now = time.time()
        if _BLANK.fullmatch(payload):  # (not payload.strip(): that copies a 15 MB frame to look at it)
            err = MessageRejected("empty message", code="100")
            return [], render_ack(None, ackmod.Outcome("AR", err))[0]
        text: str | None = None
        decode_error: SluiceError | None = None
        try:
            src = self.channel.source
            text = hl7.decode(payload, src.fallback_charset, src.utf8_fallback)
        except SluiceError as exc:
            decode_error = exc
            text = payload.decode("latin-1")
        texts = hl7.split_batch(hl7.normalise_newlines(text).lstrip("\r\n \t"))
        batch = len(texts) != 1 or text.lstrip().startswith(("FHS", "BHS"))
        if batch and self.channel.batch == "reject":
            err = MessageRejected("batches (FHS/BHS) are not accepted on this channel", code="200")
            return [], render_ack(None, ackmod.Outcome("AR", err))[0]
        raws = [payload] if not batch else _batch_raws(payload)
        if len(raws) != len(texts):  # cannot happen for ASCII-compatible charsets; never lose a message
            raws = [t.encode("utf-8", "surrogateescape") for t in texts]
        jobs = [self._job(t, r, peer, now, decode_error) for t, r in zip(texts, raws, strict=True)]
        if not jobs:
            err = MessageRejected("batch holds no MSH message", code="100")
            return [], render_ack(None, ackmod.Outcome("AR", err))[0]
        return jobs, None

    def _job(self, text: str, raw: bytes, peer: str, now: float, decode_error: SluiceError | None) -> Job:
        ch = self.channel
        row = NewMessage(channel=ch.name, received_at=now, peer=peer, raw=raw)
        row.content_hash = hashlib.blake2b(raw, digest_size=16).hexdigest()
        msg: hl7.Message | None = None
        try:
            msg = hl7.parse(text)
            delims = msg.delimiters.field + msg.delimiters.encoding_characters
            if _CONTROL_CHAR.search(delims):
                # The ACK is built with the sender's delimiters: a NUL or framing byte there would
                # break the ACK (or its framing), so answer as for an unreadable message.
                msg = None
                raise MessageRejected(
                    "MSH-1/MSH-2 delimiters include a control character; use printable delimiters such as |^~\\&",
                    code="101",
                    location=Location("MSH", 1, 2),
                )
            row.control_id = msg.control_id[:200]
            row.sending_app = msg.sending_application[:200]
            row.sending_facility = msg.sending_facility[:200]
            row.message_type = msg.message_type[:10]
            row.trigger = msg.trigger[:10]
            row.version = msg.version[:20]
            if decode_error is not None:
                raise decode_error
            if msg.message_type == "ACK":
                row.status = IGNORED
                row.reason = "inbound acknowledgement: never acknowledged back"
                return Job(ch, row, msg, ackmod.Outcome("AA"))
            self.check(msg)
        except SluiceError as exc:
            outcome = ackmod.Outcome(exc.ack_code, exc)
            row.reason = str(exc)
            row.status = REJECTED if isinstance(exc, MessageRejected) and msg is not None else QUARANTINED
            if exc.ack_code == "AE" and not exc.hl7_error.startswith(("102", "103", "205")):
                from engine.store import ERROR

                row.status = ERROR
            row.ack, row.ack_code = render_ack(msg, outcome)
            return Job(ch, row, msg, outcome)
        if self.patient_key is not None:
            row.patient_key = _patient_hash(msg, self.patient_key)
        row.order_key = msg[ch.order_by] if ch.order_by else ""
        row.dedupe_key = (
            f"{row.sending_app}|{row.sending_facility}|{row.control_id}" if ch.dedupe.enabled else ""
        )
        outcome = ackmod.ACCEPTED
        row.ack, row.ack_code = render_ack(msg, outcome)
        return Job(ch, row, msg, outcome, dedupe=ch.dedupe.enabled, process=self.process)

    # -- I/O part ----------------------------------------------------------
    async def handle(self, payload: bytes, peer: str) -> list[bytes]:
        """The ACK payloads to send back for one frame, in order (possibly none)."""
        if len(payload) < OFFLOAD_BYTES:
            jobs, immediate = self.decide(payload, peer)
        else:
            async with _large_decides():  # one at a time: each holds several copies of its frame
                jobs, immediate = await asyncio.to_thread(self.decide, payload, peer)
            for j in jobs:
                if j.process is None and j.message is not None:
                    # Only the header is read from here on (ACKs); the parsed body would hold two more
                    # copies of a large frame while it waits for the committer.
                    j.message = hl7.Message("", j.message.delimiters, j.message.segments[:1])
        if not jobs:
            log.info("message_rejected_unstored", channel=self.channel.name, peer=peer, outcome="AR")
            if self._metrics is not None:
                self._metrics.received.inc()
                self._metrics.processed(REJECTED)
            return split_acks(immediate)
        if len(jobs) == 1:
            results = [await self.committer.submit(jobs[0])]
        else:
            results = list(await asyncio.gather(*(self.committer.submit(j) for j in jobs)))
        if self.on_stored is not None:
            self.on_stored()
        if self._metrics is not None:
            _count(self._metrics, results)
        acks: list[bytes] = []
        for j in results:
            if j.error is not None:
                err = StoreError("the message could not be stored; resend it later")
                data, _ = render_ack(j.message, ackmod.Outcome("AR", err), j.row.control_id)
                acks.extend(split_acks(data))
                continue
            if j.duplicate_of:
                log.info(
                    "duplicate_ignored",
                    channel=self.channel.name,
                    peer=peer,
                    original_id=j.duplicate_of,
                    control_id=redact.control_id(j.row.control_id),
                    type=redact.type_and_trigger(j.row.message_type, j.row.trigger),
                )
                acks.extend(split_acks(j.replay_ack))
                continue
            outcome = j.final_outcome or j.outcome
            # Accepted messages are logged at debug (the store is the record; a line per message
            # at info would cost more than the durable write); anything else at info.  At info, an
            # accepted message builds no log fields at all (a bound logger and the redaction per message).
            if outcome.code != "AA" or logs.DEBUG:
                (log.debug if outcome.code == "AA" else log.info)(
                    "message_stored",
                    channel=self.channel.name,
                    peer=peer,
                    message_id=j.message_id,
                    control_id=redact.control_id(j.row.control_id),
                    type=redact.type_and_trigger(j.row.message_type, j.row.trigger),
                    status=j.row.status if j.final_outcome is None else "processed",
                    outcome=outcome.code,
                )
            acks.extend(split_acks(j.row.ack))
        if len(jobs) > 1:
            # A batch gets one ACK: the worst outcome of its messages.
            order = {"AR": 0, "CR": 0, "AE": 1, "CE": 1, "AA": 2, "CA": 2}
            acks.sort(key=lambda a: order.get(_msa1(a), 3))
            return acks[:1]
        return acks


def _count(m: ChannelMetrics, jobs: list[Job]) -> None:
    """Metrics for a frame's jobs, once their group commit is over: every fact here is final."""
    m.received.value += len(jobs)  # a plain int (engine.metrics.Tally): no lock on the hot path
    for j in jobs:
        if j.error is not None:
            continue  # not stored (AR 207): the sender resends, and that one counts
        if j.duplicate_of:
            m.duplicates.value += 1
            continue
        res = j.result
        status = res.status if res is not None else j.row.status
        if status != RECEIVED:  # decided here, or by inline processing (ack: after-processing)
            m.processed(status)
        if res is not None and res.missing == "Patient":
            m.patient_match_failures.inc()
        if res is not None:
            for kind, _ in res.warnings:
                m.warned(kind)


def _batch_raws(payload: bytes) -> list[bytes]:
    """Each batch member's own bytes, as sent (same split as ``hl7.split_batch``, on the raw bytes).

    Re-encoding the decoded text would change a UTF-8 member's bytes (or replace characters),
    so the stored raw would no longer match its MSH-18.
    """
    members: list[bytearray] = []
    for line in payload.lstrip(b"\r\n \t").splitlines(keepends=True):
        content = line.rstrip(b"\r\n")
        if content.startswith(b"MSH"):
            members.append(bytearray(line))
        elif content[:3] in (b"FHS", b"BHS", b"BTS", b"FTS") or not content:
            continue
        elif members:
            members[-1] += line
    return [bytes(m) for m in members]


def _msa1(ack_bytes: bytes) -> str:
    i = ack_bytes.find(b"MSA")
    return ack_bytes[i + 4 : i + 6].decode("ascii", "replace") if i >= 0 else ""


def _patient_hash(msg: hl7.Message, key: bytes) -> str:
    """The keyed hash of the first PID-3 identifier: searchable, never the identifier itself."""
    for seg in msg.segments:  # (not msg.first: that indexes every segment of the message to find one)
        if seg.name == "PID":
            return patient_hash(key, seg.rep(3).c(1))
    return ""
