"""An in-memory FHIR target: applies transaction Bundles the way a FHIR server applies their writes.

Channel tests (engine/channeltest.py) run a sequence of messages through a channel and check the state a
FHIR server would hold afterwards, not each Bundle alone: an A03 after an A01 finishes the *same*
Encounter, a corrected result replaces the final one, a cancellation updates the booked Appointment.
This module is that server, reduced to what Sluice's Bundles use (FHIR R4 ``transaction`` rules):

* ``PUT Type?identifier=system|value``: conditional update: no match creates, one match is replaced
  (keeping its id), several matches fail (HTTP 412 on a server);
* ``POST Type`` with ``ifNoneExist``: conditional create: a match is left unchanged, else created;
* ``POST Type``: create; ``PUT Type/id``: update or create with that id;
* ``DELETE Type/id`` or ``DELETE Type?identifier=...``: delete.

Entries are processed in the order the specification gives (DELETE, POST, PUT), every ``urn:uuid:``
reference is rewritten to the ``Type/id`` its entry resolved to, and ids are assigned sequentially per
type (``Patient/1``...), so a test's final state is deterministic.  Searches understand ``identifier``
and ``_tag`` (token: ``system|code``, ``|code``, ``code``) and ``_id``; anything else is an error that
says so.  ``tests/engine/test_fhirtarget.py`` checks a lifecycle against the Medplum server.

Pure: no I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from engine.errors import SluiceError

JSON = dict[str, Any]

_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}


class TargetError(SluiceError):
    """A Bundle the in-memory target cannot apply (what a FHIR server would refuse, or what it does not
    implement); the text says which entry and why."""

    ack_code = "AE"
    hl7_error = "207"


def split_token(value: str) -> tuple[str | None, str]:
    """A token search value ``system|code`` → (system, code), with FHIR's ``\\|`` escapes undone.

    ``code`` alone gives system ``None`` (any system); ``|code`` gives ``""`` (no system)."""
    parts: list[str] = []
    cur: list[str] = []
    it = iter(value)
    for ch in it:
        if ch == "\\":
            cur.append(next(it, ""))
        elif ch == "|" and not parts:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    if len(parts) == 1:
        return None, parts[0]
    return parts[0], parts[1]


def _token_match(codings: list[Any], system: str | None, code: str, code_key: str) -> bool:
    for c in codings:
        if not isinstance(c, dict) or c.get(code_key) != code:
            continue
        if system is None or (c.get("system") or "") == system:
            return True
    return False


class FhirTarget:
    """Resources by type and id; :meth:`apply` runs one transaction Bundle against them."""

    def __init__(self) -> None:
        self.resources: dict[str, dict[str, JSON]] = {}
        self._next: dict[str, int] = {}

    # -- reading ------------------------------------------------------------------------------------
    def all(self) -> Iterator[JSON]:
        """Every resource held, types in first-write order, each type by id (assignment order)."""
        for by_id in self.resources.values():
            yield from by_id.values()

    def search(self, resource_type: str, query: str) -> list[JSON]:
        """``search("Patient", "identifier=sys|val")``: the matching resources (an AND of parameters)."""
        hits = list(self.resources.get(resource_type, {}).values())
        for param in filter(None, query.split("&")):
            name, _, raw = param.partition("=")
            if name == "_id":
                hits = [r for r in hits if r.get("id") == raw]
                continue
            system, code = split_token(raw)
            if name == "identifier":
                hits = [r for r in hits if _token_match(r.get("identifier") or [], system, code, "value")]
            elif name == "_tag":
                hits = [
                    r
                    for r in hits
                    if _token_match((r.get("meta") or {}).get("tag") or [], system, code, "code")
                ]
            else:
                raise TargetError(
                    f"the in-memory FHIR target does not search on {name!r} (only identifier, _tag and _id); "
                    "use a conditional URL on identifier"
                )
        return hits

    def read(self, reference: str) -> JSON | None:
        rtype, _, rid = reference.partition("/")
        return self.resources.get(rtype, {}).get(rid)

    # -- writing ------------------------------------------------------------------------------------
    def apply(self, bundle: JSON) -> list[str]:
        """Apply a ``transaction`` (or ``batch``) Bundle; the ``Type/id`` each entry resolved to, in entry
        order (``""`` for a DELETE).  A transaction is all or nothing: on an error nothing changes."""
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") not in ("transaction", "batch"):
            raise TargetError(
                "the output is not a FHIR transaction Bundle (resourceType Bundle, type transaction)"
            )
        entries = list(bundle.get("entry") or [])
        saved = copy.deepcopy(self.resources), dict(self._next)
        try:
            return self._apply(entries)
        except TargetError:
            self.resources, self._next = saved
            raise

    def _apply(self, entries: list[JSON]) -> list[str]:
        order = sorted(range(len(entries)), key=lambda i: _ORDER.get(self._method(entries[i], i), 9))
        resolved: list[str] = [""] * len(entries)
        full_urls: dict[str, str] = {}
        writes: list[tuple[int, str, JSON]] = []  # (entry index, Type/id, resource) to store after resolving
        for i in order:
            entry = entries[i]
            req = entry.get("request") or {}
            method, url = self._method(entry, i), str(req.get("url") or "")
            resource = entry.get("resource")
            if method == "DELETE":
                for ref in self._targets(url, i):
                    rtype, _, rid = ref.partition("/")
                    self.resources.get(rtype, {}).pop(rid, None)
                continue
            if method in ("GET", "HEAD"):
                continue
            if not isinstance(resource, dict) or not resource.get("resourceType"):
                raise TargetError(f"entry {i + 1}: {method} without a resource")
            rtype = str(resource["resourceType"])
            if method == "POST":
                existing = []
                if req.get("ifNoneExist"):
                    existing = self.search(rtype, str(req["ifNoneExist"]))
                if len(existing) > 1:
                    raise TargetError(f"entry {i + 1}: ifNoneExist matches {len(existing)} {rtype} resources")
                ref = f"{rtype}/{existing[0]['id']}" if existing else self._new_id(rtype)
                if not existing:
                    writes.append((i, ref, resource))
            elif method in ("PUT", "PATCH"):
                if method == "PATCH":
                    raise TargetError(f"entry {i + 1}: PATCH is not supported by the in-memory FHIR target")
                refs = self._targets(url, i, create=True)
                if len(refs) > 1:
                    raise TargetError(
                        f"entry {i + 1}: conditional update {url.split('?', 1)[0]} matches {len(refs)} resources "
                        "(a server answers 412 Precondition Failed)"
                    )
                ref = refs[0] if refs else self._new_id(rtype)
                writes.append((i, ref, resource))
            else:
                raise TargetError(
                    f"entry {i + 1}: request method {method!r} is not a FHIR transaction method"
                )
            resolved[i] = ref
            if entry.get("fullUrl"):
                full_urls[str(entry["fullUrl"])] = ref
        for _i, ref, resource in writes:
            rtype, _, rid = ref.partition("/")
            stored = _rewrite(copy.deepcopy(resource), full_urls)
            stored["id"] = rid
            self.resources.setdefault(rtype, {})[rid] = stored
        return resolved

    @staticmethod
    def _method(entry: JSON, i: int) -> str:
        method = str((entry.get("request") or {}).get("method") or "").upper()
        if not method:
            raise TargetError(f"entry {i + 1}: no request.method (a transaction entry needs one)")
        return method

    def _targets(self, url: str, i: int, create: bool = False) -> list[str]:
        """The ``Type/id`` references a request URL addresses (a conditional URL: every match)."""
        path, _, query = url.partition("?")
        rtype, _, rid = path.strip("/").partition("/")
        if not rtype:
            raise TargetError(f"entry {i + 1}: request.url is empty")
        if query:
            return [f"{rtype}/{r['id']}" for r in self.search(rtype, query)]
        if rid:
            return [f"{rtype}/{rid}"] if create or rid in self.resources.get(rtype, {}) else []
        raise TargetError(f"entry {i + 1}: request.url {rtype!r} names no resource (Type/id or Type?search)")

    def _new_id(self, rtype: str) -> str:
        n = self._next.get(rtype, 0) + 1
        while str(n) in self.resources.get(rtype, {}):
            n += 1
        self._next[rtype] = n
        return f"{rtype}/{n}"


def _rewrite(value: Any, full_urls: dict[str, str]) -> Any:
    """Every ``reference`` to a fullUrl of the Bundle → the ``Type/id`` its entry resolved to."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "reference" and isinstance(v, str) and v in full_urls:
                value[k] = full_urls[v]
            else:
                _rewrite(v, full_urls)
    elif isinstance(value, list):
        for v in value:
            _rewrite(v, full_urls)
    return value
