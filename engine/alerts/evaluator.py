"""The alert evaluator: observations in, notices out.  Pure: no I/O, time from the clock it is given.

One incident per (rule, subject).  The condition must hold for the rule's ``for`` before the incident
opens (one ``firing`` notice), and be clear for its ``clear_for`` before the incident is resolved (one
``resolved`` notice); a relapse inside ``clear_for`` continues the same incident.  A subject that keeps
coming back soon after a resolve needs twice the quiet each time (up to an hour), so even a slow flapper
yields a few incidents an hour, never a storm.  ``repeat_every`` reminds while an incident stays firing.
Outside a rule's active hours no incident opens; one already open goes on until its condition clears.

Notices carry names of channels, destinations and certificate files, numbers and times: never PHI.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from engine.alerts.config import (
    CHANNEL_SILENT,
    DESTINATION_FAILING,
    ERROR_RATE,
    OLDEST_PENDING,
    QUEUE_DEPTH,
    TLS_EXPIRY,
    AlertRule,
    AlertsConfig,
    format_duration,
)

FLAP_MEMORY = 3600.0  # an incident opening this soon after the last one resolved counts as a relapse
MAX_DAMPED_CLEAR_FOR = 3600.0


# --------------------------------------------------------------------------- observations


@dataclass(frozen=True)
class ChannelObs:
    """A channel's messages by look-back window: window seconds → status → messages received in it."""

    counts: Mapping[float, Mapping[str, int]] = field(default_factory=dict)
    last_received_at: float | None = None  # newest message inside the longest window; None = none

    def received(self, window: float) -> int:
        return sum(self.counts.get(window, {}).values())

    def errored(self, window: float, statuses: tuple[str, ...]) -> int:
        c = self.counts.get(window, {})
        return sum(c.get(s, 0) for s in statuses)


@dataclass(frozen=True)
class DestinationObs:
    pending: int = 0
    oldest_pending_at: float | None = None  # created_at of the oldest pending delivery
    consecutive_failures: int = 0  # failed attempts since the last successful delivery
    delivered: int = 0  # counters since the engine started (for the notice text)
    failed: int = 0
    dead: int = 0


@dataclass(frozen=True)
class CertObs:
    """A certificate file the engine uses: when it expires, or why it could not be read."""

    not_after: float | None = None
    error: str = ""
    owners: tuple[str, ...] = ()  # "channel adt", "destination fhir-main", "rule tls-extra"


@dataclass(frozen=True)
class Snapshot:
    at: float
    channels: Mapping[str, ChannelObs] = field(default_factory=dict)
    destinations: Mapping[str, DestinationObs] = field(default_factory=dict)
    certs: Mapping[str, CertObs] = field(default_factory=dict)  # path → observation


# --------------------------------------------------------------------------- notices


FIRING = "firing"
RESOLVED = "resolved"


