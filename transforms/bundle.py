"""The conversion context and the idempotent FHIR transaction Bundle it builds.

Identity rule (one rule, applied to every resource; see docs/mapping.md):

* Every entry is a **conditional update** ``PUT <Type>?identifier=<system>|<value>``.
  Resources with a business identifier (Patient: PID-3, Encounter: PV1-19, ...) use it.
  Resources without one (Condition from DG1, AllergyIntolerance from AL1, Location, ...)
  get a Sluice key identifier ``{system: urn:sluice:key, value: <uuid5 of the business key>}``
  so the same message content always addresses the same resource.
* ``fullUrl`` is ``urn:uuid:<uuid5(conditional url)>``: deterministic, and every intra-bundle
  reference uses it, so the server resolves references to whatever resource the conditional
  update matched or created.  Replaying or resending a message never creates a second resource.
* The *resource key* (what ``guards`` and ``requires`` name) is the conditional URL itself,
  e.g. ``Patient?identifier=urn:oid:1.2.3|12345``: the engine can check it with a search.

Hot path: plain dicts only, no models.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

from engine import redact
from engine.errors import Location, MessageRejected
from engine.hl7 import Message
from transforms.settings import ConvertSettings

SLUICE_KEY_SYSTEM: Final = "urn:sluice:key"
"""System of the derived business-key identifier for resources without a natural identifier."""

NAMESPACE = uuid.UUID("5e1c0b7a-3f4d-5b6e-8a9c-0d1e2f3a4b5c")
"""uuid5 namespace for every deterministic id Sluice makes (fixed forever: changing it breaks idempotence)."""

# Status ranks for guards: a lower rank never overwrites a higher one.
OBSERVATION_STATUS_RANK = {
    "registered": 1,
    "preliminary": 2,
    "final": 3,
    "amended": 4,
    "corrected": 4,
    "cancelled": 5,
    "entered-in-error": 6,
}


_NS_BYTES: Final = NAMESPACE.bytes
# SHA-1 state after the namespace: each uuid5 copies it and hashes only the name (OpenSSL's per-hash setup is
# most of the cost of hashing a short name)
_NS_SHA1: Final = hashlib.sha1(_NS_BYTES)
# uuid5's variant: the 17th hex digit keeps its low two bits under the high bits 10 (RFC 4122 4.1.1)
_VARIANT: Final = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def uuid5(text: str) -> str:
    """``str(uuid.uuid5(NAMESPACE, text))``, uncached: for names that rarely recur (the caller keeps what
    recurs).  The hex digest is formatted directly: digit 13 is the version (5), digit 17 the variant."""
    h = _NS_SHA1.copy()
    h.update(text.encode("utf-8"))
    x = h.hexdigest()
    return f"{x[:8]}-{x[8:12]}-5{x[13:16]}-{_VARIANT[x[16]]}{x[17:20]}-{x[20:32]}"


@lru_cache(maxsize=16384)
def det_uuid(text: str) -> str:
    """Deterministic UUID (v5) of ``text`` in the Sluice namespace (== ``str(uuid.uuid5(NAMESPACE, text))``).

    Cached: the same practitioners, locations and patients recur across a feed's messages."""
    return uuid5(text)


def copy_json(value: Any) -> Any:
    """A copy of a JSON tree: new dicts and lists, the same (immutable) strings and numbers.

    Each container is copied whole (a dict's table is cloned, not rebuilt key by key), then only its
    dict and list members are replaced by their copies."""
    if isinstance(value, dict):
        d: dict[Any, Any] = value.copy()
        for k, v in value.items():
            if isinstance(v, (dict, list)):
                d[k] = copy_json(v)
        return d
    if isinstance(value, list):
        items: list[Any] = value.copy()
        for i, v in enumerate(value):
            if isinstance(v, (dict, list)):
                items[i] = copy_json(v)
        return items
    return value


def escape_search(value: str) -> str:
    """Escape a token search value: FHIR reserves ``\\ , $ |`` inside parameter values."""
    if "\\" in value or "," in value or "$" in value or "|" in value:
        value = value.replace("\\", "\\\\").replace(",", "\\,").replace("$", "\\$").replace("|", "\\|")
    return value


def _conditional_url(resource_type: str, system: str, value: str) -> str:
    return f"{resource_type}?identifier={escape_search(system)}|{escape_search(value)}"


@lru_cache(maxsize=16384)
def conditional_url(resource_type: str, system: str, value: str) -> str:
    """``Type?identifier=system|value`` with FHIR search escaping (URL-encoding is the sender's job)."""
    return _conditional_url(resource_type, system, value)


