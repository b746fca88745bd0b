"""The store's handle: URL, engine, key ring and installation key, write transactions and the DB-API
cursor helpers every query module uses.

SQLite (WAL, ``synchronous=FULL``) by default; PostgreSQL by URL
(``postgresql+psycopg://...``).  Everything here is synchronous and called from
worker threads; the asyncio side reaches it through ``asyncio.to_thread`` or
the group committer in ``engine.intake``.  The queries are mixins over :class:`StoreBase` (intake.py,
processing.py, deliveries.py, replay.py, overview.py, sources.py, retention.py); :class:`engine.store.Store`
is all of them.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import insert, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from engine import keyring
from engine.errors import StoreError
from engine.store import migrations
from engine.store.connect import open_engine, open_failure, safe_url
from engine.store.keys import ORDER_TAG, PATIENT_KEY_SETTING, STATE_TAG, keyed
from engine.store.tables import SETTINGS


class StoreBase:
    """The engine's view of the database: the connection side every query mixin builds on."""

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

    # -- the intake hot path talks to the DB-API cursor directly: SQLAlchemy Core's per-statement
    # overhead (~0.3 ms) is several times the cost of the statement itself here.  The SQL is
    # built once per dialect (qmark for sqlite3, format for psycopg).  See bench/engine_bench.py.
    def _p(self, n: int = 1) -> str:
        mark = "?" if self.is_sqlite else "%s"
        return ", ".join([mark] * n)

    def _cursor(self, conn: Connection) -> Any:
        return conn.connection.driver_connection.cursor()  # type: ignore[union-attr]

    def _executemany(self, conn: Connection, sql: str, params: list[Any]) -> None:
        cur = self._cursor(conn)
        try:
            cur.executemany(sql.replace("?", "?" if self.is_sqlite else "%s"), params)
        finally:
            cur.close()

    def _select(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """Rows of one read on the DB-API cursor (the delivery and processing loops' hot reads)."""
        with self.engine.connect() as conn:
            cur = self._cursor(conn)
            try:
                cur.execute(sql, list(params))
                return list(cur.fetchall())
            finally:
                cur.close()

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