@dataclass(frozen=True)
class Notice:
    state: str  # firing | resolved
    incident: str  # stable id for the incident (same on its firing, reminders and resolved notices)
    rule: str
    kind: str
    subject_type: str  # channel | destination | certificate
    subject: str
    summary: str
    value: float | None
    threshold: float
    opened_at: float
    at: float
    sinks: tuple[str, ...] = ()
    resolved_at: float | None = None
    reminder: int = 0  # 0 = the first firing notice; n = the nth reminder

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (webhook body, log fields): ISO 8601 UTC times."""

        def iso(t: float | None) -> str | None:
            return None if t is None else datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")

        return {
            "state": self.state,
            "incident": self.incident,
            "rule": self.rule,
            "kind": self.kind,
            "subject": {"type": self.subject_type, "name": self.subject},
            "summary": self.summary,
            "value": self.value,
            "threshold": self.threshold,
            "opened_at": iso(self.opened_at),
            "resolved_at": iso(self.resolved_at),
            "at": iso(self.at),
            "reminder": self.reminder,
        }


@dataclass(frozen=True)
class Check:
    """One rule on one subject at one time: is it bad, the value, and words for a person."""

    bad: bool
    value: float | None
    text: str


# --------------------------------------------------------------------------- the conditions


def _pct(x: float) -> str:
    return f"{x * 100:.3g}%"


def check_rule(rule: AlertRule, subject: str, snap: Snapshot, active_since: float | None) -> Check | None:
    """The rule's condition on one subject, or None when the snapshot has nothing on it."""
    k = rule.kind
    if k in (ERROR_RATE, CHANNEL_SILENT):
        ch = snap.channels.get(subject)
        if ch is None:
            return None
        if k == ERROR_RATE:
            n = ch.received(rule.window)
            e = ch.errored(rule.window, rule.statuses)
            rate = e / n if n else 0.0
            return Check(
                n >= max(1, rule.min_messages) and rate > rule.threshold,
                rate,
                f"channel {subject}: {e} of {n} messages failed in the last {format_duration(rule.window)} "
                f"({_pct(rate)}; threshold {_pct(rule.threshold)})",
            )
        # Silence is counted from the last message, or from the start of the active hours if later
        # (the night before does not count against a clinic-hours rule).
        since = ch.last_received_at
        if active_since is not None and (since is None or since < active_since):
            since = active_since
        if since is None:  # no message within the look-back window and no active hours
            quiet = rule.threshold + 1.0
            said = f"more than {format_duration(rule.threshold)}"
        else:
            quiet = max(0.0, snap.at - since)
            said = format_duration(quiet)
        return Check(
            quiet > rule.threshold,
            quiet,
            f"channel {subject}: no message for {said} (threshold {format_duration(rule.threshold)})",
        )
    if k in (QUEUE_DEPTH, OLDEST_PENDING, DESTINATION_FAILING):
        d = snap.destinations.get(subject)
        if d is None:
            return None
        if k == QUEUE_DEPTH:
            return Check(
                d.pending > rule.threshold,
                float(d.pending),
                f"destination {subject}: {d.pending} deliveries pending (threshold {int(rule.threshold)})",
            )
        if k == OLDEST_PENDING:
            age = 0.0 if d.oldest_pending_at is None else max(0.0, snap.at - d.oldest_pending_at)
            return Check(
                age > rule.threshold,
                age,
                f"destination {subject}: the oldest of {d.pending} pending deliveries has waited "
                f"{format_duration(age)} (threshold {format_duration(rule.threshold)})",
            )
        return Check(
            d.consecutive_failures >= rule.threshold,
            float(d.consecutive_failures),
            f"destination {subject}: {d.consecutive_failures} delivery attempts failed in a row "
            f"(threshold {int(rule.threshold)}); {d.pending} deliveries pending",
        )
    assert k == TLS_EXPIRY
    c = snap.certs.get(subject)
    if c is None:
        return None
    used = f" ({', '.join(c.owners)})" if c.owners else ""
    if c.not_after is None:
        return Check(True, None, f"certificate {subject}{used} cannot be read: {c.error or 'unknown error'}")
    left = c.not_after - snap.at
    when = datetime.fromtimestamp(c.not_after, UTC).strftime("%Y-%m-%d %H:%M UTC")
    said = f"expired {format_duration(-left)} ago" if left <= 0 else f"expires in {format_duration(left)}"
    return Check(
        left < rule.threshold,
        left,
        f"certificate {subject}{used} {said}, on {when} (threshold {format_duration(rule.threshold)})",
    )


def subjects(rule: AlertRule, snap: Snapshot) -> list[str]:
    """What a rule watches in a snapshot: its channel/destination/files, or every one the engine has."""
    if rule.kind in (ERROR_RATE, CHANNEL_SILENT):
        return [rule.channel] if rule.channel else sorted(snap.channels)
    if rule.kind in (QUEUE_DEPTH, OLDEST_PENDING, DESTINATION_FAILING):
        return [rule.destination] if rule.destination else sorted(snap.destinations)
    if not (rule.channel or rule.destination or rule.files):  # the engine's own, not other rules' files
        return sorted(p for p, c in snap.certs.items() if any(not o.startswith("rule ") for o in c.owners))
    wanted = {f"channel {rule.channel}", f"destination {rule.destination}", f"rule {rule.name}"}
    return sorted(p for p, c in snap.certs.items() if wanted & set(c.owners))


# --------------------------------------------------------------------------- incidents


