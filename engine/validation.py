"""``validate: structure``: check each message's segment structure against its HL7 definition.

A channel option, off by default (``validate: off``).  With ``validate: structure`` the processing step
checks, before the channel's first transform step and after its filter, that the message's segments
follow the HL7 definition of its message structure, using the definitions hl7apy ships for HL7 v2.1 to
v2.8.2 (``pip install 'sluice[validate]'``):

* the structure is MSH-9.3 (``ADT_A01``); a message without it, or with one its version does not define
  (a common slip: ``ADT_A04``), gets the structure HL7 table 0354 gives its event (``ADT^A04`` →
  ``ADT_A01``) for the message types Sluice converts, else ``<type>_<trigger>``;
* every segment belongs to that structure, in an order it allows, as many times as it allows, and every
  required segment (and segment group) is there.  Z-segments (site-defined) may stand anywhere.

Field contents (data types, lengths, code tables) are not checked: the converter reports what it cannot
map, at the field.  A message that fails is kept with status ``error`` and AE 100 (segment sequence error)
at the offending segment; the reason names segments, the structure and the version, never values, and
says what to do.

Where it runs: where the channel's pipeline runs, in the processing workers; never on the MLLP intake
path.  (With ``ack: after-processing`` the pipeline runs before the ACK by design, and the ACK then
reports this check's outcome too.)  Matching is a lazily built automaton over segment names, cached per
structure and version: tens of microseconds a message once warm.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any

from engine import redact
from engine.errors import ConfigError, Location, MessageContentError
from engine.hl7 import Message

if TYPE_CHECKING:
    from engine.pipeline import Step

VALIDATE_MODES = ("off", "structure")
INSTALL = "pip install 'sluice[validate]'"
ANY_SEGMENT = "ANYHL7SEGMENT"  # hl7apy's name for "any segment" in a few choice groups

# HL7 table 0354 (message structure by event) for the types Sluice converts, for messages without MSH-9.3.
# Several structures in order of preference: older versions define fewer (v2.3 sends A05/A28/A31 as ADT_A01).
_EVENT_STRUCTURES: dict[str, dict[str, tuple[str, ...]]] = {
    "ADT": {
        **dict.fromkeys(("A01", "A04", "A08", "A13"), ("ADT_A01",)),
        "A02": ("ADT_A02",),
        "A03": ("ADT_A03",),
        **dict.fromkeys(("A05", "A14", "A28", "A31"), ("ADT_A05", "ADT_A01")),
        **dict.fromkeys(("A06", "A07"), ("ADT_A06",)),
        **dict.fromkeys(("A09", "A10", "A11"), ("ADT_A09",)),
        "A12": ("ADT_A12", "ADT_A09"),
        "A15": ("ADT_A15", "ADT_A09"),
        "A16": ("ADT_A16", "ADT_A01"),
        "A17": ("ADT_A17",),
        "A18": ("ADT_A18",),
        "A20": ("ADT_A20",),
        **dict.fromkeys(
            ("A21", "A22", "A23", "A25", "A26", "A27", "A29", "A32", "A33"), ("ADT_A21", "ADT_A09")
        ),
        "A24": ("ADT_A24",),
        **dict.fromkeys(("A30", "A34", "A35", "A36", "A46", "A47", "A48", "A49"), ("ADT_A30",)),
        "A37": ("ADT_A37",),
        "A38": ("ADT_A38",),
        **dict.fromkeys(("A39", "A40", "A41", "A42"), ("ADT_A39",)),
        **dict.fromkeys(("A43", "A44"), ("ADT_A43",)),
        "A45": ("ADT_A45",),
        **dict.fromkeys(("A50", "A51"), ("ADT_A50",)),
        **dict.fromkeys(("A52", "A53"), ("ADT_A52",)),
        **dict.fromkeys(("A54", "A55"), ("ADT_A54",)),
        "A60": ("ADT_A60",),
        **dict.fromkeys(("A61", "A62"), ("ADT_A61",)),
    },
    "ORU": {"R01": ("ORU_R01",), **dict.fromkeys(("R30", "R31", "R32"), ("ORU_R30",)), "W01": ("ORU_W01",)},
    "SIU": {f"S{n}": ("SIU_S12",) for n in range(12, 27)},
}


def require_hl7apy(file: str, key: str = "validate") -> None:
    """ConfigError (at start-up) when ``validate: structure`` is asked for without hl7apy installed."""
    try:
        importlib.import_module("hl7apy")
    except ImportError as exc:
        raise ConfigError(
            "validate: structure needs hl7apy, which is not installed",
            file=file,
            key=key,
            hint=f"{INSTALL}, or set validate: off",
        ) from exc


def structure_step() -> Step:
    """The pipeline step a ``validate: structure`` channel runs first: the Work unchanged, or AE 100."""
    from engine.pipeline import Work

    def step(work: Work) -> Work:
        check_structure(work.message)
        return work

    return step


# ----------------------------------------------------------------------------- the check
def check_structure(msg: Message) -> None:
    """Raise ``MessageContentError`` (AE 100, located) unless ``msg``'s segments fit its HL7 structure."""
    version = msg.version
    structure = _structure(msg, version)
    machine = _machine(structure, version)
    names = [seg.name for seg in msg.segments]
    seen: dict[str, int] = {}
    states = machine.start
    prev = ""
    for i, name in enumerate(names):
        occurrence = seen[name] = seen.get(name, 0) + 1
        if name.startswith("Z"):
            continue  # site-defined: allowed anywhere
        nxt = machine.step(states, name)
        if not nxt:
            where = Location(name, occurrence)
            what = f"{structure} (HL7 v{version})"
            if name not in machine.alphabet and ANY_SEGMENT not in machine.alphabet:
                text = f"segment {name} (segment {i + 1}) is not part of {what}"
            else:
                needed = machine.required(states)
                after = f"after {prev}" if prev else "here"
                if needed:
                    text = f"segment {name} (segment {i + 1}) is out of place in {what}: {after} it needs {_either(needed)}"
                else:
                    allowed = machine.expected(states)
                    text = (
                        f"segment {name} (segment {i + 1}) is out of place in {what}: {after} it allows "
                        f"{_either(allowed)}, or {name} is repeated more often than the structure allows"
                    )
            raise _failure(text, where)
        states = nxt
        prev = name
    if machine.final not in states:
        needed = machine.required(states) or machine.expected(states)
        last = names[-1] if names else "MSH"
        raise _failure(
            f"the message ends before {structure} (HL7 v{version}) is complete: after {prev or last} it needs "
            f"{_either(needed)}",
            Location(last, seen.get(last, 1)),
        )


