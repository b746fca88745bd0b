"""The durable store: SQLAlchemy 2 models and the few queries the engine needs.

SQLite (WAL, ``synchronous=FULL``) by default; PostgreSQL by URL
(``postgresql+psycopg://...``).  Everything here is synchronous and called from
worker threads; the asyncio side reaches it through ``asyncio.to_thread`` or
the group committer in ``engine.intake``.

Times are stored as UNIX epoch seconds (float): portable, sortable, cheap.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

from sqlalchemy import (
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from engine import keyring
from engine.errors import StoreError
from engine.store import migrations
from engine.store.connect import open_engine, safe_url
from engine.store.keys import (
    KEYED_PREFIX,
    ORDER_TAG,
    PATIENT_KEY_SETTING,
    SOURCE_RESOURCE_TAG,
    STATE_TAG,
    is_keyed,
    keyed,
)
from engine.store.migrations import OBSOLETE_INDEXES
from engine.store.records import (
    ClaimedRow,
    Duplicate,
    LoadedDelivery,
    NewDelivery,
    NewMessage,
    PendingRow,
    stored_payload,
    within_bytes,
)
from engine.store.tables import (
    AUDIT,
    CURSORS,
    DEAD,
    DELIVERED,
    ERROR,
    FILTERED,
    IDEMPOTENCY,
    IGNORED,
    MESSAGE_STATUSES,
    PAUSES,
    PENDING,
    PROCESSED,
    PROCESSING,
    PROGRESS,
    QUARANTINED,
    RECEIVED,
    REJECTED,
    REVIEW,
    SETTINGS,
    SOURCE_RESOURCES,
    SUPERSEDED,
    TOKENS,
    WRITEBACK,
    WRITEBACK_LOG,
    AuditRow,
    Base,
    C,
    CounterRow,
    D,
    DeliveryProgressRow,
    DeliveryRow,
    IdempotencyRow,
    M,
    MessageRow,
    PauseRow,
    R,
    ReplayRow,
    ResourceStateRow,
    S,
    Sealed,
    SettingRow,
    SourceCursorRow,
    SourceResourceRow,
    TokenRow,
    W,
    WarningRow,
    WritebackLogRow,
    WritebackStateRow,
)


def _narrow(
    q: Any,
    id_col: Any,
    channel_col: Any,
    ids: Sequence[int],
    channel: str | None,
    since: float | None,
    until: float | None,
) -> Any:
    """The replay selection's common filters: message ids, channel and a received-time range."""
    if ids:
        q = q.where(id_col.in_(list(ids)))
    if channel:
        q = q.where(channel_col == channel)
    if since is not None:
        q = q.where(M.c.received_at >= since)
    if until is not None:
        q = q.where(M.c.received_at < until)
    return q


FINISHED = (PROCESSED, FILTERED, REJECTED, QUARANTINED, IGNORED, ERROR, REVIEW)


def _finished_before(
    conn: Connection, channel: str, before: float, batch: int, *, with_body: bool = False
) -> list[int]:
    """Up to ``batch`` ids of a channel's finished messages received before ``before`` (retention)."""
    q = select(M.c.id).where(M.c.channel == channel, M.c.received_at < before, M.c.status.in_(FINISHED))
    if with_body:
        q = q.where(M.c.raw.is_not(None))
    return [r[0] for r in conn.execute(q.limit(batch))]


class RankView:
    """Resource status ranks for one write transaction: read in bulk, changed in memory, written once.

    A processing round checks the guards of many messages; one SELECT for all their keys and one
    executemany for the changes replace a query per key per message.
    """

    def __init__(self, store: Store, conn: Connection):
        self.store = store
        self.conn = conn
        self.known: dict[str, int] = {}
        self.fetched: set[str] = set()
        self.new: dict[str, tuple[int, int]] = {}  # key -> (rank, message id), not in the table yet
        self.changed: dict[str, tuple[int, int]] = {}  # key -> (rank, message id), in the table

    def get(self, keys: Sequence[str]) -> dict[str, int]:
        missing = [k for k in dict.fromkeys(keys) if k not in self.fetched]
        for i in range(0, len(missing), 500):
            chunk = missing[i : i + 500]
            self.known.update(self.store.resource_ranks(self.conn, chunk))
            self.fetched.update(chunk)
        return {k: self.known[k] for k in keys if k in self.known}

    def set(self, message_id: int, ranks: dict[str, int]) -> None:
        self.get(list(ranks))
        for key, rank in ranks.items():
            if key not in self.known:
                self.known[key] = rank
                self.new[key] = (rank, message_id)
            elif rank > self.known[key]:
                self.known[key] = rank
                if key in self.new:
                    self.new[key] = (rank, message_id)
                else:
                    self.changed[key] = (rank, message_id)

    def flush(self) -> None:
        now = time.time()
        if self.new:
            self.store._executemany(
                self.conn,
                "INSERT INTO resource_state (key, rank, message_id, updated_at) VALUES (?, ?, ?, ?)",
                [[self.store.state_key(k), r, m, now] for k, (r, m) in self.new.items()],
            )
        if self.changed:
            self.store._executemany(
                self.conn,
                "UPDATE resource_state SET rank = ?, message_id = ?, updated_at = ? WHERE key = ?",
                [[r, m, now, self.store.state_key(k)] for k, (r, m) in self.changed.items()],
            )
        self.new, self.changed = {}, {}


