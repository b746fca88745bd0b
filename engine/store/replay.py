"""Dead letters and replay: the dead deliveries and failed messages, a replay selection, the replay itself
(who, when, why recorded) and the replays made (engine/admin/operations.py, the CLI).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, insert, select, update

from engine.store.base import StoreBase
from engine.store.tables import DEAD, ERROR, PENDING, RECEIVED, REVIEW, SUPERSEDED, D, M, R, W


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


class ReplayQueries(StoreBase):
    """Dead letters, replay selections, replays."""

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