def _failure(text: str, where: Location) -> MessageContentError:
    return MessageContentError(
        f"message structure: {text}; have the sending system send the segments its structure defines, "
        "or set validate: off for this channel",
        code="100",
        location=where,
    )


def _either(names: Iterable[str]) -> str:
    items = sorted(names)
    if len(items) == 1:
        return items[0]
    return "one of " + ", ".join(items)


def _structure(msg: Message, version: str) -> str:
    known = _messages(version)
    if known is None:
        raise MessageContentError(
            f"message structure: hl7apy has no definitions for HL7 version {version or '(empty MSH-12)'!r} "
            f"(it has {', '.join(_VERSIONS)}); send a version it defines, or set validate: off for this channel",
            code="203",
            location=Location("MSH", 1, 12),
        )
    given = msg.structure.strip().upper()
    if given in known:
        return given
    # No MSH-9.3, or one the version does not define (a common slip: ADT_A04 where table 0354 says ADT_A01):
    # the event's structure.
    mtype, trigger = msg.message_type.upper(), msg.trigger.upper()
    candidates = (*_EVENT_STRUCTURES.get(mtype, {}).get(trigger, ()), f"{mtype}_{trigger}")
    for name in candidates:
        if name in known:
            return name
    # MSH-9.3 and the trigger are quoted only when they are known codes (engine/redact.py): a reason is
    # stored, logged and sent back as ERR text
    named = redact.code(given, _all_structures())
    said = f"MSH-9.3 names {named}, which HL7 v{version} does not define," if given else "MSH-9.3 is empty"
    event = f"{mtype or '?'}^{redact.trigger(trigger) if trigger else '?'}"
    raise MessageContentError(
        f"message structure: {said} and HL7 v{version} defines no structure for {event}; "
        "send the structure HL7 table 0354 gives this event in MSH-9.3, or set validate: off for this channel",
        code="100",
        location=Location("MSH", 1, 9, None, 3),
    )