def open_failure(where: str, exc: BaseException) -> str:
    """What is wrong when the store cannot be opened, and what to do: the driver's own words (without
    SQLAlchemy's background link), with a hint for the usual causes."""
    lines = [x for x in str(getattr(exc, "orig", None) or exc).splitlines() if "sqlalche.me" not in x]
    text = " ".join(x.strip() for x in lines if x.strip())
    low = text.lower()
    if "refused" in low or "could not connect" in low or "could not translate host" in low:
        hint = "is the database server running there? Check the host and port of store: (or SLUICE_STORE)"
    elif "database" in low and "does not exist" in low:
        hint = "create the database (e.g. createdb NAME) or correct its name in store: (or SLUICE_STORE)"
    elif "password authentication failed" in low or "no password supplied" in low:
        hint = "give the password in PGPASSWORD or ~/.pgpass (never in routes.yaml)"
    else:
        hint = "check that the database exists and is writable"
    return f"cannot open the store {where}: {text}; {hint}"


class Store:
    """The engine's view of the database."""

    def __init__(self, url: str, *, create: bool = True, keys: keyring.KeyRing | None = None):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        # Bodies, ACKs and payloads are sealed with these keys (None: stored plain).
        self.keys = keys
        self._hash_key: bytes | None = None  # the installation's HMAC key, read once (installation_key)
        self.engine: Engine = open_engine(url, keys)
        if create:
            self.create_schema()

    @property
    def safe_url(self) -> str:
        """The URL with any password hidden, for logs and errors."""
        return safe_url(self.url)

    def create_schema(self) -> None:
        try:
            migrations.upgrade_schema(self)
        except Exception as exc:
            raise StoreError(open_failure(self.safe_url, exc)) from exc

    def installation_key(self) -> bytes:
        """The per-installation HMAC key of the patient search, order keys and resource-state keys (made on
        first use in the ``installation`` table; every node then reads the same one)."""
        if self._hash_key is not None:
            return self._hash_key
        with self.engine.connect() as conn:
            row = conn.execute(select(SETTINGS.c.value).where(SETTINGS.c.key == PATIENT_KEY_SETTING)).first()
        if row is None:
            try:
                with self.write() as conn:
                    conn.execute(
                        insert(SETTINGS).values(key=PATIENT_KEY_SETTING, value=secrets.token_hex(32))
                    )
            except IntegrityError:  # another node made it first
                pass
            return self.installation_key()
        self._hash_key = bytes.fromhex(row[0])
        return self._hash_key

    def order_key(self, value: str) -> str:
        """The stored form of a message's order key (the channel's ``order_by`` value): a keyed hash."""
        return keyed(self.installation_key(), ORDER_TAG, value)

    def state_key(self, key: str) -> str:
        """The stored form of a resource-state key (a FHIR conditional-write URL): a keyed hash."""
        return keyed(self.installation_key(), STATE_TAG, key)

    def remember_resources(self, conn: Connection, channel: str, stored: Sequence[tuple[str, int]]) -> None:
        """(``Type/id``, message id) of versions a fhir-poll channel stored now: each becomes that
        resource's newest stored version (:class:`SourceResourceRow`); in the caller's transaction."""
        if not stored:
            return
        key = self.installation_key()
        newest = {keyed(key, SOURCE_RESOURCE_TAG, ref): mid for ref, mid in stored}
        T = SOURCE_RESOURCES
        have = {
            r[0]
            for r in conn.execute(
                select(T.c.key).where(T.c.channel == channel, T.c.key.in_(list(newest)))
            ).all()
        }
        now = time.time()
        for k, mid in newest.items():
            if k in have:
                conn.execute(
                    update(T)
                    .where(T.c.channel == channel, T.c.key == k)
                    .values(message_id=mid, updated_at=now)
                )
            else:
                conn.execute(insert(T).values(channel=channel, key=k, message_id=mid, updated_at=now))

    def last_resource_body(self, conn: Connection, channel: str, ref: str) -> bytes | None:
        """The stored body of the newest version of ``ref`` (``Type/id``) the channel took; ``None`` when it
        took none or retention dropped the body."""
        T = SOURCE_RESOURCES
        k = keyed(self.installation_key(), SOURCE_RESOURCE_TAG, ref)
        row = conn.execute(
            select(M.c.raw).join(T, T.c.message_id == M.c.id).where(T.c.channel == channel, T.c.key == k)
        ).first()
        return bytes(row[0]) if row is not None and row[0] is not None else None

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def write(self, *, durable: bool = True) -> Iterator[Connection]:
        """A write transaction (BEGIN IMMEDIATE on SQLite), committed on exit.

        ``durable=False`` is for writes that are safe to redo (processing results, delivery
        outcomes: destinations are idempotent): on SQLite they commit without their own fsync;
        the next durable commit (every intake commit) flushes them with it.  A process crash
        loses nothing either way; only a power loss could roll them back, and they are redone.
        """
        with self.engine.connect() as conn:
            conn.execution_options(sluice_write=True, sluice_relaxed=not durable)
            with conn.begin():
                yield conn

    @contextmanager
    def writer_transaction(self, conn: Connection, *, durable: bool = True) -> Iterator[Connection]:
        """Like :meth:`write` on a connection the caller keeps open (the committer's own)."""
        conn.execution_options(sluice_write=True, sluice_relaxed=not durable)
        with conn.begin():
            yield conn

    def check(self) -> str:
        """Integrity check: 'ok' or what is wrong."""
        with self.engine.connect() as conn:
            if self.is_sqlite:
                return str(conn.exec_driver_sql("PRAGMA integrity_check").scalar())
            conn.execute(text("SELECT 1"))
            return "ok"

    # ------------------------------------------------------------------ intake
    # -- the intake hot path talks to the DB-API cursor directly: SQLAlchemy Core's per-statement
    # overhead (~0.3 ms) is several times the cost of the statement itself here.  The SQL is
    # built once per dialect (qmark for sqlite3, format for psycopg).  See bench/engine_bench.py.
    def _p(self, n: int = 1) -> str:
        mark = "?" if self.is_sqlite else "%s"
        return ", ".join([mark] * n)

    def _cursor(self, conn: Connection) -> Any:
        return conn.connection.driver_connection.cursor()  # type: ignore[union-attr]

    def find_duplicates(
        self,
        conn: Connection,
        channel: str,
        keys: Sequence[str],
        since: float,
        control_ids: Sequence[str] | None = None,
    ) -> dict[str, Duplicate]:
        """The earliest non-quarantined message per dedupe key received since ``since``.

        ``control_ids``: the control ids (MSH-10) of those keys' messages.  With them the look-up seeks
        ``ix_messages_control_channel``; without them it reads every row of the channel (tests only).
        """
        if not keys:
            return {}
        uniq = list(dict.fromkeys(keys))
        p = "?" if self.is_sqlite else "%s"
        args: list[Any] = [channel, *uniq]
        by_cid = ""
        if control_ids is not None:
            cids = list(dict.fromkeys(control_ids))
            by_cid = f"control_id IN ({self._p(len(cids))}) AND "
            args = [*cids, *args]
        sql = (
            f"SELECT id, dedupe_key, content_hash, ack FROM messages WHERE {by_cid}channel = {p} "
            f"AND dedupe_key IN ({self._p(len(uniq))}) AND received_at >= {p} "
            f"AND status NOT IN ({p}, {p}) ORDER BY id"
        )
        cur = self._cursor(conn)
        try:
            cur.execute(sql, [*args, since, QUARANTINED, REJECTED])
            rows = cur.fetchall()
        finally:
            cur.close()
        out: dict[str, Duplicate] = {}
        for mid, key, chash, ack in rows:
            if key not in out:
                out[key] = Duplicate(
                    mid,
                    chash,
                    keyring.unseal(self.keys, bytes(ack), keyring.ACK) if ack is not None else None,
                )
        return out

    _MSG_COLS = (
        "channel", "received_at", "peer", "raw", "size", "control_id", "sending_app", "sending_facility",
        "message_type", "trigger", "version", "patient_key", "order_key", "content_hash", "dedupe_key",
        "status", "reason", "ack", "ack_code", "processed_at", "lease_owner", "lease_until", "override_guards",
    )  # fmt: skip

    def insert_messages(self, conn: Connection, rows: Sequence[NewMessage]) -> list[int]:
        if not rows:
            return []
        cols = self._MSG_COLS
        sql = f"INSERT INTO messages ({', '.join(cols)}) VALUES ({self._p(len(cols))}) RETURNING id"
        cur = self._cursor(conn)
        ids: list[int] = []
        keys = self.keys
        try:
            for r in rows:
                r.order_key = self.order_key(r.order_key)  # the caller's later add_deliveries uses it too
                d = r.row()
                d["lease_owner"], d["lease_until"], d["override_guards"] = "", 0.0, False
                d["raw"] = keyring.seal(keys, r.raw, keyring.RAW)
                if r.ack is not None:
                    d["ack"] = keyring.seal(keys, r.ack, keyring.ACK)
                cur.execute(sql, [d[c] for c in cols])
                ids.append(int(cur.fetchone()[0]))
        finally:
            cur.close()
        return ids

    def add_deliveries(
        self,
        conn: Connection,
        message_id: int,
        channel: str,
        order_key: str,
        deliveries: Iterable[NewDelivery],
    ) -> None:
        self.insert_deliveries(conn, self.delivery_rows(message_id, channel, order_key, deliveries))

    def delivery_rows(
        self, message_id: int, channel: str, order_key: str, deliveries: Iterable[NewDelivery]
    ) -> list[dict[str, Any]]:
        """Rows for :meth:`insert_deliveries` (batch them across messages: one statement).  ``order_key``:
        the message's, as stored (a plain one is hashed the same way)."""
        now = time.time()
        order_key = self.order_key(order_key)
        return [
            {
                "message_id": message_id,
                "channel": channel,
                "destination": d.destination,
                "payload": d.payload if d.packed else stored_payload(self.keys, d.payload),
                "content_type": d.content_type,
                "meta": json.dumps(d.meta),
                "order_key": f"{channel}|{order_key}",
                "status": PENDING,
                "attempts": 0,
                "created_at": now,
                "next_attempt_at": 0.0,
            }
            for d in deliveries
        ]

    _DLV_COLS = ("message_id", "channel", "destination", "payload", "content_type", "meta", "order_key",
                 "status", "attempts", "created_at", "next_attempt_at", "last_error", "detail",
                 "lease_owner", "lease_until")  # fmt: skip
    _DLV_DEFAULTS: ClassVar[dict[str, Any]] = {
        "last_error": "",
        "detail": "",
        "lease_owner": "",
        "lease_until": 0.0,
    }

    def insert_deliveries(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        cols = self._DLV_COLS
        sql = f"INSERT INTO deliveries ({', '.join(cols)}) VALUES ({self._p(len(cols))})"
        cur = self._cursor(conn)
        try:
            dflt = self._DLV_DEFAULTS
            cur.executemany(sql, [[r[c] if c in r else dflt[c] for c in cols] for r in rows])
        finally:
            cur.close()

    def _executemany(self, conn: Connection, sql: str, params: list[Any]) -> None:
        cur = self._cursor(conn)
        try:
            cur.executemany(sql.replace("?", "?" if self.is_sqlite else "%s"), params)
        finally:
            cur.close()

    def insert_warnings(self, conn: Connection, rows: Sequence[tuple[int, str, str]]) -> None:
        """(message id, kind, text) rows, in one executemany statement (the processing result's batch)."""
        if not rows:
            return
        self._executemany(
            conn,
            "INSERT INTO message_warnings (message_id, kind, text) VALUES (?, ?, ?)",
            [[mid, kind[:100], text[:2000]] for mid, kind, text in rows],
        )

    def warnings_of(self, message_id: int) -> list[tuple[str, str]]:
        """A message's warnings as (kind, text), in the order the conversion raised them."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(W.c.kind, W.c.text).where(W.c.message_id == message_id).order_by(W.c.id)
            ).all()
        return [(r.kind, r.text) for r in rows]

    def bump(self, conn: Connection, channel: str, name: str, by: int = 1) -> None:
        """Add to a per-channel counter (e.g. duplicates prevented)."""
        res = conn.execute(
            update(C).where(C.c.channel == channel, C.c.name == name).values(value=C.c.value + by)
        )
        if res.rowcount == 0:
            conn.execute(insert(C).values(channel=channel, name=name, value=by))

    def counters(self, channel: str | None = None) -> dict[tuple[str, str], int]:
        with self.engine.connect() as conn:
            q = select(C)
            if channel:
                q = q.where(C.c.channel == channel)
            return {(r.channel, r.name): r.value for r in conn.execute(q)}

    # -------------------------------------------------------------- processing
    _CLAIM_COLUMNS = ("id", "channel", "raw", "control_id", "message_type", "trigger", "order_key",
                      "replay_destinations", "override_guards")  # fmt: skip

    def received_ids(
        self, channel: str, limit: int, skip: frozenset[int] | set[int] = frozenset()
    ) -> list[int]:
        """Single node (SQLite): ids of the oldest received messages, leaving out ``skip`` (in flight).

        Only ids: the bodies are read by the worker process that converts them.
        """
        return [i for i, _ in self.received_sizes(channel, limit, skip)]

    def received_sizes(
        self,
        channel: str,
        limit: int,
        skip: frozenset[int] | set[int] = frozenset(),
        max_bytes: int = 0,
    ) -> list[tuple[int, int]]:
        """:meth:`received_ids` with each body's stored size: at most ``limit`` messages, and no more
        than fit in ``max_bytes`` together (at least one; 0 = no limit)."""
        with self.engine.connect() as conn:
            q = (
                select(M.c.id, func.coalesce(func.length(M.c.raw), 0))
                .where(M.c.channel == channel, M.c.status == RECEIVED)
                .order_by(M.c.id)
                .limit(limit + len(skip))
            )
            rows = [(int(r[0]), int(r[1])) for r in conn.execute(q) if r[0] not in skip][:limit]
        return rows[: within_bytes([n for _, n in rows], max_bytes)]

    def received_by_id(self, ids: list[int]) -> list[ClaimedRow]:
        """The claim columns of those of ``ids`` that are still received, in id order.

        A worker process reads its batch here: the DB-API cursor, not SQLAlchemy rows (a tenth of a
        worker's time went to building rows for 200-message batches).
        """
        if not ids:
            return []
        p = "?" if self.is_sqlite else "%s"
        sql = (
            f"SELECT {', '.join(self._CLAIM_COLUMNS)} FROM messages "
            f"WHERE id IN ({', '.join([p] * len(ids))}) AND status = {p} ORDER BY id"
        )
        with self.engine.connect() as conn:
            cur = self._cursor(conn)
            try:
                cur.execute(sql, [*ids, RECEIVED])
                rows = cur.fetchall()
            finally:
                cur.close()
        keys = self.keys
        return [
            ClaimedRow(
                r[0], r[1], keyring.unseal(keys, r[2], keyring.RAW) if r[2] is not None else b"", *r[3:]
            )
            for r in rows
        ]

    def claim_received(
        self, channel: str, limit: int, owner: str, lease_s: float = 300.0, max_bytes: int = 0
    ) -> list[Any]:
        """Take up to ``limit`` received messages of a channel, oldest first, under a lease (no more
        than fit in ``max_bytes`` of stored body together, at least one)."""
        now = time.time()
        with self.write() as conn:
            q = (
                select(M.c.id, func.coalesce(func.length(M.c.raw), 0))
                .where(M.c.channel == channel, M.c.status == RECEIVED)
                .order_by(M.c.id)
                .limit(limit)
            )
            if not self.is_sqlite:
                q = q.with_for_update(skip_locked=True)
            found = [(r[0], int(r[1])) for r in conn.execute(q)]
            ids = [i for i, _ in found[: within_bytes([n for _, n in found], max_bytes)]]
            if not ids:
                return []
            conn.execute(
                update(M)
                .where(M.c.id.in_(ids))
                .values(status=PROCESSING, lease_owner=owner, lease_until=now + lease_s)
            )
            rows = conn.execute(
                select(
                    M.c.id,
                    M.c.channel,
                    M.c.raw,
                    M.c.control_id,
                    M.c.message_type,
                    M.c.trigger,
                    M.c.order_key,
                    M.c.replay_destinations,
                    M.c.override_guards,
                )
                .where(M.c.id.in_(ids))
                .order_by(M.c.id)
            ).all()
        return list(rows)

    def resource_ranks(self, conn: Connection, keys: Sequence[str]) -> dict[str, int]:
        """The applied status rank per resource key (plain keys in and out; stored as keyed hashes)."""
        if not keys:
            return {}
        stored = {self.state_key(k): k for k in set(keys)}
        rows = conn.execute(select(S.c.key, S.c.rank).where(S.c.key.in_(list(stored)))).all()
        return {stored[r.key]: r.rank for r in rows}

    def rank_view(self, conn: Connection) -> RankView:
        return RankView(self, conn)

    def set_resource_ranks(self, conn: Connection, message_id: int, ranks: dict[str, int]) -> None:
        if not ranks:
            return
        now = time.time()
        existing = self.resource_ranks(conn, list(ranks))
        for key, rank in ranks.items():
            if key in existing:
                if rank > existing[key]:
                    conn.execute(
                        update(S)
                        .where(S.c.key == self.state_key(key))
                        .values(rank=rank, message_id=message_id, updated_at=now)
                    )
            else:
                conn.execute(
                    insert(S).values(
                        key=self.state_key(key), rank=rank, message_id=message_id, updated_at=now
                    )
                )

    def finish_messages(self, conn: Connection, results: Sequence[tuple[int, str, str]]) -> None:
        """Many (message id, status, reason) in one executemany statement."""
        if not results:
            return
        now = time.time()
        self._executemany(
            conn,
            "UPDATE messages SET status = ?, reason = ?, processed_at = ?, lease_owner = '', lease_until = 0, "
            "replay_destinations = NULL, override_guards = ? WHERE id = ?",
            [[status, reason[:4000], now, False, mid] for mid, status, reason in results],
        )

    # ---------------------------------------------------------------- delivery
    def pending_deliveries(self, destination: str, limit: int) -> list[PendingRow]:
        """The oldest pending deliveries of a destination (ids and scheduling fields only)."""
        p = "?" if self.is_sqlite else "%s"
        return [
            PendingRow(*r)
            for r in self._select(
                "SELECT d.id, d.order_key, d.next_attempt_at, d.attempts, d.lease_owner, d.lease_until, "
                "coalesce(length(d.payload), 0) "
                "+ coalesce((SELECT length(m.raw) FROM messages m WHERE m.id = d.message_id), 0) "
                f"FROM deliveries d WHERE d.destination = {p} AND d.status = {p} ORDER BY d.id LIMIT {int(limit)}",
                [destination, PENDING],
            )
        ]

    # The statement of :meth:`pending_summary`.  The status is a literal so that both SQLite and
    # PostgreSQL can answer it from the partial index ``ix_deliveries_pending`` (a bound parameter
    # would not prove the index's WHERE clause).
    PENDING_SUMMARY_SQL = (
        "SELECT destination, count(*), min(created_at) FROM deliveries "
        f"WHERE status = '{PENDING}' GROUP BY destination"
    )

    def pending_summary(self) -> dict[str, tuple[int, float]]:
        """Per destination with pending deliveries: (how many, created_at of the oldest).

        One grouped query over the pending rows only (index ``ix_deliveries_pending``): what the
        metrics scrape reads for ``sluice_queue_depth`` and ``sluice_oldest_pending_age_seconds``.
        """
        return {
            str(d): (int(n), float(oldest)) for d, n, oldest in self._select(self.PENDING_SUMMARY_SQL, [])
        }

    def _select(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """Rows of one read on the DB-API cursor (the delivery and processing loops' hot reads)."""
        with self.engine.connect() as conn:
            cur = self._cursor(conn)
            try:
                cur.execute(sql, list(params))
                return list(cur.fetchall())
            finally:
                cur.close()

    def lease_deliveries(self, ids: Sequence[int], owner: str, lease_s: float = 120.0) -> set[int]:
        """PostgreSQL, several nodes: take a lease on the rows this node is about to deliver.

        Rows another node holds (locked or under an unexpired lease) are skipped; the caller
        delivers only what it got.  SQLite (one node) needs no lease: every id is returned.
        """
        if self.is_sqlite or not ids:
            return set(ids)
        now = time.time()
        with self.write() as conn:
            locked = [
                r[0]
                for r in conn.execute(
                    select(D.c.id)
                    .where(D.c.id.in_(list(ids)), D.c.status == PENDING)
                    .where((D.c.lease_until < now) | (D.c.lease_owner == owner))
                    .with_for_update(skip_locked=True)
                )
            ]
            if locked:
                conn.execute(
                    update(D).where(D.c.id.in_(locked)).values(lease_owner=owner, lease_until=now + lease_s)
                )
        return set(locked)

    def load_deliveries(self, ids: Sequence[int]) -> list[LoadedDelivery]:
        if not ids:
            return []
        p = "?" if self.is_sqlite else "%s"
        rows = self._select(
            "SELECT d.id, d.message_id, d.channel, d.destination, d.payload, d.content_type, d.meta, "
            "d.order_key, d.attempts, m.raw, m.control_id, m.message_type, m.trigger, m.received_at "
            "FROM deliveries d JOIN messages m ON m.id = d.message_id "
            f"WHERE d.id IN ({', '.join([p] * len(ids))}) ORDER BY d.id",
            list(ids),
        )
        keys = self.keys
        out = []
        for r in rows:
            r = list(r)
            if r[4] is not None:
                r[4] = keyring.unseal(keys, r[4], keyring.PAYLOAD)
            if r[9] is not None:
                r[9] = keyring.unseal(keys, r[9], keyring.RAW)
            out.append(LoadedDelivery(*r))
        return out

    def record_deliveries(
        self,
        delivered: Sequence[tuple[int, str]],
        failed: Sequence[tuple[int, int, str, float | None]],
        conn: Connection | None = None,
    ) -> None:
        """Delivered (id, detail); failed (id, attempts, error, next_attempt_at or None = dead).

        In ``conn``'s transaction when given (the committer's), else in a transaction of its own.
        """
        if not delivered and not failed:
            return
        if conn is None:
            with self.write() as own:
                self.record_deliveries(delivered, failed, own)
            return
        now = time.time()
        if delivered:
            self._executemany(
                conn,
                "UPDATE deliveries SET status = ?, delivered_at = ?, detail = ?, attempts = attempts + 1 WHERE id = ?",
                [[DELIVERED, now, detail[:1000], did] for did, detail in delivered],
            )
        for did, attempts, error, next_at in failed:
            values: dict[str, Any] = {"attempts": attempts, "last_error": error[:4000], "lease_until": 0.0}
            if next_at is None:
                values["status"] = DEAD
            else:
                values["next_attempt_at"] = next_at
            conn.execute(update(D).where(D.c.id == did).values(**values))

    # ------------------------------------------------------- delivery progress
    def load_progress(self, ids: Sequence[int]) -> dict[int, str]:
        """Saved progress (JSON text) of those deliveries that have some."""
        if not ids:
            return {}
        p = "?" if self.is_sqlite else "%s"
        rows = self._select(
            f"SELECT delivery_id, state FROM delivery_progress WHERE delivery_id IN ({', '.join([p] * len(ids))})",
            list(ids),
        )
        return {int(r[0]): str(r[1]) for r in rows}

    def save_progress(self, conn: Connection, delivery_id: int, state: str) -> None:
        """Replace a delivery's saved progress (in the committer's transaction)."""
        conn.execute(
            text(
                "INSERT INTO delivery_progress (delivery_id, state, updated_at) VALUES (:d, :s, :t) "
                "ON CONFLICT (delivery_id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at"
            ),
            {"d": delivery_id, "s": state, "t": time.time()},
        )

    def forget_progress(self, conn: Connection, delivery_ids: Sequence[int]) -> None:
        """Drop the progress of finished deliveries (delivered: the detail has each request's outcome)."""
        if delivery_ids:
            conn.execute(delete(PROGRESS).where(PROGRESS.c.delivery_id.in_(list(delivery_ids))))

    # ---------------------------------------------------------------- recovery
    def recover(self, owner: str | None = None) -> int:
        """After a crash or restart: messages left 'processing' go back to 'received'."""
        with self.write() as conn:
            q = update(M).where(M.c.status == PROCESSING)
            if owner is not None:
                q = q.where((M.c.lease_owner == owner) | (M.c.lease_until < time.time()))
            res = conn.execute(q.values(status=RECEIVED, lease_owner="", lease_until=0.0))
            return int(res.rowcount or 0)

    # ------------------------------------------------------------------ admin
    def list_messages(
        self,
        *,
        channel: str | None = None,
        status: str | None = None,
        limit: int = 50,
        since: float | None = None,
        until: float | None = None,
    ) -> list[Any]:
        q = select(
            M.c.id,
            M.c.received_at,
            M.c.channel,
            M.c.message_type,
            M.c.trigger,
            M.c.control_id,
            M.c.status,
            M.c.ack_code,
            M.c.size,
            M.c.reason,
        ).order_by(M.c.id.desc())
        if channel:
            q = q.where(M.c.channel == channel)
        if status:
            q = q.where(M.c.status == status)
        if since is not None:
            q = q.where(M.c.received_at >= since)
        if until is not None:
            q = q.where(M.c.received_at < until)
        with self.engine.connect() as conn:
            return list(conn.execute(q.limit(limit)).all())

    def get_message(self, message_id: int) -> Any | None:
        with self.engine.connect() as conn:
            return conn.execute(select(M).where(M.c.id == message_id)).first()

    def deliveries_of(self, message_id: int) -> list[Any]:
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(
                        D.c.id,
                        D.c.destination,
                        D.c.status,
                        D.c.attempts,
                        D.c.last_error,
                        D.c.detail,
                        D.c.next_attempt_at,
                        D.c.delivered_at,
                    )
                    .where(D.c.message_id == message_id)
                    .order_by(D.c.id)
                ).all()
            )

    def dead_letters(
        self, *, channel: str | None = None, destination: str | None = None, limit: int = 100
    ) -> list[Any]:
        """Dead deliveries and messages whose processing failed or that wait for review."""
        out: list[Any] = []
        with self.engine.connect() as conn:
            q = (
                select(
                    D.c.id.label("delivery_id"),
                    D.c.message_id,
                    D.c.channel,
                    D.c.destination,
                    D.c.attempts,
                    D.c.last_error.label("reason"),
                    M.c.message_type,
                    M.c.trigger,
                    M.c.control_id,
                    M.c.received_at,
                )
                .join(M, M.c.id == D.c.message_id)
                .where(D.c.status == DEAD)
                .order_by(D.c.id.desc())
                .limit(limit)
            )
            if channel:
                q = q.where(D.c.channel == channel)
            if destination:
                q = q.where(D.c.destination == destination)
            out.extend(conn.execute(q).all())
            if not destination:
                q2 = (
                    select(
                        M.c.id.label("message_id"),
                        M.c.channel,
                        M.c.status,
                        M.c.reason,
                        M.c.message_type,
                        M.c.trigger,
                        M.c.control_id,
                        M.c.received_at,
                    )
                    .where(M.c.status.in_([ERROR, REVIEW]))
                    .order_by(M.c.id.desc())
                    .limit(limit)
                )
                if channel:
                    q2 = q2.where(M.c.channel == channel)
                out.extend(conn.execute(q2).all())
        return out

    def select_for_replay(
        self,
        *,
        ids: Sequence[int] = (),
        channel: str | None = None,
        status: str | None = None,
        destination: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100_000,
    ) -> list[tuple[int, list[str] | None]]:
        """(message id, destinations to redo or None for all) for a replay selection.

        ``status`` is a message status (error, filtered, review, ...) or ``dead`` for dead deliveries.
        """
        with self.engine.connect() as conn:
            if status == "dead" or (destination and not ids and status is None):
                q = (
                    select(D.c.message_id, D.c.destination)
                    .join(M, M.c.id == D.c.message_id)
                    .where(D.c.status == DEAD)
                )
                q = _narrow(q, D.c.message_id, D.c.channel, ids, channel, since, until)
                if destination:
                    q = q.where(D.c.destination == destination)
                per: dict[int, list[str]] = {}
                for r in conn.execute(q.order_by(D.c.message_id).limit(limit)):
                    per.setdefault(r.message_id, []).append(r.destination)
                return [(mid, sorted(set(d))) for mid, d in per.items()]
            q3 = _narrow(
                select(M.c.id).where(M.c.raw.is_not(None)), M.c.id, M.c.channel, ids, channel, since, until
            )
            if status:
                q3 = q3.where(M.c.status == status)
            selected = [r[0] for r in conn.execute(q3.order_by(M.c.id).limit(limit))]
            out: list[tuple[int, list[str] | None]] = []
            for mid in selected:
                dests = None
                if destination:
                    dests = [destination]
                out.append((mid, dests))
            return out

    def replay(
        self,
        selection: Sequence[tuple[int, list[str] | None]],
        *,
        who: str,
        why: str,
        criteria: dict[str, Any],
    ) -> int:
        """Send selected messages back through processing with the current config; record who/when/why.

        The message goes back to 'received'; its dead (or, for a full replay, pending) deliveries are
        marked superseded so the fresh run creates the deliveries again.  Destinations are idempotent
        (conditional FHIR writes, deterministic file names), so a replay never duplicates downstream.
        """
        if not selection:
            return 0
        now = time.time()
        with self.write() as conn:
            for mid, dests in selection:
                q = update(D).where(D.c.message_id == mid, D.c.status.in_([DEAD, PENDING]))
                if dests:
                    q = q.where(D.c.destination.in_(dests))
                conn.execute(q.values(status=SUPERSEDED))
                conn.execute(delete(W).where(W.c.message_id == mid))  # the fresh run records its own
                conn.execute(
                    update(M)
                    .where(M.c.id == mid)
                    .values(
                        # an operator replaying a message held for review means "apply it anyway"
                        override_guards=M.c.status == REVIEW,
                        status=RECEIVED,
                        reason="",
                        lease_owner="",
                        lease_until=0.0,
                        replay_destinations=",".join(dests) if dests else None,
                    )
                )
            conn.execute(
                insert(R).values(
                    at=now,
                    who=who,
                    why=why,
                    selection=json.dumps(criteria, default=str),
                    message_ids=json.dumps([m for m, _ in selection]),
                    count=len(selection),
                )
            )
        return len(selection)

    def replays(self, limit: int = 50) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(R).order_by(R.c.id.desc()).limit(limit)).all())

    def status_counts(self) -> dict[tuple[str, str], int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(M.c.channel, M.c.status, func.count()).group_by(M.c.channel, M.c.status)
            )
            return {(r[0], r[1]): int(r[2]) for r in rows}

    def delivery_counts(self) -> dict[tuple[str, str], int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(D.c.destination, D.c.status, func.count()).group_by(D.c.destination, D.c.status)
            )
            return {(r[0], r[1]): int(r[2]) for r in rows}

    # --------------------------------------------------------------- retention
    def prune(
        self, channel: str, *, bodies_before: float | None, rows_before: float | None, batch: int = 500
    ) -> dict[str, int]:
        """Drop message bodies, then whole rows, older than the cut-offs, in small batches.

        Only finished messages are touched (never ones still waiting for processing or delivery).
        Disk space is returned: SQLite runs an incremental vacuum after each batch.
        """
        done = {"bodies": 0, "rows": 0}
        if bodies_before is not None:
            while True:
                with self.write() as conn:
                    ids = _finished_before(conn, channel, bodies_before, batch, with_body=True)
                    if not ids:
                        break
                    conn.execute(update(M).where(M.c.id.in_(ids)).values(raw=None))
                    conn.execute(
                        update(D)
                        .where(D.c.message_id.in_(ids), D.c.status.in_([DELIVERED, SUPERSEDED]))
                        .values(payload=None)
                    )
                done["bodies"] += len(ids)
                self._reclaim()
        if rows_before is not None:
            while True:
                with self.write() as conn:
                    ids = _finished_before(conn, channel, rows_before, batch)
                    if not ids:
                        break
                    conn.execute(
                        delete(PROGRESS).where(
                            PROGRESS.c.delivery_id.in_(
                                select(D.c.id).where(D.c.message_id.in_(ids), D.c.status != PENDING)
                            )
                        )
                    )
                    conn.execute(delete(D).where(D.c.message_id.in_(ids), D.c.status != PENDING))
                    pending = {
                        r[0]
                        for r in conn.execute(
                            select(D.c.message_id).where(D.c.message_id.in_(ids), D.c.status == PENDING)
                        )
                    }
                    gone = [i for i in ids if i not in pending]
                    if not gone:
                        break
                    conn.execute(delete(W).where(W.c.message_id.in_(gone)))
                    conn.execute(delete(M).where(M.c.id.in_(gone)))
                    conn.execute(delete(WRITEBACK_LOG).where(WRITEBACK_LOG.c.message_id.in_(gone)))
                    conn.execute(delete(SOURCE_RESOURCES).where(SOURCE_RESOURCES.c.message_id.in_(gone)))
                done["rows"] += len(gone)
                self._reclaim()
            with self.write() as conn:  # an http source's idempotency answers live as long as its rows
                conn.execute(
                    delete(IDEMPOTENCY).where(
                        IDEMPOTENCY.c.channel == channel, IDEMPOTENCY.c.at < rows_before
                    )
                )
        return done

    def _raw_sql(self, *statements: str) -> list[Any]:
        """Run statements outside any transaction (SQLite VACUUM and PRAGMAs need that)."""
        raw = self.engine.raw_connection()
        try:
            cur = raw.cursor()
            out = []
            for sql in statements:
                cur.execute(sql)
                rows = cur.fetchall()  # step to the end: incremental_vacuum frees one page per step
                out.append(rows[0][0] if rows else None)
            cur.close()
            return out
        finally:
            raw.close()

    def _reclaim(self) -> None:
        if self.is_sqlite:
            (mode,) = self._raw_sql("PRAGMA auto_vacuum")
            if mode == 2:
                self._vacuum_free_pages()

    def _vacuum_free_pages(self) -> None:
        # executescript runs sqlite3_exec, which steps the pragma to the end; a plain execute
        # through the sqlite3 module frees a single page.
        raw = self.engine.raw_connection()
        try:
            raw.driver_connection.executescript("PRAGMA incremental_vacuum;")  # type: ignore[union-attr]
        finally:
            raw.close()


