"""Delivery plans for a FHIR Bundle (pure: no I/O, tested without sockets).

A plan says which requests the FHIR destination sends for one Bundle, in which order, and which entries go
in each request:

* ``per-resource``: one request per entry, each after the entries it references.
* ``batch``: one batch per dependency level; entries of one batch never reference each other (a batch's
  entries are independent), later levels refer to earlier ones by the ids the server returned.
* ``transaction`` with ``max_entries``: transactions of at most ``max_entries`` entries in dependency order;
  entries of one chunk may reference each other (the server resolves urn:uuid inside a transaction), later
  chunks refer to earlier chunks by the ids those returned.

Reference cycles (Encounter.diagnosis → Condition and Condition.encounter → Encounter) are broken in two
phases: one side is written first without the back-reference (the smallest element that holds it: the
enclosing list item, else the top-level field), and updated once every entry has an id
(``PUT Type/id`` with the whole resource).  A cycle that fits in one transaction chunk is left whole.

Entry numbers in a plan are positions in the Bundle's ``entry`` list; a plan is deterministic for a given
Bundle, so a retry of the same delivery can skip the writes it already made.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PHASE_WRITE = 1
PHASE_UPDATE = 2


def references(node: Any) -> Iterator[str]:
    """Every ``reference`` string in a resource (any depth)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                yield v
            else:
                yield from references(v)
    elif isinstance(node, list):
        for v in node:
            yield from references(v)


