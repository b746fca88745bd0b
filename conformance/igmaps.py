"""The HL7 V2-to-FHIR IG's message maps: which segments each message structure leaves without a FHIR target.

The IG gives one map per message structure (``mappings/messages/HL7 Message - FHIR R4_ ORM_O01 - Sheet1.csv``):
a row per segment of the structure (and per condition), with its *Primary Target* resource and *Segment Map*.
A segment whose every row in a structure's map has neither is **IG-unmapped in that structure**: FT1 in ORM_O01
and ORU_R01 (while no map at all covers DFT), IN2 in ADT_A01 (while ORM_O01 folds it into the Coverage), TXA in
ORU_R01 (while MDM_T02 maps it to DocumentReference).

:func:`unmapped_by_structure` reads the CSVs; :data:`BUILTIN` is what it reads from the corpus's copy of the IG
(``v2-to-fhir-ig`` at 8c9b414), kept here because the CSVs are not part of this repository (the corpus is read
in place; HL7's copyright covers them).  :data:`UNMAPPED` is the CSVs' answer when they are found at import
(``SLUICE_CORPUS``, else ``../shared/corpus`` next to the repository), else :data:`BUILTIN`; a test keeps the
two equal.  :func:`unmapped_segments` picks the map of a message (:func:`structure`) and falls back to
:data:`DEFAULT` for structures the IG has no map for (DFT, BAR, OUL, PPR, RDE, REF, ADT_A03, ...).
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MESSAGE_MAPS = Path("v2-to-fhir-ig") / "mappings" / "messages"
"""Where the IG's message maps sit inside the corpus."""

_MAP_NAME = re.compile(r"R4_ ([A-Z0-9]{3}_[A-Z0-9]{3})\b")
_SEGMENT = re.compile(r"[A-Z][A-Z0-9]{2}")
_PRIMARY_TARGET, _SEGMENT_MAP = 9, 10  # columns of a message map row (0-based)


def corpus_dir() -> Path:
    """The shared corpus: ``SLUICE_CORPUS``, else ``../shared/corpus`` next to the repository."""
    return Path(os.environ.get("SLUICE_CORPUS") or ROOT.parent / "shared" / "corpus")


def read_map(path: Path) -> dict[str, bool]:
    """One IG message map CSV → each segment of the structure → whether any of its rows has a FHIR target."""
    segments: dict[str, bool] = {}
    with path.open(encoding="utf-8-sig", newline="") as fh:
        for row in csv.reader(fh):
            if len(row) <= _SEGMENT_MAP:
                continue
            name = row[1].strip().rsplit(".", 1)[-1]
            if not _SEGMENT.fullmatch(name) or name not in row[2]:
                continue  # a group row (PATIENT begin, choice markers), a header or a blank line
            mapped = bool(row[_PRIMARY_TARGET].strip() or row[_SEGMENT_MAP].strip())
            segments[name] = segments.get(name, False) or mapped
    return segments


def structures_with(directory: Path, segment_map: str) -> frozenset[str]:
    """The structures whose IG message map under ``directory`` uses the segment map ``segment_map`` (e.g.
    ``DG1[Encounter]``: a DG1 in the context of an encounter → Encounter.diagnosis)."""
    out: set[str] = set()
    for path in sorted(directory.glob("*.csv")):
        m = _MAP_NAME.search(path.name)
        if m is None:
            continue
        with path.open(encoding="utf-8-sig", newline="") as fh:
            if any(
                len(row) > _SEGMENT_MAP and row[_SEGMENT_MAP].strip() == segment_map for row in csv.reader(fh)
            ):
                out.add(m.group(1))
    return frozenset(out)


def unmapped_by_structure(directory: Path) -> dict[str, frozenset[str]]:
    """Every message map under ``directory`` (the IG's ``mappings/messages``): structure → its segments that
    no row gives a FHIR target."""
    out: dict[str, frozenset[str]] = {}
    for path in sorted(directory.glob("*.csv")):
        m = _MAP_NAME.search(path.name)
        if m is None:
            continue
        segments = read_map(path)
        out[m.group(1)] = frozenset(s for s, mapped in segments.items() if not mapped)
    return out


BUILTIN: dict[str, frozenset[str]] = {
    "ADT_A01": frozenset(
        {
            "ACC",
            "ARV",
            "AUT",
            "DB1",
            "DRG",
            "GT1",
            "IAM",
            "IN2",
            "OH1",
            "OH2",
            "OH3",
            "OH4",
            "PDA",
            "RF1",
            "UAC",
        }
        | {"UB1", "UB2"}
    ),
    "ADT_A02": frozenset({"ARV", "DB1", "OH1", "OH2", "OH3", "OH4", "PDA", "UAC"}),
    "ADT_A05": frozenset(
        {"ACC", "ARV", "AUT", "DB1", "DRG", "GT1", "IAM", "IN2", "OH1", "OH2", "OH3", "OH4", "RF1", "UAC"}
        | {"UB1", "UB2"}
    ),
    "ADT_A06": frozenset(
        {"ACC", "ARV", "DB1", "DRG", "GT1", "IAM", "IN2", "OH1", "OH2", "OH3", "OH4", "UAC", "UB1", "UB2"}
    ),
    "ADT_A09": frozenset({"ARV", "DB1", "PRT", "UAC"}),
    "ADT_A11": frozenset({"ARV", "DB1", "UAC"}),
    "ADT_A17": frozenset({"ARV", "DB1", "PRT", "UAC"}),
    "MDM_T02": frozenset({"CON", "TQ2", "UAC"}),
    "OML_O21": frozenset(
        {"ARV", "BLG", "CTD", "CTI", "FT1", "GT1", "IN2", "SAC", "SGH", "SGT", "TCD", "TQ2", "UAC"}
    ),
    "ORM_O01": frozenset({"BLG", "CTD", "CTI", "FT1", "GT1", "ODT", "RQ1", "RQD"}),
    "ORU_R01": frozenset({"ARV", "CTD", "CTI", "DSC", "FT1", "TQ1", "TQ2", "TXA", "UAC"}),
    "SIU_S12": frozenset({"RGS"}),
    "VXU_V04": frozenset({"ARV", "GT1", "TQ1", "TQ2", "UAC"}),
}
""":func:`unmapped_by_structure` of the corpus's IG copy (v2-to-fhir-ig 8c9b414, 13 message maps)."""