__all__ = [
    "AUDIT",
    "CURSORS",
    "DEAD",
    "DELIVERED",
    "ERROR",
    "FILTERED",
    "IDEMPOTENCY",
    "IGNORED",
    "KEYED_PREFIX",
    "MESSAGE_STATUSES",
    "OBSOLETE_INDEXES",
    "ORDER_TAG",
    "PATIENT_KEY_SETTING",
    "PAUSES",
    "PENDING",
    "PROCESSED",
    "PROCESSING",
    "PROGRESS",
    "QUARANTINED",
    "RECEIVED",
    "REJECTED",
    "REVIEW",
    "SETTINGS",
    "SOURCE_RESOURCES",
    "SOURCE_RESOURCE_TAG",
    "STATE_TAG",
    "SUPERSEDED",
    "TOKENS",
    "WRITEBACK",
    "WRITEBACK_LOG",
    "AuditRow",
    "Base",
    "C",
    "ClaimedRow",
    "CounterRow",
    "D",
    "DeliveryProgressRow",
    "DeliveryRow",
    "Duplicate",
    "IdempotencyRow",
    "LoadedDelivery",
    "M",
    "MessageRow",
    "NewDelivery",
    "NewMessage",
    "PauseRow",
    "PendingRow",
    "R",
    "ReplayRow",
    "ResourceStateRow",
    "S",
    "Sealed",
    "SettingRow",
    "SourceCursorRow",
    "SourceResourceRow",
    "Store",
    "TokenRow",
    "W",
    "WarningRow",
    "WritebackLogRow",
    "WritebackStateRow",
    "is_keyed",
    "keyed",
    "stored_payload",
    "within_bytes",
]
