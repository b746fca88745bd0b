"""Deletions from a FHIR server's type-level history (pure): what the server supports, what a history page
says, and the stored form of a deletion.

FHIR R4 §3.1.0.4: ``GET [base]/[type]/_history?_since=...&_count=...`` answers a ``history`` Bundle, newest
first, more pages by ``link`` ``next``.  A deleted version is an entry without a resource whose
``request.method`` is ``DELETE`` (``response.status`` ``410 Gone`` on most servers), with the time in
``response.lastModified`` and the new version in ``response.etag`` (``W/"3"``).

A deletion becomes a stored message like any resource version (engine/sources/resources.py): a
*tombstone*, the last version of the resource the channel took (its identifiers are what the receiver
knows it by: SCH-1, PID-3, ORC-2), with ``meta.versionId`` and ``meta.lastUpdated`` of the deletion and the
tag :data:`~transforms.fhir_to_v2.outbound.DELETED_TAG`.  Without a version taken before (never seen, or its
body dropped by retention) the tombstone holds only ``resourceType``, ``id`` and that ``meta``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

from engine.sources.resources import parse_instant
from transforms.fhir_to_v2.outbound import DELETED_TAG, is_deleted

HISTORY_TYPE = "history-type"
_ETAG = re.compile(r'^(?:W/)?"?([^"]*)"?$')
_HISTORY_URL = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/([^/?#]+))?/?$")


@dataclass(frozen=True)
class Deletion:
    """One deleted version read from a history page."""

    resource_type: str
    id: str
    version: str  # the deletion's versionId ("" when the server gave none)
    at: datetime | None  # when it was deleted (response.lastModified)

    @property
    def ref(self) -> str:
        return f"{self.resource_type}/{self.id}"


@dataclass(frozen=True)
class HistoryPage:
    deletions: tuple[Deletion, ...]
    newest: datetime | None  # the newest time of any entry (versions and deletions)
    next_url: str  # "" on the last page
    entries: int


def history_types(capability: Any) -> frozenset[str] | None:
    """The resource types a CapabilityStatement says have type-level history (``history-type``); ``None``
    when ``capability`` is not a CapabilityStatement (the server has none at /metadata)."""
    if not isinstance(capability, Mapping) or capability.get("resourceType") != "CapabilityStatement":
        return None
    found: set[str] = set()
    for rest in capability.get("rest", ()) or ():
        if not isinstance(rest, Mapping) or rest.get("mode", "server") != "server":
            continue
        for res in rest.get("resource", ()) or ():
            if not isinstance(res, Mapping):
                continue
            codes = {i.get("code") for i in res.get("interaction", ()) or () if isinstance(i, Mapping)}
            if HISTORY_TYPE in codes and isinstance(res.get("type"), str):
                found.add(res["type"])
        # a system-level history-type interaction is not per type: R4 lists it under rest.interaction
        # as history-system, which does not say the type history is there; only the per-type one counts
    return frozenset(found)


def _version_of(entry: Mapping[str, Any]) -> str:
    response = entry.get("response") if isinstance(entry.get("response"), Mapping) else {}
    etag = str((response or {}).get("etag") or "").strip()
    if etag and (m := _ETAG.match(etag)) and m.group(1):
        return m.group(1)
    for url in ((response or {}).get("location"), entry.get("fullUrl")):
        if isinstance(url, str) and (m := _HISTORY_URL.search(url.split("?")[0])) and m.group(3):
            return m.group(3)
    return ""


def _target(entry: Mapping[str, Any], resource_type: str) -> str:
    """The deleted resource's id, from ``request.url`` (``Appointment/123``) or ``fullUrl``."""
    request = entry.get("request") if isinstance(entry.get("request"), Mapping) else {}
    for url in ((request or {}).get("url"), entry.get("fullUrl")):
        if (
            isinstance(url, str)
            and (m := _HISTORY_URL.search(url.split("?")[0]))
            and m.group(1) == resource_type
        ):
            return m.group(2)
    return ""


def parse_page(bundle: Mapping[str, Any], resource_type: str) -> HistoryPage:
    """The deletions of ``resource_type`` on one history page, the newest time on it and its next link."""
    deletions: list[Deletion] = []
    newest: datetime | None = None
    entries = [e for e in bundle.get("entry", ()) or () if isinstance(e, Mapping)]
    for e in entries:
        request = e.get("request") if isinstance(e.get("request"), Mapping) else {}
        response = e.get("response") if isinstance(e.get("response"), Mapping) else {}
        resource = e.get("resource") if isinstance(e.get("resource"), Mapping) else None
        at = parse_instant(str((response or {}).get("lastModified") or ""))
        if at is None and resource is not None:
            at = parse_instant(str((resource.get("meta") or {}).get("lastUpdated") or ""))
        if at is not None and (newest is None or at > newest):
            newest = at
        method = str((request or {}).get("method") or "").upper()
        gone = str((response or {}).get("status") or "").startswith("410")
        if method == "DELETE" or (resource is None and gone):
            rid = _target(e, resource_type)
            if rid:
                deletions.append(Deletion(resource_type, rid, _version_of(e), at))
    next_url = ""
    for link in bundle.get("link", ()) or ():
        if isinstance(link, Mapping) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            next_url = link["url"]
    return HistoryPage(tuple(deletions), newest, next_url, len(entries))


def follow(next_url: str, base_url: str) -> str:
    """The URL to request for a ``next`` link: a relative link is resolved against the base; an absolute
    one on another origin (a server behind a proxy names itself by its inside address) is sent to the
    base's scheme and host with its path and query, so credentials never go to another host."""
    url = urljoin(base_url.rstrip("/") + "/", next_url)
    u, b = urlsplit(url), urlsplit(base_url)
    if (u.scheme, u.netloc) != (b.scheme, b.netloc):
        url = urlunsplit((b.scheme, b.netloc, u.path, u.query, ""))
    return url


def tombstone(deletion: Deletion, last: Mapping[str, Any] | None, instant: str) -> dict[str, Any]:
    """The stored resource of a deletion: the last version taken (else only type and id) with the
    deletion's ``meta.versionId``/``lastUpdated`` and :data:`DELETED_TAG` (see the module doc)."""
    usable = (
        last is not None
        and last.get("resourceType") == deletion.resource_type
        and str(last.get("id") or "") == deletion.id
    )
    res: dict[str, Any] = dict(last) if usable and last is not None else {}
    res["resourceType"] = deletion.resource_type
    res["id"] = deletion.id
    meta = dict(res.get("meta") or {}) if isinstance(res.get("meta"), Mapping) else {}
    meta["versionId"] = deletion.version or ("deleted-" + instant if instant else "deleted")
    if instant:
        meta["lastUpdated"] = instant
    else:
        meta.pop("lastUpdated", None)
    tags = [
        t
        for t in meta.get("tag", ()) or ()
        if not (isinstance(t, Mapping) and is_deleted({"meta": {"tag": [t]}}))
    ]
    meta["tag"] = [*tags, dict(DELETED_TAG)]
    res["meta"] = meta
    return res