@dataclass
class Incident:
    id: str
    opened_at: float
    clear_for: float
    notified_at: float
    reminders: int = 0
    clear_since: float | None = None
    last: Check | None = None


@dataclass
class _Track:
    """What the evaluator remembers about one (rule, subject)."""

    pending_since: float | None = None
    incident: Incident | None = None
    resolved_at: float | None = None
    relapses: int = 0  # incidents in a row that opened soon after the previous one resolved


class Evaluator:
    """Turns a series of snapshots into firing and resolved notices (see the module doc)."""

    def __init__(self, config: AlertsConfig, clock: Callable[[], float]):
        self.config = config
        self.clock = clock
        self.tracks: dict[tuple[str, str], _Track] = {}

    def open_incidents(self) -> list[tuple[AlertRule, str, Incident]]:
        rules = {r.name: r for r in self.config.rules}
        return [
            (rules[name], subject, t.incident)
            for (name, subject), t in sorted(self.tracks.items())
            if t.incident is not None and name in rules
        ]

    def evaluate(self, snap: Snapshot) -> list[Notice]:
        now = self.clock()
        out: list[Notice] = []
        for rule in self.config.rules:
            for subject in subjects(rule, snap):
                track = self.tracks.setdefault((rule.name, subject), _Track())
                since = None
                if rule.hours is not None:
                    since = rule.hours.active_since(now, self.config.zone_for(rule, subject))
                active = rule.hours is None or since is not None
                # Active hours decide when an incident may open; an open one is judged on the facts
                # alone (a channel silent since last evening is still silent at 07:05).
                check = check_rule(rule, subject, snap, since if track.incident is None else None)
                if check is None:
                    continue
                notice = self._step(rule, subject, track, check, active, now)
                if notice is not None:
                    out.append(notice)
        return out

    def _step(
        self, rule: AlertRule, subject: str, t: _Track, check: Check, active: bool, now: float
    ) -> Notice | None:
        inc = t.incident
        if inc is None:
            if not (check.bad and active):
                t.pending_since = None
                return None
            if t.pending_since is None:
                t.pending_since = now
            if now - t.pending_since < rule.for_:
                return None
            relapse = t.resolved_at is not None and now - t.resolved_at < FLAP_MEMORY
            t.relapses = t.relapses + 1 if relapse else 0
            clear_for = rule.clear_for
            if t.relapses:  # even clear_for: 0 gets damped (from one evaluation period up)
                base = max(rule.clear_for, self.config.evaluate_every)
                clear_for = min(base * 2**t.relapses, max(base, MAX_DAMPED_CLEAR_FOR))
            digest = hashlib.sha256(f"{rule.name}\0{subject}\0{now!r}".encode()).hexdigest()[:16]
            t.incident = inc = Incident(
                digest, opened_at=now, clear_for=clear_for, notified_at=now, last=check
            )
            t.pending_since = None
            return self._notice(FIRING, rule, subject, inc, check, now)
        if check.bad:
            inc.clear_since = None
            inc.last = check
            if rule.repeat_every is not None and now - inc.notified_at >= rule.repeat_every:
                inc.notified_at = now
                inc.reminders += 1
                return self._notice(FIRING, rule, subject, inc, check, now)
            return None
        if inc.clear_since is None:
            inc.clear_since = now
        if now - inc.clear_since < inc.clear_for:
            return None
        t.incident = None
        t.resolved_at = now
        return self._notice(RESOLVED, rule, subject, inc, check, now)

    @staticmethod
    def _notice(state: str, rule: AlertRule, subject: str, inc: Incident, check: Check, now: float) -> Notice:
        text = (
            check.text
            if state == FIRING
            else f"resolved after {format_duration(now - inc.opened_at)}: {check.text}"
        )
        return Notice(
            state=state,
            incident=inc.id,
            rule=rule.name,
            kind=rule.kind,
            subject_type=rule.subject_type,
            subject=subject,
            summary=text,
            value=check.value,
            threshold=rule.threshold,
            opened_at=inc.opened_at,
            at=now,
            sinks=rule.sinks,
            resolved_at=now if state == RESOLVED else None,
            reminder=inc.reminders if state == FIRING else 0,
        )
