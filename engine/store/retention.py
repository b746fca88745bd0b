"""Retention: message bodies, then whole rows, of finished messages older than a channel's cut-offs,
removed in small batches; SQLite gives the space back with an incremental vacuum.
"""

from __future__ import annotations

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Connection

from engine.store.base import StoreBase
from engine.store.tables import (
    DELIVERED,
    ERROR,
    FILTERED,
    IDEMPOTENCY,
    IGNORED,
    PENDING,
    PROCESSED,
    PROGRESS,
    QUARANTINED,
    REJECTED,
    REVIEW,
    SOURCE_RESOURCES,
    SUPERSEDED,
    WRITEBACK_LOG,
    D,
    M,
    W,
)

FINISHED = (PROCESSED, FILTERED, REJECTED, QUARANTINED, IGNORED, ERROR, REVIEW)


def _finished_before(
    conn: Connection, channel: str, before: float, batch: int, *, with_body: bool = False
) -> list[int]:
    """Up to ``batch`` ids of a channel's finished messages received before ``before`` (retention)."""
    q = select(M.c.id).where(M.c.channel == channel, M.c.received_at < before, M.c.status.in_(FINISHED))
    if with_body:
        q = q.where(M.c.raw.is_not(None))
    return [r[0] for r in conn.execute(q.limit(batch))]


class RetentionQueries(StoreBase):
    """Pruning by age (engine/server.py runs it per channel)."""

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
