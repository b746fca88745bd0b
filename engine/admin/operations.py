"""What an operator does, one function each, used by both the admin API and the ``sluice`` CLI.

Every act that changes something or reveals PHI writes an audit row (engine.admin.audit).
All functions are blocking (the API runs them in a thread).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select

from engine.admin import audit, search
from engine.admin.roles import Principal
from engine.store import MESSAGE_STATUSES, PAUSES, Store

PAUSE_KINDS = ("channel", "destination")
REPLAY_STATUSES = ("dead", *MESSAGE_STATUSES)
_REL = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


class OperationError(ValueError):
    """A request that cannot be carried out as asked; the message says what to do."""


class NotFound(OperationError):
    pass


def parse_when(value: str | float | None, *, now: float | None = None) -> float | None:
    """``2h``/``3d``/``30m`` ago, an ISO date-time (UTC if no offset), or epoch seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return float(value)
    text = value.strip()
    m = _REL.match(text)
    if m:
        secs = {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)] * float(m.group(1))
        base = datetime.now(UTC) if now is None else datetime.fromtimestamp(now, UTC)
        try:
            return (base - timedelta(seconds=secs)).timestamp()
        except (OverflowError, ValueError):  # before year 1: nothing is that old
            raise OperationError(f"{value!r} reaches back before the year 1: use e.g. 30d") from None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise OperationError(f"cannot read the time {value!r}: use e.g. 2h, 3d or 2026-11-23T08:00") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


# ------------------------------------------------------------------ PHI


def view_content(
    store: Store, who: Principal, message_id: int, *, reason: str = "", source: str = ""
) -> tuple[bytes | None, list[tuple[str, str, bytes | None]]]:
    """The message's raw HL7 and produced outputs; the audit row is committed before anything is read."""
    if search.message(store, message_id) is None:
        raise NotFound(f"no message {message_id}")
    audit.write(store, who, audit.PHI_VIEW, target=f"message:{message_id}", reason=reason, source=source)
    got = search.content(store, message_id)
    if got is None:  # pruned between the two reads
        raise NotFound(f"no message {message_id}")
    return got


# ------------------------------------------------------------------ replay


@dataclass(frozen=True)
class ReplayRequest:
    ids: Sequence[int] = ()
    channel: str | None = None
    status: str | None = None  # a message status, or "dead" for dead deliveries
    destination: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 100_000

    def check(self) -> None:
        if not self.ids and not (self.channel and self.status):
            raise OperationError("give message ids, or a channel with a status (e.g. status dead)")
        if self.status and self.status not in REPLAY_STATUSES:
            raise OperationError(f"unknown status {self.status!r}: use one of {', '.join(REPLAY_STATUSES)}")

    def criteria(self) -> dict[str, Any]:
        return {
            "ids": list(self.ids),
            "channel": self.channel,
            "status": self.status,
            "destination": self.destination,
            "since": self.since,
            "until": self.until,
        }


@dataclass(frozen=True)
class ReplayOutcome:
    selection: list[tuple[int, list[str] | None]] = field(default_factory=list)
    replayed: int = 0
    dry_run: bool = False


def replay(
    store: Store, who: Principal, req: ReplayRequest, *, dry_run: bool, why: str = "", source: str = ""
) -> ReplayOutcome:
    """Select, then (unless a dry run) send the messages through the current config again."""
    req.check()
    selection = store.select_for_replay(
        ids=req.ids,
        channel=req.channel,
        status=req.status,
        destination=req.destination,
        since=req.since,
        until=req.until,
        limit=req.limit,
    )
    if dry_run or not selection:
        return ReplayOutcome(selection, 0, dry_run)
    n = store.replay(selection, who=who.name, why=why, criteria=req.criteria())
    audit.write(
        store,
        who,
        audit.REPLAY,
        target=f"messages:{len(selection)}",
        reason=why,
        detail={"criteria": req.criteria(), "message_ids": [m for m, _ in selection][:1000]},
        source=source,
    )
    return ReplayOutcome(selection, n, False)


# ------------------------------------------------------------------ pause / resume


def paused(store: Store) -> dict[tuple[str, str], tuple[float, str]]:
    """(kind, name) → (since, who) for everything paused."""
    with store.engine.connect() as conn:
        return {(r.kind, r.name): (r.at, r.who) for r in conn.execute(select(PAUSES)).all()}


def set_paused(
    store: Store, who: Principal, kind: str, name: str, pause: bool, *, reason: str = "", source: str = ""
) -> bool:
    """Pause or resume a channel's processing or a destination's delivery; False if it already was."""
    if kind not in PAUSE_KINDS:
        raise OperationError(f"cannot pause a {kind!r}: use channel or destination")
    with store.write() as conn:
        current = conn.execute(
            select(PAUSES.c.at).where(PAUSES.c.kind == kind, PAUSES.c.name == name)
        ).first()
        if pause == (current is not None):
            return False
        if pause:
            conn.execute(PAUSES.insert().values(kind=kind, name=name, at=time.time(), who=who.name[:200]))
        else:
            conn.execute(delete(PAUSES).where(PAUSES.c.kind == kind, PAUSES.c.name == name))
        audit.record(
            conn,
            who,
            audit.PAUSE if pause else audit.RESUME,
            target=f"{kind}:{name}",
            reason=reason,
            source=source,
        )
    return True