_VERSIONS = ("2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8", "2.8.1", "2.8.2")


@cache
def _all_structures() -> frozenset[str]:
    """Every message structure any HL7 version hl7apy knows defines (table 0354's codes)."""
    out: set[str] = set()
    for version in _VERSIONS:
        out |= _messages(version) or frozenset()
    return frozenset(out)


@cache
def _messages(version: str) -> frozenset[str] | None:
    """The message structures hl7apy defines for ``version``; None when it has no such version."""
    if version not in _VERSIONS:
        return None
    module = importlib.import_module("hl7apy.v" + version.replace(".", "_"))
    return frozenset(module.MESSAGES)


# ----------------------------------------------------------------------------- the automaton
class _Machine:
    """A Thompson NFA over segment names built from hl7apy's structure definition, run as a DFA built
    lazily (state sets are cached per structure and version, so a feed's messages share them)."""

    def __init__(self, definition: Any):
        self.edges: list[list[tuple[str, int]]] = []
        self.eps: list[list[int]] = []
        start = self._new()
        self.final = self._sequence(definition, start)
        self.alphabet = frozenset(label for out in self.edges for label, _ in out)
        self.start = self._closure((start,))
        self._steps: dict[tuple[frozenset[int], str], frozenset[int]] = {}

    # building
    def _new(self) -> int:
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def _sequence(self, definition: Any, start: int) -> int:
        """The children of a message or group definition from ``start``; returns the end state."""
        kind, children = definition[0], definition[1]
        if kind == "choice":  # exactly one of the children
            end = self._new()
            for child in children:
                branch = self._new()
                self.eps[start].append(branch)
                self.eps[self._repeat(child, branch)].append(end)
            return end
        cur = start
        for child in children:
            cur = self._repeat(child, cur)
        return cur

    def _child(self, child: Any, start: int) -> int:
        """One occurrence of ``child`` (a segment or a group) from ``start``; returns its end state."""
        name, definition, kind = child[0], child[1], child[3]
        if kind == "SEG":
            end = self._new()
            self.edges[start].append((name, end))
            return end
        return self._sequence(definition, start)

    def _repeat(self, child: Any, start: int) -> int:
        low, high = child[2]
        cur = start
        for _ in range(low):
            cur = self._child(child, cur)
        if high == -1:  # unbounded: loop back to cur
            end = self._child(child, cur)
            self.eps[end].append(cur)
            return cur
        for _ in range(high - low):  # optional copies, each skippable
            end = self._child(child, cur)
            self.eps[cur].append(end)
            cur = end
        return cur

    def _closure(self, states: Iterable[int]) -> frozenset[int]:
        seen = set(states)
        todo = list(seen)
        while todo:
            for t in self.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)

    # running
    def step(self, states: frozenset[int], name: str) -> frozenset[int]:
        key = (states, name)
        hit = self._steps.get(key)
        if hit is None:
            targets = [t for s in states for label, t in self.edges[s] if label in (name, ANY_SEGMENT)]
            hit = self._closure(targets) if targets else frozenset()
            if len(self._steps) > 50_000:
                self._steps.clear()
            self._steps[key] = hit
        return hit

    def expected(self, states: frozenset[int]) -> set[str]:
        """Segment names that may come next."""
        return {label for s in states for label, _ in self.edges[s]}

    def required(self, states: frozenset[int]) -> set[str]:
        """Segment names that must come before the structure can end (or go on past them)."""
        return {label for label in self.expected(states) if not self._reaches_final(states, avoid=label)}

    def _reaches_final(self, states: frozenset[int], avoid: str) -> bool:
        seen = set(states)
        todo = list(seen)
        while todo:
            s = todo.pop()
            if s == self.final:
                return True
            nxt = self.eps[s] + [t for label, t in self.edges[s] if label != avoid]
            for t in nxt:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return False


@lru_cache(maxsize=256)
def _machine(structure: str, version: str) -> _Machine:
    from hl7apy import load_reference

    return _Machine(load_reference(structure, "Message", version))