# (resource type, system, value) -> (conditional url, fullUrl) and (resource type, business key) -> (key uuid,
# (url, fullUrl)): pure functions of their keys, so one dict lookup per ``add`` instead of three cached calls
_ADDRESSES: Final[dict[tuple[str, str, str], tuple[str, str]]] = {}
_KEY_ADDRESSES: Final[dict[tuple[str, str], tuple[str, tuple[str, str]]]] = {}
_ADDRESSES_MAX: Final = 16384

# FHIR choice elements ([x]) the mappers write: a resource holds one type of each, so a merge never adds an
# effectiveDateTime beside the first one's effectivePeriod (invalid FHIR)
_CHOICE: Final = re.compile(
    r"(value|effective|onset|abatement|occurrence|deceased|multipleBirth|performed|asNeeded|medication|reported"
    r"|collected|start|timing|serviced|product|born|age)[A-Z]"
)


def _choice_taken(old: Mapping[str, Any], key: str) -> bool:
    """Is ``key`` a choice element ([x]) of which ``old`` already holds another type?"""
    m = _CHOICE.match(key)
    if m is None:
        return False
    base = m.group(1)
    return any(k.startswith(base) and (o := _CHOICE.match(k)) is not None and o.group(1) == base for k in old)


def _address(resource_type: str, system: str, value: str, url: str) -> tuple[str, str]:
    addr = (url, "urn:uuid:" + uuid5(url))
    if len(_ADDRESSES) >= _ADDRESSES_MAX:
        _ADDRESSES.clear()
    _ADDRESSES[(resource_type, system, value)] = addr
    return addr


def _put_type_first(resource: dict[str, Any], resource_type: str) -> None:
    """Set ``resourceType`` as the first key, keeping the dict's identity (callers may keep mutating it).

    Hot mappers build their dicts with ``resourceType`` first already: then this is one key lookup."""
    for first in resource:
        if first == "resourceType" and resource[first] == resource_type:
            return
        break
    items = [(k, v) for k, v in resource.items() if k != "resourceType"]
    resource.clear()
    resource["resourceType"] = resource_type
    resource.update(items)


