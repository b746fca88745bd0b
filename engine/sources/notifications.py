"""FHIR Subscription notifications that carry no resource (pure): what one asks of the engine.

A ``kind: http`` source (engine/sources/http.py) takes the focus resources a *full-resource* notification
carries as any pushed resource.  The others say only that something changed:

* an **R4 rest-hook** with payload omitted: a POST with an empty body ("something matching your criteria
  changed, come and look"), and an R4 backport / R4B / R5 event notification without focus;
* an **id-only** notification (R4B/R5 ``subscription-notification`` Bundle, or the R4 backport's
  ``history`` Bundle): entries with a ``fullUrl`` and no ``resource``, and the status's
  ``notificationEvent.focus`` references (R4 backport: the ``Parameters`` ``notification-event`` parts
  named ``focus``);
* ``handshake``, ``heartbeat``, ``query-status`` and ``query-event`` notifications: nothing changed.

:func:`read` says which, and :func:`focus` turns a focus reference into the URL to read under the
configured ``fetch.base_url``, refusing any other: the engine never fetches a URL a client names
elsewhere (its credentials would go with the request).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

STATUS_TYPES = frozenset({"SubscriptionStatus", "Parameters"})
# SubscriptionStatus.type (R4B/R5; the R4 backport's Parameters "type"): the ones that change nothing
QUIET = frozenset({"handshake", "heartbeat", "query-status", "query-event"})
EVENT = "event-notification"
_TAIL = re.compile(
    r"(?:^|/)([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?/?$"
)
_REF = re.compile(r"^([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(?:/_history/([A-Za-z0-9\-.]{1,64}))?$")


@dataclass(frozen=True)
class Notification:
    """What a pushed Bundle without resources is (:func:`read`)."""

    # "" not a notification (or every focus is carried in full); a QUIET type; "empty" (an event without
    # focus); "id-only" (focus to read: none carried, or some carried and some not, e.g. an R5 deletion)
    kind: str
    focus: tuple[str, ...] = ()  # id-only: the focus references, as sent (fullUrl / focus.reference)


@dataclass(frozen=True)
class Focus:
    """A focus reference resolved under the fetch base: the URL to read, the type, id and version."""

    url: str
    resource_type: str
    id: str
    version: str  # "" without /_history/{version}: the current version is read

    @property
    def ref(self) -> str:
        return f"{self.resource_type}/{self.id}"


class ForeignFocus(ValueError):
    """A focus reference the engine will not read (not under ``fetch.base_url``, or not a resource URL)."""


def _status_type(status: Mapping[str, Any]) -> str:
    if status.get("resourceType") == "SubscriptionStatus":
        return str(status.get("type") or "")
    for p in status.get("parameter", ()) or ():
        if isinstance(p, Mapping) and p.get("name") == "type":
            return str(p.get("valueCode") or "")
    return ""


def _focus_refs(status: Mapping[str, Any]) -> list[str]:
    refs: list[str] = []
    if status.get("resourceType") == "SubscriptionStatus":
        for ev in status.get("notificationEvent", ()) or ():
            focus = ev.get("focus") if isinstance(ev, Mapping) else None
            if isinstance(focus, Mapping) and isinstance(focus.get("reference"), str):
                refs.append(focus["reference"])
        return refs
    for p in status.get("parameter", ()) or ():  # the R4 backport's Parameters
        if isinstance(p, Mapping) and p.get("name") == "notification-event":
            for part in p.get("part", ()) or ():
                if isinstance(part, Mapping) and part.get("name") == "focus":
                    ref = part.get("valueReference")
                    if isinstance(ref, Mapping) and isinstance(ref.get("reference"), str):
                        refs.append(ref["reference"])
    return refs


def _ref_key(ref: str) -> str:
    """``Type/id`` of a reference (relative or absolute, with or without ``/_history/{version}``)."""
    m = _TAIL.search(ref.split("?", 1)[0])
    return f"{m.group(1)}/{m.group(2)}" if m else ref


def read(bundle: Mapping[str, Any]) -> Notification:
    """What a Bundle whose entries carry no resource to store asks for (``kind`` ``""``: it is no
    subscription notification, e.g. an empty transaction)."""
    entries = [e for e in bundle.get("entry", ()) or () if isinstance(e, Mapping)]
    first = entries[0].get("resource") if entries else None
    if not isinstance(first, Mapping) or first.get("resourceType") not in STATUS_TYPES:
        return Notification("")
    kind = _status_type(first)
    if kind in QUIET:
        return Notification(kind)
    refs = [
        e["fullUrl"]
        for e in entries[1:]
        if not isinstance(e.get("resource"), Mapping) and isinstance(e.get("fullUrl"), str)
    ]
    refs += _focus_refs(first)
    carried = {
        f"{r.get('resourceType')}/{r.get('id')}"
        for e in entries[1:]
        if isinstance(r := e.get("resource"), Mapping)
    }  # focus the notification carries in full is not read again
    refs = [r for r in dict.fromkeys(r.strip() for r in refs if r.strip()) if _ref_key(r) not in carried]
    if refs:
        return Notification("id-only", tuple(refs))
    return Notification("empty" if not carried else "")


def focus(ref: str, base_url: str) -> Focus:
    """The URL to read for focus reference ``ref``: relative (``Appointment/123``, ``.../_history/2``) under
    ``base_url``, or absolute only when under ``base_url`` (same scheme, host and port, and path below
    its path); :class:`ForeignFocus` otherwise."""
    base = urlsplit(base_url)
    u = urlsplit(ref)
    if u.scheme or u.netloc:
        same = (
            u.scheme.lower() == base.scheme.lower()
            and u.netloc.lower() == base.netloc.lower()
            and u.path.startswith(base.path.rstrip("/") + "/")
        )
        if not same or u.query or u.fragment:
            raise ForeignFocus("not under fetch.base_url")
        rest = u.path[len(base.path.rstrip("/")) + 1 :]
    else:
        rest = ref
    m = _REF.match(rest.strip("/"))
    if m is None:
        raise ForeignFocus("not a resource URL (Type/id or Type/id/_history/version)")
    return Focus(f"{base_url.rstrip('/')}/{m.group(0)}", m.group(1), m.group(2), m.group(3) or "")
