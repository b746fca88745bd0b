"""``sluice maps check``: which codes a clinic sends that no map of the channel covers.

Reads the channel's stored messages (through the store, so sealed bodies are opened with the key ring),
newest window first bounded by ``--since``, and tallies per sending facility (MSH-4.1) and field the
values that no code map, location map or provider map of the channel covers, with counts and first/last
seen.  The pure part (:class:`Coverage`) takes parsed messages; only :func:`scan` touches the store.

What is looked at: PV1-3 (location: point of care), PV1-7 and PV1-17 (attending and admitting provider:
XCN-1 id), OBX-3 (observation codes), and every field a ``code_maps`` key of the channel names (``AL1-3``,
``DG1-3``...).  A code is covered as the conversion maps it: by the field's map (``OBX-3``) or, when the
channel has none for that field, by the map of its CWE-3 coding system (``99LAB``).  A location or provider
is covered by the field's map for its clinic (``PV1-3@NORTH``: MSH-4.1 = NORTH) or the field's map.
Codes sent with a standard system (LN, SCT, I10, ...) need no map and are not listed.  Only codes and ids
are printed, never patient data; every value goes out through ``engine.redact.printable``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from engine.hl7 import Message

# field → what it holds (the fixed fields every channel is checked for)
FIXED: dict[str, str] = {"PV1-3": "location", "PV1-7": "provider", "PV1-17": "provider", "OBX-3": "code"}
_FIELD = re.compile(r"^([A-Z][A-Z0-9]{2})-(\d{1,3})$")
MAX_VALUE = 80  # a value longer than this is cut (it is a code; a long one is a sender's mistake)


def _standard_systems() -> frozenset[str]:
    from transforms.datatypes import CODE_SYSTEMS

    return frozenset(CODE_SYSTEMS)


@dataclass
class Seen:
    count: int = 0
    first: float = 0.0
    last: float = 0.0

    def add(self, at: float) -> None:
        self.count += 1
        self.first = at if not self.first else min(self.first, at)
        self.last = max(self.last, at)


@dataclass(frozen=True)
class Gap:
    """One value no map covers."""

    facility: str
    field: str
    kind: str  # location | provider | code
    value: str
    system: str  # CWE-3 coding system name, or ""
    count: int
    first_seen: float
    last_seen: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Coverage:
    """Tally the values of ``fields`` that ``maps`` (map key → local code → target) do not cover."""

    def __init__(self, maps: Mapping[str, Mapping[str, Any]], systems: frozenset[str] = frozenset()):
        self.maps = maps
        self.fields: dict[str, str] = dict(FIXED)
        for key in maps:
            m = _FIELD.match(key.split("@", 1)[0])
            if m and key.split("@", 1)[0] not in self.fields:
                self.fields[key.split("@", 1)[0]] = "code"
        # CWE-3 names with a system: the shipped ones and the channel's coding_systems (upper-cased)
        self.standard = _standard_systems() | systems
        self.seen: dict[tuple[str, str, str, str], Seen] = {}
        self.messages = 0

    def covered(self, field: str, kind: str, facility: str, value: str, system: str) -> bool:
        """A code: as the conversion decides (transforms/datatypes.cwe): the field's map, or when the channel
        has none for the field, the map of the CWE-3 system; the first map found must hold the value.
        A location or provider: the field's map for this facility, or the field's map."""
        if kind == "code":
            cmap = self.maps.get(field) or (self.maps.get(system) if system else None)
            return cmap is not None and value in cmap
        return any(value in self.maps.get(key, {}) for key in (f"{field}@{facility}", field))

    def add(self, msg: Message, at: float) -> None:
        self.messages += 1
        facility = msg.sending_facility.split(msg.delimiters.component, 1)[0].strip()
        for field, kind in self.fields.items():
            seg_name, n = field.split("-")
            for seg in msg.all(seg_name):
                for rep in seg.reps(int(n)):
                    value = rep.c(1).strip()[:MAX_VALUE]
                    if not value:
                        continue
                    system = rep.c(3).strip() if kind == "code" else ""
                    if kind == "code" and system.upper() in self.standard:
                        continue
                    if self.covered(field, kind, facility, value, system):
                        continue
                    self.seen.setdefault((facility, field, value, system), Seen()).add(at)

    def gaps(self) -> list[Gap]:
        """Per facility and field, the most frequent first."""
        out = [
            Gap(fac, field, self.fields[field], value, system, s.count, s.first, s.last)
            for (fac, field, value, system), s in self.seen.items()
        ]
        out.sort(key=lambda g: (g.facility, g.field, -g.count, g.value))
        return out


def channel_maps(config: Any, channel: Any) -> dict[str, Mapping[str, Any]]:
    """The code maps of the channel's ``hl7-to-fhir`` steps, loaded as the engine loads them."""
    from transforms.settings import ConvertSettings

    maps: dict[str, Mapping[str, Any]] = {}
    for step in channel.transform:
        if isinstance(step, Mapping) and "hl7-to-fhir" in step:
            settings = ConvertSettings.from_options(step["hl7-to-fhir"] or {}, config.base_dir, channel.file)
            maps.update(settings.code_maps)
    return maps


def channel_systems(config: Any, channel: Any) -> frozenset[str]:
    """The CWE-3 names the channel's ``hl7-to-fhir`` steps give a system of their own (``coding_systems``): codes
    under them are the named system's, not local codes awaiting a map."""
    from transforms.settings import ConvertSettings

    names: set[str] = set()
    for step in channel.transform:
        if isinstance(step, Mapping) and "hl7-to-fhir" in step:
            settings = ConvertSettings.from_options(step["hl7-to-fhir"] or {}, config.base_dir, channel.file)
            names.update(settings.coding_systems)
    return frozenset(names)


def scan(store: Any, channel: str, since: float | None, batch: int = 500) -> Iterator[tuple[float, bytes]]:
    """(received_at, body) of the channel's stored messages received since ``since``, oldest first.

    Keyset pages by id; bodies dropped by retention are skipped; sealed bodies come back opened (the
    store's ``Sealed`` column type uses its key ring).
    """
    from sqlalchemy import select

    from engine.store import M

    last = 0
    while True:
        q = (
            select(M.c.id, M.c.received_at, M.c.raw)
            .where(M.c.channel == channel, M.c.id > last, M.c.raw.is_not(None))
            .order_by(M.c.id)
            .limit(batch)
        )
        if since is not None:
            q = q.where(M.c.received_at >= since)
        with store.engine.connect() as conn:
            rows = conn.execute(q).all()
        if not rows:
            return
        for r in rows:
            yield r.received_at, r.raw
        last = rows[-1].id


def check(
    rows: Iterable[tuple[float, bytes]],
    maps: Mapping[str, Mapping[str, Any]],
    charset: str = "latin-1",
    systems: frozenset[str] = frozenset(),
) -> Coverage:
    """Tally ``rows`` (received_at, body); unreadable bodies are skipped (they were never processed).
    ``systems``: the channel's ``coding_systems`` names (:func:`channel_systems`), standard like the shipped ones."""
    from engine.errors import SluiceError
    from engine.hl7 import parse_bytes

    cov = Coverage(maps, systems)
    for at, raw in rows:
        try:
            msg = parse_bytes(raw, charset)
        except SluiceError:
            continue
        cov.add(msg, at)
    return cov