@dataclass(frozen=True, init=False)
class Conversion:
    """The result of converting one message.

    The Bundle is read-only: entries and pieces kept per channel (recurring practitioners, locations, OBX
    codes and ranges: ``ConvertContext.reuse``, ``datatypes.kept_piece``) are shared with other conversions of
    the same settings.  Copy it (``copy.deepcopy``) before changing it.

    ``__init__`` is written out (``object.__setattr__``, as a frozen dataclass's own does): in the compiled
    build a generated dataclass ``__init__`` runs as interpreted Python, ~10,000 instructions a message."""

    bundle: dict[str, Any]
    # counted, PHI-free events, e.g. {"unmapped_code": 2}
    events: Mapping[str, int]
    # (resource key, status rank): the engine must not let a lower rank overwrite a higher one
    guards: tuple[tuple[str, int], ...]
    # resource keys that must already exist on the target (e.g. the prior patient of an A40)
    requires: tuple[str, ...]
    # located, PHI-free warnings: what the conversion changed or dropped instead of rejecting the message,
    # e.g. "PV1-45: discharge date/time before the admit date/time (PV1-44); Encounter.period.end dropped"
    warnings: tuple[str, ...] = ()
    # the kind of each warning (its counted event name, e.g. "encounter_end_before_start"), same order
    warning_kinds: tuple[str, ...] = ()

    def __init__(
        self,
        bundle: dict[str, Any],
        events: Mapping[str, int],
        guards: tuple[tuple[str, int], ...],
        requires: tuple[str, ...],
        warnings: tuple[str, ...] = (),
        warning_kinds: tuple[str, ...] = (),
    ) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "bundle", bundle)
        setattr_(self, "events", events)
        setattr_(self, "guards", guards)
        setattr_(self, "requires", requires)
        setattr_(self, "warnings", warnings)
        setattr_(self, "warning_kinds", warning_kinds)

    @property
    def resource_types(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for e in self.bundle.get("entry", ()):
            seen.setdefault(e["resource"]["resourceType"], None)
        return tuple(seen)


class ConvertContext:
    """State of one conversion: settings, message, counted events, guards, requires and entries.

    Message modules (adt/oru/siu) call :meth:`add` for each resource and use the returned
    reference string (``urn:uuid:...``) inside other resources.
    """

    __slots__ = (
        "_by_full_url",
        "_by_url",
        "_recording",
        "_shared",
        "alnum_plain",
        "coding_systems",
        "delim_key",
        "delimiters",
        "entity_memo",
        "entries",
        "events",
        "guards",
        "hd_cache",
        "memo",
        "message",
        "patient_ref",
        "requires",
        "settings",
        "warning_kinds",
        "warnings",
        "xcn_memo",
    )

    def __init__(self, message: Message, settings: ConvertSettings):
        self.message = message
        self.settings = settings
        # a plain dict, not a Counter: Counter's __init__ and __missing__ are Python code the compiled build
        # would call for every message and every first count
        self.events: dict[str, int] = {}
        self.guards: dict[str, int] = {}
        self.requires: list[str] = []
        self.warnings: list[str] = []
        self.warning_kinds: list[str] = []
        self.entries: list[dict[str, Any]] = []
        self._by_url: dict[str, dict[str, Any]] = {}
        self._by_full_url: dict[str, tuple[dict[str, Any], str]] = {}  # fullUrl -> (resource, resource key)
        self.patient_ref: str | None = None
        # kept entries (reuse) in this bundle: urls whose entry is shared with other conversions
        self._shared: set[str] | None = None
        self._recording: list[tuple[str, str, str, bool, dict[str, Any]]] | None = None
        # datatypes.xcn: raw XCN repetition -> (reference, display, derived system); the same practitioner
        # recurs within a message (PD1-4, PV1-7, DG1-16, ...) and maps to the same entry every time
        self.xcn_memo: dict[str, tuple[str, str | None, bool]] = {}
        # the channel's assigning-authority cache (datatypes.hd_system), read once per message
        self.hd_cache = settings.hd_cache
        # the channel's coding_systems (datatypes.code_system), read once per message: the coded values read it
        self.coding_systems: Mapping[str, str] = settings.coding_systems
        # the channel's kept entries and pieces (datatypes.xcn / pl / kept_piece): a property of the settings,
        # read once per message (a Python-level call each time in the compiled build)
        self.entity_memo: dict[Any, Any] = settings.entity_memo
        # per-message memo for mappers whose result is a pure function of raw segment text (see users)
        self.memo: dict[Any, Any] = {}
        d = message.delimiters
        self.delimiters = d
        # no delimiter is a letter or digit (always so in practice): a raw field value made of letters and digits
        # only then holds no separator or escape and is its own value (datatypes.value, datatypes.rep_of)
        enc = d.encoding_characters
        # the delimiters as one string: part of the key of whatever is kept by raw text across messages
        self.delim_key = d.field + enc
        self.alnum_plain = enc == "^~\\&" or not any(ch.isalnum() for ch in enc)

    # ------------------------------------------------------------------
    def count(self, event: str, n: int = 1) -> None:
        """Count a PHI-free event (name only, never values)."""
        events = self.events
        events[event] = events.get(event, 0) + n

    def warn(self, event: str, location: Location | None, what: str) -> None:
        """Count ``event`` and keep a located warning: ``what`` says what was wrong and what the conversion
        did instead (names of fields, never their values)."""
        events = self.events
        events[event] = events.get(event, 0) + 1
        self.warnings.append(f"{location}: {what}" if location is not None else what)
        self.warning_kinds.append(event)

    def guard(self, key: str, rank: int) -> None:
        """Tell the engine: resource ``key`` is written with status rank ``rank``."""
        if rank > self.guards.get(key, -1):
            self.guards[key] = rank

    def require(self, key: str) -> None:
        """Tell the engine: resource ``key`` must already exist on the target."""
        if key not in self.requires:
            self.requires.append(key)

    # ------------------------------------------------------------------
    def add(
        self,
        resource_type: str,
        resource: dict[str, Any],
        *,
        identifier: tuple[str, str] | None = None,
        key: str | None = None,
        create_only: bool = False,
    ) -> str:
        """Add ``resource`` as a conditional update and return its ``urn:uuid`` reference.

        Give either ``identifier=(system, value)`` (a business identifier; it is put into
        ``resource["identifier"]`` if not already there) or ``key=`` (a business-key string,
        e.g. ``"<patient url>|DG1|<code>"``; a ``urn:sluice:key`` identifier with its uuid5 is
        added).  Adding the same resource twice in one message returns the first reference;
        elements missing in the first are filled from the second (first wins).

        ``create_only=True`` writes a conditional *create* instead (``POST`` with
        ``ifNoneExist: identifier=<system>|<value>``): the resource is created when the server has
        none with that identifier and an existing one is never overwritten.  ORU and SIU use it for
        the Patient and Encounter, whose authority is the ADT feed.  The resource key (for guards and
        requires) and the fullUrl are the same as for the conditional update.
        """
        if identifier is not None:
            system, value = identifier
            addr = _ADDRESSES.get((resource_type, system, value))
            if addr is None:
                url = _conditional_url(resource_type, system, value)
                addr = _address(resource_type, system, value, url)
        elif key is not None:
            system = SLUICE_KEY_SYSTEM
            kaddr = _KEY_ADDRESSES.get((resource_type, key))
            if kaddr is None:
                value = uuid5(resource_type + "|" + key)
                url = _conditional_url(resource_type, system, value)
                kaddr = (value, _address(resource_type, system, value, url))
                if len(_KEY_ADDRESSES) >= _ADDRESSES_MAX:
                    _KEY_ADDRESSES.clear()
                _KEY_ADDRESSES[(resource_type, key)] = kaddr
            value, addr = kaddr
        else:
            raise ValueError("add() needs identifier= or key=")
        ids: list[dict[str, Any]] | None = resource.get("identifier")
        if ids is None:
            resource["identifier"] = [{"system": system, "value": value}]
        else:
            for i in ids:
                if i.get("value") == value and i.get("system") == system:
                    break
            else:
                ids.append({"system": system, "value": value})
        url, full_url = addr
        rec = self._recording
        if rec is not None:
            rec.append((url, full_url, resource_type, create_only, resource))
        by_url = self._by_url
        existing = by_url.get(url)
        if existing is not None:
            self._merge(existing, url, resource, False)
            return full_url
        for first in resource:
            if first != "resourceType" or resource[first] != resource_type:
                _put_type_first(resource, resource_type)
            break
        entry = {
            "fullUrl": full_url,
            "resource": resource,
            "request": {"method": "POST", "url": resource_type, "ifNoneExist": url[len(resource_type) + 1 :]}
            if create_only
            else {"method": "PUT", "url": url},
        }
        by_url[url] = entry
        self._by_full_url[full_url] = (resource, url)
        self.entries.append(entry)
        return full_url

    def _merge(self, existing: dict[str, Any], url: str, resource: dict[str, Any], kept: bool) -> None:
        """The same resource added again in one message: elements missing in the first are filled from the
        second (first wins).  A kept entry (:meth:`reuse`) is copied before it is changed, and what a kept
        resource gives is copied in: kept entries are shared with other conversions of the channel."""
        old: dict[str, Any] = existing["resource"]
        missing = [k for k in resource if k not in old and not _choice_taken(old, k)]
        if not missing:
            return
        shared = self._shared
        if shared is not None and url in shared:
            old = self._own(url)
        for k in missing:
            old[k] = copy_json(resource[k]) if kept else resource[k]

    # ------------------------------------------------------------------
    # Entries kept across the messages of a channel (recurring practitioners and locations): built once,
    # then shared by later conversions, which never change them in place (copy on write: _own)
    def record(self) -> list[tuple[str, str, str, bool, dict[str, Any]]] | None:
        """Start recording what :meth:`add` is given, for :meth:`kept_entries`; ``None`` when a recording is
        already under way (an inner mapper then keeps nothing of its own)."""
        if self._recording is not None:
            return None
        rec: list[tuple[str, str, str, bool, dict[str, Any]]] = []
        self._recording = rec
        return rec

    def kept_entries(
        self, rec: list[tuple[str, str, str, bool, dict[str, Any]]]
    ) -> tuple[tuple[str, str, dict[str, Any]], ...]:
        """Stop recording: the recorded adds as independent entries (copies) to keep for later messages."""
        self._recording = None
        return tuple(
            (
                url,
                full_url,
                {
                    "fullUrl": full_url,
                    "resource": copy_json(resource),
                    "request": {"method": "POST", "url": rtype, "ifNoneExist": url[len(rtype) + 1 :]}
                    if create_only
                    else {"method": "PUT", "url": url},
                },
            )
            for url, full_url, rtype, create_only, resource in rec
        )

    def stop_recording(self) -> None:
        self._recording = None

    def reuse(self, kept: tuple[tuple[str, str, dict[str, Any]], ...]) -> None:
        """Add entries kept from an earlier message (:meth:`kept_entries`) as they are, shared."""
        by_url = self._by_url
        for url, full_url, entry in kept:
            existing = by_url.get(url)
            if existing is None:
                by_url[url] = entry
                self._by_full_url[full_url] = (entry["resource"], url)
                self.entries.append(entry)
                shared = self._shared
                if shared is None:
                    shared = self._shared = set()
                shared.add(url)
            else:
                self._merge(existing, url, entry["resource"], True)

    def _own(self, url: str) -> dict[str, Any]:
        """Replace the shared entry of ``url`` by this message's own copy; its resource."""
        shared = self._shared
        assert shared is not None
        shared.discard(url)
        entry = self._by_url[url]
        mine: dict[str, Any] = copy_json(entry)
        self._by_url[url] = mine
        entries = self.entries
        for i, e in enumerate(entries):
            if e is entry:
                entries[i] = mine
                break
        res: dict[str, Any] = mine["resource"]
        self._by_full_url[mine["fullUrl"]] = (res, url)
        return res

    def add_create(
        self, resource_type: str, resource: dict[str, Any], *, if_none_exist: str, key: str
    ) -> str:
        """Add a conditional *create* (``POST`` + ``ifNoneExist``) for resources without identifiers
        (Provenance).  ``key`` makes the fullUrl deterministic."""
        for first in resource:
            if first != "resourceType" or resource[first] != resource_type:
                _put_type_first(resource, resource_type)
            break
        else:
            _put_type_first(resource, resource_type)
        full_url = "urn:uuid:" + uuid5(f"{resource_type}|{key}")
        self.entries.append(
            {
                "fullUrl": full_url,
                "resource": resource,
                "request": {"method": "POST", "url": resource_type, "ifNoneExist": if_none_exist},
            }
        )
        self._by_full_url[full_url] = (resource, f"{resource_type}?{if_none_exist}")
        return full_url

    def retarget(self, full_url: str, resource_type: str, system: str, value: str) -> str:
        """Write the entry ``full_url`` to the resource found by another identifier ``system|value`` (an
        identifier change, ADT A46/A47/A49/A50: the record known by the old identifier gets the new one).
        The fullUrl stays (other entries reference it); the old identifier is kept on the resource with use
        ``old`` so a resent message finds the same resource.  Returns the new resource key."""
        hit = self._by_full_url.get(full_url)
        if hit is None:
            raise ValueError("retarget() of an entry that was never added")
        resource, old_url = hit
        shared = self._shared
        if shared is not None and old_url in shared:
            resource = self._own(old_url)
        url = conditional_url(resource_type, system, value)
        entry = self._by_url.pop(old_url)
        entry["request"] = {"method": "PUT", "url": url}
        self._by_url[url] = entry
        self._by_full_url[full_url] = (resource, url)
        ids = resource.setdefault("identifier", [])
        if not any(i.get("system") == system and i.get("value") == value for i in ids):
            ids.append({"use": "old", "system": system, "value": value})
        return url

    def find(self, full_url: str) -> dict[str, Any] | None:
        """The resource dict of an entry already added, by its fullUrl (this message's own: the caller may
        change it)."""
        hit = self._by_full_url.get(full_url)
        if hit is None:
            return None
        shared = self._shared
        if shared is not None and hit[1] in shared:
            return self._own(hit[1])
        return hit[0]

    def key_of(self, full_url: str) -> str | None:
        """The resource key (conditional URL, ``Type?identifier=system|value``) of an added entry."""
        hit = self._by_full_url.get(full_url)
        return hit[1] if hit is not None else None

    # ------------------------------------------------------------------
    def bundle(self) -> dict[str, Any]:
        """The transaction Bundle (a plain dict ready for orjson)."""
        return {"resourceType": "Bundle", "type": "transaction", "entry": self.entries}

    def result(self) -> Conversion:
        return Conversion(
            bundle=self.bundle(),
            events=dict(self.events),
            guards=tuple(sorted(self.guards.items())),
            requires=tuple(self.requires),
            warnings=tuple(self.warnings),
            warning_kinds=tuple(self.warning_kinds),
        )


def supported_trigger(msg: Message, supported: frozenset[str]) -> str:
    """MSH-9.2 of ``msg`` when the converter of its MSH-9.1 handles it; else ``MessageRejected`` (AR 201)
    naming the triggers it does handle."""
    trigger = msg.trigger
    if trigger not in supported:
        raise MessageRejected(
            f"{msg.message_type} trigger {redact.trigger(trigger) if trigger else '(empty)'} is not supported "
            f"(supported: {', '.join(sorted(supported))})",
            code="201",
            location=Location("MSH", 1, 9, None, 2),
        )
    return trigger
