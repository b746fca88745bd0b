"""The delivery queries: pending deliveries per destination, leases (several nodes), payloads with the
message's header fields, outcomes, and the progress of multi-request deliveries.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, select, text, update
from sqlalchemy.engine import Connection

from engine import keyring
from engine.store.base import StoreBase
from engine.store.records import LoadedDelivery, PendingRow
from engine.store.tables import DEAD, DELIVERED, PENDING, PROGRESS, D


class DeliveryQueries(StoreBase):
    """What the delivery workers schedule, load and record (engine/workers.py)."""

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
