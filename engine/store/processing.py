"""The processing queries: received messages for the workers (ids, sizes, bodies, leases), the resource
status ranks of the guards (:class:`RankView`), the results of a round, and recovery after a restart.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection

from engine import keyring
from engine.store.base import StoreBase
from engine.store.records import ClaimedRow, within_bytes
from engine.store.tables import PROCESSING, RECEIVED, M, S


class RankView:
    """Resource status ranks for one write transaction: read in bulk, changed in memory, written once.

    A processing round checks the guards of many messages; one SELECT for all their keys and one
    executemany for the changes replace a query per key per message.
    """

    def __init__(self, store: ProcessingQueries, conn: Connection):
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


class ProcessingQueries(StoreBase):
    """What the processing workers read and record (engine/workers.py, engine/procpool.py)."""

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

    def recover(self, owner: str | None = None) -> int:
        """After a crash or restart: messages left 'processing' go back to 'received'."""
        with self.write() as conn:
            q = update(M).where(M.c.status == PROCESSING)
            if owner is not None:
                q = q.where((M.c.lease_owner == owner) | (M.c.lease_until < time.time()))
            res = conn.execute(q.values(status=RECEIVED, lease_owner="", lease_until=0.0))
            return int(res.rowcount or 0)