ENCOUNTER_DIAGNOSIS_BUILTIN: frozenset[str] = frozenset({"ADT_A01", "ADT_A05", "ADT_A06", "ADT_A11"})
""":func:`structures_with` ``DG1[Encounter]`` of the corpus's IG copy: only these maps put a DG1 on
Encounter.diagnosis (SIU_S12, ORM_O01, OML_O21 make a Condition of it, ORM_O01 the order's reasonReference)."""


def _load() -> tuple[dict[str, frozenset[str]], frozenset[str]]:
    directory = corpus_dir() / MESSAGE_MAPS
    if directory.is_dir():
        found = unmapped_by_structure(directory)
        if found:
            return found, structures_with(directory, "DG1[Encounter]")
    return dict(BUILTIN), ENCOUNTER_DIAGNOSIS_BUILTIN


UNMAPPED, ENCOUNTER_DIAGNOSIS = _load()
"""Structure → its IG-unmapped segments, and the structures whose map has DG1[Encounter]: read from the IG's
CSVs once, at import, where they are found."""

SLUICE_MAPPED: frozenset[str] = frozenset({"IAM", "TQ1"})
"""Segments a structure's IG map leaves without a target that Sluice maps there all the same, each by a
documented choice (docs/mapping.md): IAM → AllergyIntolerance (the IG's IAM[AllergyIntolerance] segment map,
which its ADT maps do not reference yet), TQ1 → the order's ServiceRequest.occurrenceTiming (the IG's
TQ1[ServiceRequest], which its MDM/OML maps use).  A value Sluice lacks from them is a Sluice gap, never
explained."""

DEFAULT: frozenset[str] = frozenset(
    {"ARV", "UAC", "OH1", "OH2", "OH3", "OH4", "DB1", "DRG", "GT1", "IN2", "AUT", "RF1", "ACC", "UB1", "UB2"}
    | {"PDA", "RGS", "TQ2", "CTD", "CTI", "DSC", "TXA", "CON"}
)
"""The IG-unmapped segments of a message whose structure has no IG map (DFT, BAR, OUL, PPR, RDE, REF, ADT_A03,
ADT_A39, ...): segments no IG message map gives a target, IN2, which has no IG segment map (ORM_O01 names
only its Coverage), and TXA, which only a document message's map (MDM_T02) maps.  FT1 is not among them: a DFT
is about its FT1s, and Sluice maps them to ChargeItem."""

# HL7 table 0354: the structure of an event whose MSH-9.3 is empty, for the events the IG's maps cover
_EVENT_MAPS: dict[str, str] = {
    **dict.fromkeys(("ADT_A04", "ADT_A08", "ADT_A13"), "ADT_A01"),
    **dict.fromkeys(("ADT_A14", "ADT_A28", "ADT_A31"), "ADT_A05"),
    "ADT_A07": "ADT_A06",
    **dict.fromkeys(("ADT_A10", "ADT_A12", "ADT_A15"), "ADT_A09"),
    **dict.fromkeys(tuple(f"SIU_S{n}" for n in range(13, 27)), "SIU_S12"),
    **dict.fromkeys(tuple(f"MDM_T{n:02d}" for n in range(1, 12) if n != 2), "MDM_T02"),
}


def structure(message_type: str, trigger: str, declared: str) -> str:
    """The IG map a message's segments are judged by: the map named after its event when there is one (the IG
    has ADT_A11 and ADT_A17 maps), else the one MSH-9.3 names, else table 0354's structure for the event
    (ADT^A04 → ADT_A01; every MDM → MDM_T02, the IG's MDM_T01 map being unfinished); "" when none of them
    has an IG map."""
    for name in (f"{message_type}_{trigger}".upper(), declared.strip().upper()):
        if name in UNMAPPED:
            return name
        if (mapped := _EVENT_MAPS.get(name)) is not None and mapped in UNMAPPED:
            return mapped
    return ""


def unmapped_segments(message_type: str, trigger: str, declared: str) -> frozenset[str]:
    """The segments the IG's map for this message's structure leaves without a FHIR target (less
    :data:`SLUICE_MAPPED`); :data:`DEFAULT` where the IG has no map for it."""
    name = structure(message_type, trigger, declared)
    if not name:
        return DEFAULT
    return UNMAPPED[name] - SLUICE_MAPPED


__all__ = [
    "BUILTIN",
    "DEFAULT",
    "ENCOUNTER_DIAGNOSIS",
    "SLUICE_MAPPED",
    "UNMAPPED",
    "structure",
    "structures_with",
    "unmapped_by_structure",
    "unmapped_segments",
]
