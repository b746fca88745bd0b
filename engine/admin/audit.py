"""The audit trail: who viewed PHI, replayed, paused, changed tokens or reloaded config.

Rows live in the store's ``audit`` table and are never touched by message retention.
Rows carry ids, names and reasons typed by people; never message content.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from engine.admin.roles import Principal
from engine.store import AUDIT, Store

# The actions written (docs/operations.md lists them).
PHI_VIEW = "phi.view"
REPLAY = "replay"
PAUSE = "pause"
RESUME = "resume"
TOKEN_CREATE = "token.create"
TOKEN_REVOKE = "token.revoke"
CONFIG_RELOAD = "config.reload"
ACTIONS = (PHI_VIEW, REPLAY, PAUSE, RESUME, TOKEN_CREATE, TOKEN_REVOKE, CONFIG_RELOAD)


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    actor: str
    actor_kind: str
    action: str
    target: str
    reason: str
    detail: Mapping[str, Any]
    source: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at,
            "actor": self.actor,
            "actor_kind": self.actor_kind,
            "action": self.action,
            "target": self.target,
            "reason": self.reason,
            "detail": dict(self.detail),
            "source": self.source,
        }


def record(
    conn: Connection,
    who: Principal,
    action: str,
    *,
    target: str = "",
    reason: str = "",
    detail: Mapping[str, Any] | None = None,
    source: str = "",
    at: float | None = None,
) -> None:
    """Write one audit row inside the caller's transaction (so the row and the act commit together)."""
    conn.execute(
        insert(AUDIT).values(
            at=time.time() if at is None else at,
            actor=who.name[:200],
            actor_kind=who.kind,
            action=action,
            target=target[:300],
            reason=reason[:2000],
            detail=json.dumps(dict(detail or {}), default=str, sort_keys=True),
            source=source[:100],
        )
    )


def write(store: Store, who: Principal, action: str, **kwargs: Any) -> None:
    """Record one row in its own durable transaction."""
    with store.write() as conn:
        record(conn, who, action, **kwargs)


def entries(
    store: Store,
    *,
    since: float | None = None,
    until: float | None = None,
    action: str | None = None,
    actor: str | None = None,
    target: str | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> list[AuditEntry]:
    """Newest first; ``before_id`` continues a page (keyset)."""
    q = select(AUDIT).order_by(AUDIT.c.id.desc()).limit(limit)
    if since is not None:
        q = q.where(AUDIT.c.at >= since)
    if until is not None:
        q = q.where(AUDIT.c.at < until)
    if action:
        q = q.where(AUDIT.c.action == action)
    if actor:
        q = q.where(AUDIT.c.actor == actor)
    if target:
        q = q.where(AUDIT.c.target == target)
    if before_id is not None:
        q = q.where(AUDIT.c.id < before_id)
    with store.engine.connect() as conn:
        rows = conn.execute(q).all()
    return [
        AuditEntry(
            r.id,
            r.at,
            r.actor,
            r.actor_kind,
            r.action,
            r.target,
            r.reason,
            json.loads(r.detail or "{}"),
            r.source,
        )
        for r in rows
    ]
