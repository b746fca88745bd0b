"""What a FHIR resource becomes on its way to an HL7 v2 receiver, and which message to send (pure).

A resource converts to an :class:`Outbound`: its business key (SCH-1 / PID-3 / ORC-2), its state
(active, cancelled, noshow, deleted), a digest of everything the HL7 message carries and one of its
times, and a payload for each message it may become.  :func:`decide` picks one from what was last sent
for the same key (``engine/writeback.py`` keeps that per key in the store):

=================  ===============  ===========  ==============
what was sent      now active       now          now cancelled
                                    (same HL7)   / noshow / del.
=================  ===============  ===========  ==============
nothing            new (S12)        -            nothing (counted)
active             S13 when the     nothing      S15 / S26 / S17
                   time changed,                 (deleted: A29,
                   else S14                      ORC-1 CA)
cancelled, ...     new (S12 again)  -            nothing
=================  ===============  ===========  ==============
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

ACTIVE = "active"
CLOSED_STATES = ("cancelled", "noshow", "deleted")

# event name -> message per resource type: SIU triggers, ADT triggers, ORC-1 order control codes
EVENTS: dict[str, dict[str, str]] = {
    "Appointment": {
        "new": "S12",
        "reschedule": "S13",
        "modify": "S14",
        "cancelled": "S15",
        "noshow": "S26",
        "deleted": "S17",
    },
    "Patient": {"new": "A28", "modify": "A31", "deleted": "A29"},
    "ServiceRequest": {"new": "NW", "modify": "XO", "cancelled": "CA", "deleted": "CA"},
}

# A resource deleted on the server, as a fhir-poll source stores it (engine/sources/history.py): the last
# version taken, tagged so (meta.tag); it converts as state "deleted" (S17, A29, ORC-1 CA).
DELETED_TAG: dict[str, str] = {
    "system": "urn:sluice:fhir-poll",
    "code": "deleted",
    "display": "deleted on the server (taken from its _history)",
}


def is_deleted(resource: Mapping[str, object]) -> bool:
    """Whether a resource is a deletion's tombstone (carries :data:`DELETED_TAG`)."""
    meta = resource.get("meta")
    tags = meta.get("tag") if isinstance(meta, Mapping) else None
    if not isinstance(tags, list):
        return False
    for t in tags:
        if (
            isinstance(t, Mapping)
            and t.get("system") == DELETED_TAG["system"]
            and t.get("code") == DELETED_TAG["code"]
        ):
            return True
    return False


# What happened instead of a message (counted per reason: sluice_writeback_skipped_total)
UNCHANGED = "unchanged"
NEVER_SENT = "cancel_never_sent"
ALREADY_CLOSED = "already_closed"


@dataclass(frozen=True)
class Outbound:
    """A resource in its HL7 v2 form: the candidate messages and what the decision needs."""

    resource_type: str
    key: str  # business key, e.g. "Appointment|urn:portal:appointment|A-1" (hashed before it is stored)
    state: str  # ACTIVE or one of CLOSED_STATES
    content: str  # digest of everything the HL7 message carries (not MSH-7/MSH-10/trigger)
    timing: str  # digest of the times (start, end, duration): a change of it makes a reschedule
    variants: Mapping[str, bytes] = field(default_factory=dict)  # message (S12, A31, NW...) -> payload


@dataclass(frozen=True)
class Sent:
    """What was last sent for a key (the store's row, with the digests as stored)."""

    state: str
    content: str
    timing: str
    message: str  # S12, A28, NW...


def candidates(resource_type: str, state: str) -> tuple[str, ...]:
    """The messages a resource in ``state`` may become (the payloads :class:`Outbound` carries)."""
    events = EVENTS[resource_type]
    if state == ACTIVE:
        return tuple(dict.fromkeys(events[e] for e in ("new", "reschedule", "modify") if e in events))
    msg = events.get(state)
    return (msg,) if msg else ()


def decide(out: Outbound, prev: Sent | None) -> tuple[str | None, str]:
    """(message to send or None, reason when none): see the module's table."""
    events = EVENTS[out.resource_type]
    if out.state != ACTIVE:
        if out.state not in events:
            return None, UNCHANGED  # e.g. a Patient has no cancel message
        if prev is None:
            return None, NEVER_SENT
        if prev.state != ACTIVE:
            return None, ALREADY_CLOSED
        return events[out.state], ""
    if prev is None or prev.state != ACTIVE:
        return events["new"], ""
    if prev.content == out.content:
        return None, UNCHANGED
    if prev.timing != out.timing and "reschedule" in events:
        return events["reschedule"], ""
    return events["modify"], ""
