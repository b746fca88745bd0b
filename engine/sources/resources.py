"""A FHIR resource as a stored message (pure): the row it becomes and the header its pipeline sees.

The body (``raw``) is the resource's JSON exactly as the server sent it; the content type is told by
the first byte (``{``: FHIR JSON; an HL7 v2 message always starts with ``MSH``, ``FHS`` or ``BHS``).
The metadata columns hold what the MSH of an HL7 message would:

* ``message_type``: the resource type, in the column's 10 characters (:data:`TYPE_CODES` abbreviates
  the longer ones: ``Appointmnt``, ``ServiceReq``), ``trigger`` empty (``DELETE`` for a deletion's
  tombstone, engine/sources/history.py; its header's MSH-9.2 too), ``version`` ``R4``;
* ``control_id``: ``<type>/<id>/_history/<versionId>`` (``meta.versionId``; without one, a digest of
  the body stands in), so the channel's dedupe (``sending_app|sending_facility|control_id``) drops a
  version taken twice, whatever the overlap window or a restart fetched again;
* ``sending_app`` the source kind (``fhir-poll``), ``sending_facility`` the server's host and port;
* ``order_key``: the channel's ``order_by`` (a dotted FHIRPath such as
  ``Appointment.participant.actor.reference``: its first value), else ``<type>/<id>``: the versions of one
  resource (or everything of one patient) are processed and delivered in order.

A channel's filters and steps see a :class:`~engine.hl7.Message` made of that header (:func:`header`):
``MSH-9.1`` is the resource type, ``MSH-10`` the version id, so ``{field: MSH-9.1, in: [Appointment]}``
filters FHIR channels too.  The resource itself is the Work's payload (``application/fhir+json``).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from engine import hl7
from engine.store import NewMessage
from transforms.fhir_to_v2.outbound import is_deleted

CONTENT_FHIR = "application/fhir+json"

# Resource type → the 10-character message_type column (a type longer than 10 characters is cut).
TYPE_CODES: dict[str, str] = {"Appointment": "Appointmnt", "ServiceRequest": "ServiceReq"}


def parse_instant(value: str) -> datetime | None:
    """A FHIR instant (``meta.lastUpdated``) → an aware datetime (no zone: UTC); ``None`` if it is not one."""
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def instant(t: datetime) -> str:
    """An aware datetime → a FHIR instant in UTC with milliseconds (``2026-12-04T10:00:00.000Z``)."""
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_fhir(raw: bytes) -> bool:
    """Whether a stored body is a FHIR resource (JSON) rather than an HL7 v2 message."""
    return raw[:1] == b"{" or raw.lstrip()[:1] == b"{"


def type_code(resource_type: str) -> str:
    return TYPE_CODES.get(resource_type, resource_type[:10])


def version_id(resource: dict[str, Any], raw: bytes) -> str:
    meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
    v = str((meta or {}).get("versionId") or "")
    return v or "b" + hashlib.blake2b(raw, digest_size=8).hexdigest()


def control_id(resource: dict[str, Any], raw: bytes) -> str:
    return (
        f"{resource.get('resourceType', '')}/{resource.get('id', '')}/_history/{version_id(resource, raw)}"[
            :200
        ]
    )


def message_row(
    channel: str,
    resource: dict[str, Any],
    raw: bytes,
    *,
    source: str,
    facility: str,
    received_at: float,
    dedupe: bool = True,
    order_by: str | None = None,
) -> NewMessage:
    """The messages-table row of one resource version."""
    rtype = str(resource.get("resourceType") or "")
    row = NewMessage(channel=channel, received_at=received_at, peer=facility[:100], raw=raw)
    row.content_hash = hashlib.blake2b(raw, digest_size=16).hexdigest()
    row.control_id = control_id(resource, raw)
    row.sending_app = source[:200]
    row.sending_facility = facility[:200]
    row.message_type = type_code(rtype)
    if is_deleted(resource):
        row.trigger = "DELETE"  # a deletion's tombstone (engine/sources/history.py)
    row.version = "R4"
    row.order_key = (
        path_value(resource, order_by) if order_by else ""
    ) or f"{rtype}/{resource.get('id', '')}"
    row.order_key = row.order_key[:300]
    row.dedupe_key = f"{row.sending_app}|{row.sending_facility}|{row.control_id}" if dedupe else ""
    return row


def path_value(resource: dict[str, Any], path: str) -> str:
    """The first text value of a dotted FHIRPath (``Appointment.participant.actor.reference``): lists are
    walked in order; a path whose type is not the resource's gives ``""``."""
    rtype, *names = path.split(".")
    if resource.get("resourceType") != rtype:
        return ""
    values: list[Any] = [resource]
    for name in names:
        nxt: list[Any] = []
        for v in values:
            got = v.get(name) if isinstance(v, dict) else None
            if isinstance(got, list):
                nxt.extend(got)
            elif got is not None:
                nxt.append(got)
        values = nxt
    for v in values:
        if isinstance(v, str | int | float) and not isinstance(v, bool) and str(v):
            return str(v)
    return ""


def header(raw: bytes) -> hl7.Message:
    """The HL7-style header a FHIR resource's pipeline sees (filters, logs): see the module doc."""
    import orjson

    try:
        res = orjson.loads(raw)
    except orjson.JSONDecodeError:
        res = {}
    if not isinstance(res, dict):
        res = {}
    esc = hl7.escape
    rtype = esc(str(res.get("resourceType") or ""))
    control = esc(control_id(res, raw))
    event = "^DELETE" if is_deleted(res) else ""
    return hl7.parse(f"MSH|^~\\&|FHIR||||||{rtype}{event}|{control}|P|R4")
