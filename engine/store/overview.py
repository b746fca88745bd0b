"""What the admin API, the CLI and the metrics read: messages listed, one message and its deliveries,
counts by status (metadata only; the keyset search is engine/admin/search.py).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from engine.store.base import StoreBase
from engine.store.tables import D, M


class OverviewQueries(StoreBase):
    """Messages, deliveries and counts for the operations side."""

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