def rewrite(node: Any, mapping: Mapping[str, str]) -> Any:
    """A copy of ``node`` with each ``reference`` found in ``mapping`` replaced by its value."""
    if isinstance(node, dict):
        return {
            k: (mapping.get(v, v) if k == "reference" and isinstance(v, str) else rewrite(v, mapping))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [rewrite(v, mapping) for v in node]
    return node


def _holds(node: Any, targets: frozenset[str]) -> bool:
    return any(r in targets for r in references(node))


def strip_references(resource: dict[str, Any], targets: frozenset[str]) -> dict[str, Any]:
    """``resource`` without the references to ``targets``: the nearest enclosing list item that holds one is
    dropped (an ``Encounter.diagnosis`` entry), else the top-level element (``Condition.encounter``); a list
    left empty is dropped too."""

    def in_list_item(node: Any) -> Any:
        # Inside a top-level element: drop the innermost list items that hold a target.
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for k, v in node.items():
                if _holds(v, targets) and not _has_list(v, targets):
                    continue
                nv = in_list_item(v)
                if isinstance(v, list) and not nv:
                    continue
                out[k] = nv
            return out
        if isinstance(node, list):
            return [in_list_item(v) for v in node if not _holds(v, targets) or _has_list(v, targets)]
        return node

    out: dict[str, Any] = {}
    for k, v in resource.items():
        if not _holds(v, targets):
            out[k] = v
            continue
        if not _has_list(v, targets):
            continue  # a single element (Condition.encounter): drop it
        nv = in_list_item(v)
        if isinstance(nv, list) and not nv:
            continue
        out[k] = nv
    return out


def _has_list(node: Any, targets: frozenset[str]) -> bool:
    """Whether a target reference in ``node`` sits inside a list (so dropping a list item removes it)."""
    if isinstance(node, list):
        return any(_holds(v, targets) for v in node)
    if isinstance(node, dict):
        return any(_has_list(v, targets) for k, v in node.items() if k != "reference")
    return False


@dataclass(frozen=True)
class Write:
    """One write: phase 1 writes ``entry`` (back-references stripped); phase 2 updates the entry at
    ``index`` with its whole resource once every entry has an id."""

    index: int
    phase: int
    entry: Mapping[str, Any]
    deferred: frozenset[str] = frozenset()  # phase 1: references left out, to be set by the update


@dataclass
class Plan:
    mode: str
    writes: list[Write] = field(default_factory=list)
    steps: list[list[int]] = field(default_factory=list)  # each: positions in ``writes``, one request
    # fullUrl → ``Type/id`` of entries written to a fixed id (``PUT Type/id``): known before any request
    fixed: dict[str, str] = field(default_factory=dict)

    @property
    def updates(self) -> int:
        return sum(1 for w in self.writes if w.phase == PHASE_UPDATE)


def _method(entry: Mapping[str, Any]) -> str:
    return str((entry.get("request") or {}).get("method", "")).upper()


def _sccs(n: int, edges: list[set[int]]) -> list[list[int]]:
    """Strongly connected components (Tarjan, iterative), each sorted."""
    index = 0
    idx: dict[int, int] = {}
    low: dict[int, int] = {}
    stack: list[int] = []
    on: set[int] = set()
    out: list[list[int]] = []
    for root in range(n):
        if root in idx:
            continue
        work: list[tuple[int, Iterator[int]]] = [(root, iter(sorted(edges[root])))]
        idx[root] = low[root] = index
        index += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in idx:
                    idx[w] = low[w] = index
                    index += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    advanced = True
                    break
                if w in on:
                    low[v] = min(low[v], idx[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == idx[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(sorted(comp))
    return out


def _find_cycle(nodes: set[int], edges: list[set[int]]) -> list[tuple[int, int]] | None:
    """One cycle among ``nodes`` as its edges, or None."""
    color: dict[int, int] = {}
    parent: dict[int, int] = {}
    for start in sorted(nodes):
        if start in color:
            continue
        work: list[tuple[int, Iterator[int]]] = [(start, iter(sorted(edges[start] & nodes)))]
        color[start] = 1
        while work:
            v, it = work[-1]
            for w in it:
                if color.get(w) == 1:  # back edge v → w: the cycle w → ... → v → w
                    cyc = [(v, w)]
                    x = v
                    while x != w:
                        cyc.append((parent[x], x))
                        x = parent[x]
                    return cyc
                if w not in color:
                    color[w] = 1
                    parent[w] = v
                    work.append((w, iter(sorted(edges[w] & nodes))))
                    break
            else:
                color[v] = 2
                work.pop()
    return None


def _edge_cost(entries: Sequence[Mapping[str, Any]], src: int, dst: int) -> tuple[int, int, int]:
    """Cheaper edges are deferred first: a reference held in a list item (dropping the item keeps the
    resource valid: Encounter.diagnosis) before a single element (Condition.encounter); then the entry
    written later in the bundle holds the back-reference."""
    target = frozenset({str(entries[dst].get("fullUrl"))})
    res = entries[src].get("resource") or {}
    in_list = all(_has_list(v, target) for v in res.values() if _holds(v, target))
    return (0 if in_list else 1, -src, dst)


def build(entries: Sequence[Mapping[str, Any]], mode: str, max_entries: int = 0) -> Plan:
    """The plan for ``entries`` in ``mode`` (``per-resource``, ``batch``, ``transaction``; a transaction
    with ``max_entries`` > 0 is split into chunks of at most that many entries)."""
    chunked = mode == "transaction" and max_entries > 0
    deletes = [i for i, e in enumerate(entries) if _method(e) == "DELETE"]
    rest = [i for i, e in enumerate(entries) if _method(e) != "DELETE"]
    pos = {i: p for p, i in enumerate(rest)}
    fixed = {}
    for i in rest:
        url = str((entries[i].get("request") or {}).get("url") or "").strip("/")
        if (
            entries[i].get("fullUrl")
            and _method(entries[i]) == "PUT"
            and "?" not in url
            and url.count("/") == 1
        ):
            fixed[str(entries[i]["fullUrl"])] = url
    by_url = {
        str(entries[i]["fullUrl"]): pos[i]
        for i in rest
        if entries[i].get("fullUrl") and str(entries[i]["fullUrl"]) not in fixed
    }
    n = len(rest)
    edges: list[set[int]] = [
        {by_url[r] for r in references(entries[i].get("resource")) if r in by_url} for i in rest
    ]
    if chunked:  # a self-reference is resolved by the server inside one transaction
        for p in range(n):
            edges[p].discard(p)
    sub_entries = [entries[i] for i in rest]
    deferred: dict[int, set[int]] = {}
    for comp in _sccs(n, edges):
        if len(comp) == 1 and comp[0] not in edges[comp[0]]:
            continue
        if chunked and len(comp) <= max_entries:
            continue  # kept whole inside one chunk
        nodes = set(comp)
        while (cyc := _find_cycle(nodes, edges)) is not None:
            src, dst = min(cyc, key=lambda e: _edge_cost(sub_entries, e[0], e[1]))
            edges[src].discard(dst)
            deferred.setdefault(src, set()).add(dst)

    plan = Plan(mode=mode, fixed=fixed)
    for i in deletes:
        plan.writes.append(Write(i, PHASE_WRITE, entries[i]))
    for p, i in enumerate(rest):
        e = entries[i]
        if p in deferred:
            urls = frozenset(str(sub_entries[d]["fullUrl"]) for d in deferred[p])
            res = e.get("resource") or {}
            e = {**e, "resource": strip_references(copy.deepcopy(dict(res)), urls)}
            plan.writes.append(Write(i, PHASE_WRITE, e, urls))
        else:
            plan.writes.append(Write(i, PHASE_WRITE, e))
    write_of = {w.index: k for k, w in enumerate(plan.writes)}

    # Units written together: a whole cycle (chunked transaction) or one entry.
    unit_of: dict[int, int] = {}
    units: list[list[int]] = []
    for comp in _sccs(n, edges):
        for p in comp:
            unit_of[p] = len(units)
        units.append(comp)
    unit_deps = [{unit_of[d] for p in comp for d in edges[p]} - {u} for u, comp in enumerate(units)]
    # Kahn, preferring the unit that comes first in the bundle (stable order).
    done: set[int] = set()
    ordered: list[int] = []
    level: dict[int, int] = {}
    while len(done) < len(units):
        ready = [u for u in range(len(units)) if u not in done and unit_deps[u] <= done]
        u = min(ready, key=lambda x: units[x][0])
        level[u] = 1 + max((level[d] for d in unit_deps[u]), default=0)
        done.add(u)
        ordered.append(u)

    def writes_of(unit: int) -> list[int]:
        return [write_of[rest[p]] for p in units[unit]]

    if deletes:
        dels = [write_of[i] for i in deletes]
        if mode == "per-resource":
            plan.steps.extend([k] for k in dels)
        elif chunked:
            plan.steps.extend(dels[s : s + max_entries] for s in range(0, len(dels), max_entries))
        else:
            plan.steps.append(dels)
    if mode == "per-resource":
        plan.steps.extend([k] for u in ordered for k in writes_of(u))
    elif mode == "batch":
        for lv in sorted(set(level.values())):
            plan.steps.append(sorted(k for u in ordered if level[u] == lv for k in writes_of(u)))
    elif chunked:
        chunk: list[int] = []
        for u in ordered:
            ws = writes_of(u)
            if chunk and len(chunk) + len(ws) > max_entries:
                plan.steps.append(chunk)
                chunk = []
            chunk.extend(ws)
        if chunk:
            plan.steps.append(chunk)
    else:
        plan.steps.append([write_of[rest[p]] for p in range(n)])

    updates: list[int] = []
    for p in sorted(deferred):
        i = rest[p]
        plan.writes.append(Write(i, PHASE_UPDATE, entries[i]))
        updates.append(len(plan.writes) - 1)
    if updates:
        if mode == "per-resource":
            plan.steps.extend([k] for k in updates)
        elif chunked:
            plan.steps.extend(updates[s : s + max_entries] for s in range(0, len(updates), max_entries))
        else:
            plan.steps.append(updates)
    return plan


def ref_from_location(location: str) -> str | None:
    """``[base/]Type/id[/_history/v]`` → ``Type/id``."""
    parts = [p for p in location.split("?")[0].split("/") if p]
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return f"{parts[-2]}/{parts[-1]}" if len(parts) >= 2 else None


def request_entry(write: Write, refs: Mapping[str, str]) -> dict[str, Any]:
    """The entry to send for ``write`` once ``refs`` (fullUrl → ``Type/id`` of entries already written) is
    known: references to written entries rewritten; a phase-2 update becomes ``PUT Type/id`` of the whole
    resource.  References to entries not yet written stay as they are (same transaction chunk)."""
    entry = dict(write.entry)
    resource = entry.get("resource")
    if write.phase == PHASE_UPDATE:
        ref = refs[str(entry["fullUrl"])]
        res = {**rewrite(resource, refs), "id": ref.split("/", 1)[1]}
        return {"fullUrl": entry["fullUrl"], "resource": res, "request": {"method": "PUT", "url": ref}}
    if resource is not None and refs:
        entry["resource"] = rewrite(resource, refs)
    return entry


def unresolved(entry: Mapping[str, Any], local: set[str]) -> list[str]:
    """The references in ``entry`` still pointing at entries of the bundle (``local`` fullUrls)."""
    return [r for r in references(entry.get("resource")) if r in local]


@dataclass
class Progress:
    """What a delivery has applied so far: writes done (positions in the plan), ids the server gave
    (fullUrl → ``Type/id``) and one outcome line per request.  Kept between retries of one delivery."""

    done: set[int] = field(default_factory=set)
    refs: dict[str, str] = field(default_factory=dict)
    outcomes: list[str] = field(default_factory=list)

    STATE_VERSION = 1

    def state(self, plan_id: str) -> dict[str, Any]:
        """The JSON form a destination saves between attempts (no PHI: positions, server ids, statuses).
        ``plan_id`` names the plan the positions refer to (the payload, mode, chunk size and server)."""
        return {
            "v": self.STATE_VERSION,
            "plan": plan_id,
            "done": sorted(self.done),
            "refs": dict(self.refs),
            "outcomes": list(self.outcomes),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None, plan_id: str, writes: int) -> Progress | None:
        """Progress saved for the same plan (``writes`` entries), or None: nothing saved, saved for another
        plan (the payload, mode, chunk size or server changed since), or not understood.  None means start
        over, which is safe: every write is conditional or by id."""
        if not state or state.get("v") != cls.STATE_VERSION or state.get("plan") != plan_id:
            return None
        done, refs, outcomes = state.get("done"), state.get("refs"), state.get("outcomes")
        if (
            not isinstance(done, list)
            or not all(isinstance(k, int) and 0 <= k < writes for k in done)
            or not isinstance(refs, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in refs.items())
            or not isinstance(outcomes, list)
            or not all(isinstance(o, str) for o in outcomes)
        ):
            return None
        return cls(done=set(done), refs=dict(refs), outcomes=list(outcomes))
