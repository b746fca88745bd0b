"""Field-level agreement between a Sluice bundle and a reference bundle (e.g. Microsoft FHIR-Converter's).

What is compared (every leaf the *reference* has; what only Sluice emits is never penalised):

* identifiers (value, and system where the reference has one), names (family, given),
  ``birthDate``, ``gender``, addresses (line, city, state, postalCode, country),
  telecom (system, value, use), periods and times (``period``, ``*Period``, ``effective*``,
  ``onset*``, ``occurrence*``, Appointment ``start``/``end``), codes (system + code of every
  CodeableConcept / Coding outside identifiers, references and extensions, e.g.
  ``Observation.code``, ``Encounter.class``), values (``value[x]``) and statuses
  (``status`` and ``*Status`` concepts).
* ids, ``fullUrl``, references, narrative, ``meta`` and extensions are never compared.

Resources are matched across the bundles by type and business identity (shared identifier
values; code + effective time for Observations; code for Conditions etc.; family name for
people), never by position.  Only :data:`SCORED_TYPES` are scored; the reference's other
resources (the MS converter emits an Organization, Location or Device for nearly every
HD/PL/EI it meets) are only counted.

Normalisation: text is whitespace-trimmed and -collapsed; systems are compared
case-insensitively with OID aliases of the common terminologies; phone numbers by digits;
dates as instants when both sides carry an offset, else by their wall-clock components at
equal precision.

Explained differences.  A difference caused by a known quirk of the reference converter is
*explained*: kept in the list with its rule (:data:`RULES`) and reason, and left out of the
explained agreement figure, never out of the raw one.  Every rule checks its evidence in the HL7
source message (:class:`Source`) before it excuses a field; without the source nothing is
explained.  The raw figure (:attr:`Score.raw_percent`) counts every compared field of every
reference resource of :data:`SCORED_TYPES`, reference Practitioners included.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

from conformance import igmaps

SCORED_TYPES: tuple[str, ...] = (
    "Patient",
    "Encounter",
    "RelatedPerson",
    "Practitioner",
    "AllergyIntolerance",
    "Condition",
    "Coverage",
    "Observation",
    "DiagnosticReport",
    "ServiceRequest",
    "Specimen",
    "Appointment",
    "Account",
    "ChargeItem",
    "Procedure",
    "MedicationRequest",
    "MedicationDispense",
    "Medication",
    "Goal",
)
"""Resource types whose fields are scored (the ones Sluice's mapping spec covers)."""

CATEGORIES: tuple[str, ...] = (
    "identifiers",
    "names",
    "birthDate",
    "gender",
    "addresses",
    "telecom",
    "periods",
    "codes",
    "values",
    "statuses",
)

MS_PLACEHOLDER_PREFIX = "http://example.com/v2-to-fhir-converter/"
"""The MS converter invents ``http://example.com/v2-to-fhir-converter/Identifier/<authority>`` and
``.../CodeSystem/<coding system>`` systems for authorities and coding systems it has no URI for, with
the name the message gives them (spaces turned into ``-``)."""

_FINANCIAL_GROUP = frozenset({"PR1", "PRT", "ROL", "NTE"})
"""Segments of a DFT's FINANCIAL group after its FT1 (FINANCIAL_PROCEDURE: PR1 with its ROL/PRT; notes)."""

MS_SIBLING_PLACEHOLDERS: dict[tuple[str, int], tuple[int, int]] = {
    ("FT1", 2): (
        13,
        3,
    ),  # ChargeItem.identifier: FT1-2, "system" named after FT1-13.3 (department code's system)
}
"""MS placeholder systems named after a component of another field of the segment that holds the identifier
(its ``_ChargeItem.liquid``: ``.../Identifier/{{FT1.13.3}}``): (segment, identifier field) → (field, component).
The evidence is that component of the same segment repetition."""

MS_FIELD_PLACEHOLDERS: dict[str, tuple[str, int]] = {
    "sid/us-medicaid": ("IN2", 8),  # Medicaid Case Number
    "sid/us-military": ("IN2", 10),  # Military ID Number
    "Identifier/policy-id": ("IN1", 36),  # Policy Number
}
"""MS placeholder systems named after the field an identifier comes from, not after a name in the
message: the evidence is the identifier's value in that field."""

RULES: dict[str, str] = {
    "ms-placeholder": "MS placeholder system (example.com) for an authority or coding system the message "
    "names without a URI",
    "xtn-cp-mobile": "XTN-3 CP → telecom use mobile (IG TelecommunicationEquipmentType map); MS keeps the "
    "field's home/work use",
    "xpn15-nickname": "XPN-15 (called by) → a second name with use nickname (IG XPN[HumanName]); MS appends "
    "it to given",
    "ig-unmapped-segment": "value found only in segments the IG's message maps leave unmapped",
    "ms-segment-observation": "Observation MS synthesises from one IG-unmapped segment (PDA, ACC)",
    "unscored-practitioner": "Practitioner only of resources that are not scored (Provenance, Procedure, "
    "Specimen, ...)",
    "ig-document-obx": "Observation / DiagnosticReport MS makes from the OBX / OBR of a document message "
    "(TXA), which the IG's MDM maps put into DocumentReference.content / ServiceRequest",
    "ig-condition": "resource MS makes where the IG's message map makes none for this message (SIU: "
    "ServiceRequest only IF SCH-26 or SCH-27 VALUED; Account from PID-18 only in the ADT maps)",
    "ig-unmapped-code": "a code the IG's concept map leaves without a FHIR target: MS says unknown, Sluice "
    "uses its documented choice (docs/mapping.md)",
    "ms-segment-procedure": "Procedure MS synthesises from the PDA segment (death certification, autopsy), "
    "which the IG's message maps leave unmapped",
    "ig-implementer-status": "a status the IG leaves to the implementer (PR1[Procedure]: by the message context, "
    "'unknown' only if not clear; no IG map for FT1): MS's templates write the constant unknown, Sluice its "
    "documented choice (docs/mapping.md)",
    "ms-charge-resource": "MedicationDispense / second Procedure MS synthesises from an FT1 (the FT1-29 NDC charged; "
    "FT1-25 beside the PR1 of its FINANCIAL group): no IG map covers FT1; Sluice keeps the NDC as "
    "ChargeItem.productCodeableConcept and makes one Procedure of a procedure",
    "ig-prt-role": "the person of a PRT after PID / PD1 whose PRT-4 is not PP: MS makes it the Patient's "
    "generalPractitioner; the IG's maps do so only IF PRT-4 IS PP (ADT: AD and the like → CareTeam, not scored; "
    "ORU/OML: a RelatedPerson)",
    "ms-split-practitioner": "one identifier the message gives two names (two XCN/CNN fields): MS makes a "
    "Practitioner per name, Sluice one per identifier (the first name it meets; docs/mapping.md)",
    "ig-dg1-context": "Encounter.diagnosis MS fills from the DG1 of a message whose IG map gives DG1 no "
    "DG1[Encounter] row (SIU_S12, ORM_O01, OML_O21: a Condition; only the ADT maps put it on the Encounter)",
    "ms-merged-mother": "MS puts the PID-21 mother's identifier and relationship MTH on the NK1's "
    "RelatedPerson; Sluice makes the mother a RelatedPerson of her own (IG CX[RelatedPerson-Mother])",
    "ms-performer-role": "Procedure.performer.function: MS's own performer-role codes for PR1-8/11/12; the IG "
    "(PR1[Procedure]) gives SNOMED 88189002 / 304292004 for PR1-8 / PR1-11 and no function for PR1-12",
    "ig-unmapped-rol": "Practitioner MS makes from a ROL of the PROCEDURE or INSURANCE group (no target in the "
    "IG's message maps) and refers to from the Procedure / Coverage it makes",
    "ms-parent-procedure": "Procedure MS makes with only the PR1-25 parent procedure id; the IG makes "
    "Procedure.partOf of it, which Sluice writes as a reference by that identifier",
    "derived-report-status": "DiagnosticReport.status of an OBR without OBR-25 (the IG maps the status only from "
    "OBR-25): MS says unknown, Sluice derives it from the results' statuses (docs/mapping.md)",
    "order-status-unstated": "ServiceRequest.status of an order the message gives no ORC for (an OBR without ORC, "
    "a parent order named in OBR-29 / ORC-8): Sluice says unknown, MS active",
    "ig-order-control": "ServiceRequest.status from ORC-1 when ORC-5 is empty (IG OrderControlCode"
    "[ServiceRequest.status]): Sluice follows the IG's map, MS says unknown",
    "ms-attachment-report": "DiagnosticReport MS makes from an OBX that carries an attachment (OBX-2 RP or ED); "
    "the IG maps that OBX to an Observation (RP → valueAttachment) or the report's presentedForm",
    "ms-obr-specimen-identifier": "identifier MS copies from OBR-3 / OBR-53 onto the Specimen it makes of an "
    "OBR; the IG's OBR[Specimen] gives that Specimen only OBR-2 (accessionIdentifier)",
    "ig-no-target-participant": "Practitioner MS makes from an order's PRT whose role the IG's maps give no "
    "target (they map an order's PRT only for OP, SC, ARI, TN, TR, PRI of HL70443) or from OBR-28 result copies "
    "to (deferred by the IG), and refers to from the Patient or the order",
    "ms-table-system": "a code of a field bound to an HL7 table that the message sends with a coding system of "
    "its own (SCT, L, ...): MS gives it the table's v2 system, Sluice the system the message names",
    "keyless-encounter": "Encounter MS makes from the PV1 of a message that is not an ADT and has neither PV1-19 "
    "(visit number) nor PV1-44 (admit time): Sluice references the ADT feed's Encounter by that key and makes "
    "none without one (docs/mapping.md)",
    "ms-unsplit-subcomponents": "identifier MS makes of a whole component with its subcomponents unsplit (the "
    "value and the placeholder system keep the '&'), where Sluice reads the subcomponents",
    "ms-order-field": "a ServiceRequest value MS takes from an ORC / OBR field the IG maps elsewhere or not at "
    "all: ORC-4 (EI) as an identifier (IG: requisition), OBR-24 as a locationCode (IG: no target), the ORC-8 "
    "parent as a ServiceRequest of its own (IG: no ORC-8 row)",
    "ms-system-name": "a coding-system name MS's name table turns into a URI that is no system for such codes "
    "(I9 → sid/icd-9, which FHIR does not register; ISO → urn:iso:std:iso:3986, the URI standard) where Sluice "
    "writes its documented system (docs/mapping.md)",
    "xcn-without-id": "Practitioner MS makes from an XCN without an id (XCN-1 empty): Sluice refers to the name "
    "alone (display), a name being no identity to match a Practitioner on (docs/mapping.md)",
    "ig-concept-map": "a code MS keeps as sent (no system) where Sluice applies the IG's concept map for the field "
    "(Relationship: NK1-3 / NK1-7 EMC → v2-0131 C)",
    "ms-invalid-oid": "an identifier system MS writes as urn:oid: + an HD-2 that is no OID (urn:oid:r2.3); Sluice "
    "names the authority by HD-1 as for any authority without a URI",
    "ms-empty-xcn": "Encounter.participant MS makes from a PV1 practitioner field that holds only delimiters "
    "(no id, no name): nobody is named",
    "ig-planned-period": "Encounter.period from PV2-8 / PV2-9 (expected admit / discharge) in MS; the IG maps them "
    "to the planned start / end extensions and the actual stay (PV1-44 / PV1-45) to period",
}

OBX_STATUS_IG_UNMAPPED: frozenset[str] = frozenset("BINORSUV")
"""OBX-11 codes (table 0085) the IG's ObservationResultStatusCodesInterpretation concept map lists without a
FHIR status (v2-to-fhir-ig/mappings/codesystems)."""
"""Every explanation rule: key → what it excuses.  Each one checks its evidence in the HL7 message."""

SYSTEM_ALIASES: dict[str, str] = {
    "urn:oid:2.16.840.1.113883.6.1": "http://loinc.org",
    "urn:oid:2.16.840.1.113883.6.96": "http://snomed.info/sct",
    "urn:oid:2.16.840.1.113883.6.90": "http://hl7.org/fhir/sid/icd-10-cm",
    "urn:oid:2.16.840.1.113883.6.3": "http://hl7.org/fhir/sid/icd-10",
    "urn:oid:2.16.840.1.113883.6.103": "http://hl7.org/fhir/sid/icd-9-cm",
    "urn:oid:2.16.840.1.113883.6.88": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "urn:oid:2.16.840.1.113883.12.292": "http://hl7.org/fhir/sid/cvx",
    "urn:oid:2.16.840.1.113883.6.8": "http://unitsofmeasure.org",
    "urn:oid:2.16.840.1.113883.4.1": "http://hl7.org/fhir/sid/us-ssn",
    "urn:oid:2.16.840.1.113883.4.6": "http://hl7.org/fhir/sid/us-npi",
    "https://loinc.org": "http://loinc.org",
    "http://www.snomed.org/": "http://snomed.info/sct",
}


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class FieldDiff:
    """One compared field (or, for a reference resource Sluice did not produce, all of its fields) on
    which the two bundles disagree."""

    path: str  # e.g. "Patient[12345].birthDate"
    category: str
    ours: str  # "" when Sluice has no value there
    expected: str
    explanation: str = ""  # non-empty: a known, explained difference, with its evidence
    file: str = ""
    rule: str = ""  # the key in RULES of the explanation (set exactly when explanation is)
    fields: int = 1  # compared fields this line stands for (a resource not produced: all of its fields)


@dataclass
class Score:
    """Counts for one bundle pair (or a total)."""

    compared: int = 0
    agreeing: int = 0
    explained: int = 0
    diffs: list[FieldDiff] = field(default_factory=list)
    by_category: dict[str, list[int]] = field(default_factory=dict)  # cat -> [compared, agreeing, explained]
    expected_resources: Counter[str] = field(default_factory=Counter)
    our_resources: Counter[str] = field(default_factory=Counter)
    unmatched: list[str] = field(default_factory=list)  # reference resources Sluice did not produce

    @property
    def scored(self) -> int:
        """Compared fields minus explained differences: the explained figure's denominator."""
        return self.compared - self.explained

    @property
    def percent(self) -> float | None:
        """Agreement with the explained differences left out."""
        return 100.0 * self.agreeing / self.scored if self.scored else None

    @property
    def raw_percent(self) -> float | None:
        """Agreement over every compared field, nothing left out."""
        return 100.0 * self.agreeing / self.compared if self.compared else None

    @property
    def explained_by(self) -> Counter[str]:
        """Fields excused by each rule of :data:`RULES`."""
        out: Counter[str] = Counter()
        for d in self.diffs:
            if d.rule:
                out[d.rule] += d.fields
        return out

    def record(self, category: str, ok: bool, diff: FieldDiff | None = None) -> None:
        cat = self.by_category.setdefault(category, [0, 0, 0])
        self.compared += 1
        cat[0] += 1
        if ok:
            self.agreeing += 1
            cat[1] += 1
            return
        assert diff is not None
        assert bool(diff.explanation) == bool(diff.rule) and diff.rule in ("", *RULES), diff
        if diff.explanation:
            self.explained += 1
            cat[2] += 1
        self.diffs.append(diff)

    def record_missing(self, label: str, missing: Score, why: str = "", rule: str = "") -> None:
        """A reference resource Sluice did not produce: all of its ``missing.compared`` fields disagree."""
        assert bool(why) == bool(rule) and rule in ("", *RULES)
        self.compared += missing.compared
        if why:
            self.explained += missing.compared
        for cat, (c, _a, _e) in missing.by_category.items():
            counts = self.by_category.setdefault(cat, [0, 0, 0])
            counts[0] += c
            if why:
                counts[2] += c
        self.unmatched.append(label)
        self.diffs.append(
            FieldDiff(
                label,
                "resource",
                "",
                f"(not produced: {missing.compared} reference fields)",
                why,
                rule=rule,
                fields=missing.compared,
            )
        )

    def explain(self, n: int, why: str, rule: str) -> None:
        """Mark the unexplained single-field difference ``diffs[n]`` as explained by ``rule``."""
        d = self.diffs[n]
        assert why and rule in RULES and not d.explanation and d.fields == 1
        self.diffs[n] = FieldDiff(d.path, d.category, d.ours, d.expected, why, d.file, rule)
        self.explained += 1
        self.by_category.setdefault(d.category, [0, 0, 0])[2] += 1

    def add(self, other: Score, file: str = "") -> None:
        self.compared += other.compared
        self.agreeing += other.agreeing
        self.explained += other.explained
        for d in other.diffs:
            self.diffs.append(d if d.file or not file else FieldDiff(**{**d.__dict__, "file": file}))
        for cat, (c, a, e) in other.by_category.items():
            mine = self.by_category.setdefault(cat, [0, 0, 0])
            mine[0] += c
            mine[1] += a
            mine[2] += e
        self.expected_resources.update(other.expected_resources)
        self.our_resources.update(other.our_resources)
        self.unmatched.extend(f"{file}: {u}" if file else u for u in other.unmatched)


# ----------------------------------------------------------------------------- normalisation
_WS = re.compile(r"\s+")


def norm_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return _WS.sub(" ", str(value)).strip()


def norm_system(system: Any) -> str:
    s = norm_text(system).lower().rstrip("/")
    return SYSTEM_ALIASES.get(s, s)


def norm_phone(value: Any) -> str:
    s = norm_text(value).lower()
    for prefix in ("tel:", "mailto:", "fax:"):
        if s.startswith(prefix):
            s = s[len(prefix) :]
    if "@" in s:
        return s
    digits = re.sub(r"[\s().\-/]", "", s)
    return digits or s


def norm_number(value: Any) -> str:
    try:
        d = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        return norm_text(value)
    if d == d.to_integral_value():
        return str(d.to_integral_value())
    return str(d.normalize())


_DT = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?"
    r"(Z|[+-]\d{2}:?\d{2})?)?)?)?$"
)


@dataclass(frozen=True)
class _When:
    parts: tuple[int, ...]  # year, month, day, hour, minute, second, microsecond (as far as given)
    offset: timedelta | None

    @property
    def has_time(self) -> bool:
        return len(self.parts) > 3

    def instant(self) -> datetime:
        p = list(self.parts) + [1, 1, 0, 0, 0, 0][len(self.parts) - 1 :]
        tz = timezone(self.offset) if self.offset is not None else UTC
        return datetime(p[0], p[1], p[2], p[3], p[4], p[5], p[6], tzinfo=tz)


_HL7_WHEN = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d+)?([+-]\d{4})?$")


def hl7_when(value: str) -> str:
    """An HL7 DTM (``YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]``) as the ISO text :func:`parse_when` reads; "" if it is
    none."""
    m = _HL7_WHEN.match(norm_text(value))
    if m is None:
        return ""
    y, mo, d, h, mi, sec, off = m.groups()
    out = y + (f"-{mo}" if mo else "") + (f"-{d}" if mo and d else "")
    if mo and d and h:
        out += f"T{h}:{mi or '00'}:{sec or '00'}" + (f"{off[:3]}:{off[3:]}" if off else "")
    return out


def parse_when(value: Any) -> _When | None:
    m = _DT.match(norm_text(value))
    if m is None:
        return None
    y, mo, d, h, mi, s, frac, off = m.groups()
    parts = [int(y)]
    for x in (mo, d, h, mi):
        if x is None:
            break
        parts.append(int(x))
    if h is not None:
        parts.append(int(s) if s else 0)  # hh:mm == hh:mm:00
        parts.append(int((frac or "0")[:6].ljust(6, "0")))
    offset: timedelta | None = None
    if off:
        if off == "Z":
            offset = timedelta(0)
        else:
            sign = -1 if off[0] == "-" else 1
            digits = off[1:].replace(":", "")
            offset = sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    return _When(tuple(parts), offset)


def compare_dates(ours: Any, expected: Any) -> bool:
    """Instants when both carry offsets, else wall clock at equal precision."""
    a, b = parse_when(ours), parse_when(expected)
    if a is None or b is None:
        return norm_text(ours) == norm_text(expected)
    if a.has_time and b.has_time and a.offset is not None and b.offset is not None:
        try:
            return a.instant() == b.instant()
        except ValueError:
            return False
    return a.parts == b.parts


# ----------------------------------------------------------------------------- extraction
def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _identifiers(res: Mapping[str, Any]) -> list[dict[str, str]]:
    """``identifier`` values (and systems); a Specimen's ``accessionIdentifier`` counts as one of them (the IG
    puts OBR-2 there, and identifies a specimen by it as much as by SPM-2)."""
    out = []
    idents = _as_list(res.get("identifier"))
    if isinstance(res.get("accessionIdentifier"), dict):
        idents = [*idents, res["accessionIdentifier"]]
    for ident in idents:
        if not isinstance(ident, dict) or not norm_text(ident.get("value")):
            continue
        d = {"value": norm_text(ident.get("value"))}
        if norm_text(ident.get("system")):
            d["system"] = norm_text(ident.get("system"))
        out.append(d)
    return out


def _names(res: Mapping[str, Any]) -> list[dict[str, str]]:
    out = []
    for name in _as_list(res.get("name")):
        if not isinstance(name, dict):
            continue
        d = {}
        if norm_text(name.get("family")):
            d["family"] = norm_text(name.get("family"))
        given = " ".join(norm_text(g) for g in _as_list(name.get("given")) if norm_text(g))
        if given:
            d["given"] = given
        if d:
            out.append(d)
    return out


def _addresses(res: Mapping[str, Any]) -> list[dict[str, str]]:
    out = []
    for addr in _as_list(res.get("address")):
        if not isinstance(addr, dict):
            continue
        d = {}
        line = " ".join(norm_text(x) for x in _as_list(addr.get("line")) if norm_text(x))
        if line:
            d["line"] = line
        for k in ("city", "state", "postalCode", "country"):
            if norm_text(addr.get(k)):
                d[k] = norm_text(addr.get(k))
        if d:
            out.append(d)
    return out


def _telecoms(res: Mapping[str, Any]) -> list[dict[str, str]]:
    out = []
    for tel in _as_list(res.get("telecom")):
        if not isinstance(tel, dict) or not norm_text(tel.get("value")):
            continue
        d = {k: norm_text(tel.get(k)) for k in ("system", "value", "use") if norm_text(tel.get(k))}
        out.append(d)
    return out


_LIST_FIELDS = {
    "identifiers": ("identifier", _identifiers),
    "names": ("name", _names),
    "addresses": ("address", _addresses),
    "telecom": ("telecom", _telecoms),
}

_SKIP_KEYS = frozenset(
    {
        "id",
        "meta",
        "text",
        "extension",
        "modifierExtension",
        "contained",
        "identifier",
        "name",
        "address",
        "telecom",
        "note",
        "presentedForm",
        "content",
        "div",
    }
)

_TIME_KEYS = frozenset(
    {
        "effectiveDateTime",
        "effectiveInstant",
        "onsetDateTime",
        "abatementDateTime",
        "occurrenceDateTime",
        "receivedTime",
        "start",
        "end",
        # the issue #14 types: Procedure, MedicationRequest, MedicationDispense, ChargeItem, Goal
        "performedDateTime",
        "authoredOn",
        "whenPrepared",
        "whenHandedOver",
        "enteredDate",
        "startDate",
    }
)


def _is_value_key(key: str) -> bool:
    return key.startswith("value") and len(key) > 5 and key[5].isupper()


def _codes(obj: Any, path: str, out: dict[str, list[tuple[str, str]]]) -> None:
    """Every coding (system, code) under ``obj``, grouped by element path (no list indexes)."""
    if isinstance(obj, list):
        for x in obj:
            _codes(x, path, out)
        return
    if not isinstance(obj, dict) or "reference" in obj:
        return
    if isinstance(obj.get("coding"), list):
        for c in obj["coding"]:
            if isinstance(c, dict) and norm_text(c.get("code")):
                out.setdefault(path, []).append((norm_text(c.get("system")), norm_text(c.get("code"))))
        return
    if isinstance(obj.get("code"), str) and "value" not in obj and ("system" in obj or "display" in obj):
        if norm_text(obj.get("code")):
            out.setdefault(path, []).append((norm_text(obj.get("system")), norm_text(obj["code"])))
        return
    for k, v in obj.items():
        if k in _SKIP_KEYS or k.startswith("_") or _is_value_key(k):
            continue
        _codes(v, f"{path}.{k}" if path else k, out)


def _times(res: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in res.items():
        if k in _TIME_KEYS and isinstance(v, str):
            out[k] = v
        elif (k == "period" or (k.endswith("Period") and not _is_value_key(k))) and isinstance(v, dict):
            for sub in ("start", "end"):
                if isinstance(v.get(sub), str):
                    out[f"{k}.{sub}"] = v[sub]
        elif k == "collection" and isinstance(v, dict):  # Specimen.collection.collected[x]
            if isinstance(v.get("collectedDateTime"), str):
                out["collection.collectedDateTime"] = v["collectedDateTime"]
            period = v.get("collectedPeriod")
            if isinstance(period, dict):
                for sub in ("start", "end"):
                    if isinstance(period.get(sub), str):
                        out[f"collection.collectedPeriod.{sub}"] = period[sub]
    return out


_DATE_VALUE_KEYS = frozenset({"valueDateTime", "valueInstant", "valueDate"})


def _value_leaves(key: str, v: Any, out: dict[str, tuple[str, str]]) -> None:
    """Flatten a value[x] into path -> (kind, value); CodeableConcepts are left to :func:`_codes`."""
    if isinstance(v, dict):
        if "coding" in v:
            return
        for sub, sv in v.items():
            if sub in ("extension", "id"):
                continue
            if sub == "value":
                out[f"{key}.value"] = ("number", norm_number(sv))
            elif sub in ("start", "end"):
                out[f"{key}.{sub}"] = ("date", norm_text(sv))
            elif sub == "system":
                out[f"{key}.system"] = ("system", norm_text(sv))
            elif isinstance(sv, dict):
                _value_leaves(f"{key}.{sub}", sv, out)
            elif isinstance(sv, str | int | float | bool):
                out[f"{key}.{sub}"] = ("text", norm_text(sv))
        return
    if isinstance(v, bool):
        out[key] = ("text", norm_text(v))
    elif isinstance(v, int | float):
        out[key] = ("number", norm_number(v))
    elif isinstance(v, str):
        out[key] = ("date" if key in _DATE_VALUE_KEYS else "text", norm_text(v))


_QUANTITY_KEYS: dict[str, frozenset[str]] = {
    "ChargeItem": frozenset({"quantity", "priceOverride"}),
    "MedicationDispense": frozenset({"quantity", "daysSupply"}),
}
"""Quantities that are the value of a resource without value[x]: how much was charged or dispensed."""


def _values(res: Mapping[str, Any]) -> tuple[dict[str, tuple[str, str]], dict[str, list[tuple[str, str]]]]:
    leaves: dict[str, tuple[str, str]] = {}
    codes: dict[str, list[tuple[str, str]]] = {}
    quantities = _QUANTITY_KEYS.get(str(res.get("resourceType")), frozenset())
    for k, v in res.items():
        if k in quantities:
            _value_leaves(k, v, leaves)
        elif _is_value_key(k):
            _value_leaves(k, v, leaves)
            if isinstance(v, dict) and "coding" in v:
                _codes(v, k, codes)
    return leaves, codes


def _summary_value(res: Mapping[str, Any]) -> str:
    for k, v in res.items():
        if _is_value_key(k):
            return f"{k}={_short(v)}"
    return ""


def _short(v: Any, limit: int = 120) -> str:
    s = v if isinstance(v, str) else repr(v)
    s = norm_text(s)
    return s if len(s) <= limit else s[: limit - 1] + "…"


# ----------------------------------------------------------------------------- comparing two resources
def _eq(kind: str, ours: str, expected: str) -> bool:
    if kind == "date":
        return compare_dates(ours, expected)
    if kind == "system":
        return norm_system(ours) == norm_system(expected)
    if kind == "number":
        return norm_number(ours) == norm_number(expected)
    if kind == "phone":
        return norm_phone(ours) == norm_phone(expected)
    if kind == "ci":
        return norm_text(ours).lower() == norm_text(expected).lower()
    return norm_text(ours) == norm_text(expected)


_LEAF_KIND = {
    ("identifiers", "system"): "system",
    ("telecom", "value"): "phone",
    ("telecom", "system"): "ci",
    ("telecom", "use"): "ci",
    ("addresses", "country"): "ci",
    ("addresses", "state"): "ci",
}


def _label(elem: Mapping[str, str], category: str) -> str:
    for k in {
        "identifiers": ("value",),
        "names": ("family", "given"),
        "addresses": ("line", "city", "postalCode"),
        "telecom": ("value",),
    }[category]:
        if elem.get(k):
            return elem[k]
    return "?"


def _pair_lists(
    category: str, exp: list[dict[str, str]], ours: list[dict[str, str]]
) -> list[tuple[dict[str, str], dict[str, str] | None]]:
    cands = []
    for i, e in enumerate(exp):
        for j, o in enumerate(ours):
            s = sum(1 for k, v in e.items() if k in o and _eq(_LEAF_KIND.get((category, k), "text"), o[k], v))
            # the identifying leaf weighs most (value of identifier/telecom, family of a name)
            key = (
                "value"
                if category in ("identifiers", "telecom")
                else ("family" if category == "names" else "line")
            )
            if key in e and key in o and _eq(_LEAF_KIND.get((category, key), "text"), o[key], e[key]):
                s += 10
            if s:
                cands.append((s, i, j))
    cands.sort(key=lambda t: (-t[0], t[1], t[2]))
    used_e: set[int] = set()
    used_o: set[int] = set()
    pairing: dict[int, int] = {}
    for _s, i, j in cands:
        if i in used_e or j in used_o:
            continue
        used_e.add(i)
        used_o.add(j)
        pairing[i] = j
    return [(e, ours[pairing[i]] if i in pairing else None) for i, e in enumerate(exp)]


def _status_category(path: str) -> str:
    last = path.rsplit(".", 1)[-1]
    if last == "status" or last.endswith("Status"):
        return "statuses"
    if _is_value_key(path.split(".", 1)[0]):
        return "values"
    return "codes"


def _diff(
    score: Score, category: str, path: str, ours: str, expected: str, why: str = "", rule: str = ""
) -> None:
    score.record(category, False, FieldDiff(path, category, ours, expected, why, rule=rule if why else ""))


def compare_resources(
    ours: Mapping[str, Any],
    expected: Mapping[str, Any],
    base: str,
    score: Score,
    source: Source | None = None,
) -> None:
    """Record every reference leaf of ``expected`` against ``ours`` into ``score``; explain a difference
    only where ``source`` (the HL7 message) holds the evidence of its rule."""
    # identifiers, names, addresses, telecom: lists matched element by element
    for category, (key, fn) in _LIST_FIELDS.items():
        # an element the reference states twice (MS's one name per XCN of the same practitioner) is one fact
        listed = fn(expected)
        exp_elems = [e for i, e in enumerate(listed) if e not in listed[:i]]
        if not exp_elems:
            continue
        for e, o in _pair_lists(category, exp_elems, fn(ours)):
            label = _label(e, category)
            for leaf, ev in e.items():
                ov = (o or {}).get(leaf, "")
                if ov and _eq(_LEAF_KIND.get((category, leaf), "text"), ov, ev):
                    score.record(category, True)
                    continue
                why, rule = "", ""
                if category == "identifiers" and leaf == "system":
                    why, rule = _placeholder(e.get("value", ""), ev, source), "ms-placeholder"
                    if not why and (why := _invalid_oid(ev, source)):
                        rule = "ms-invalid-oid"
                elif (
                    category == "telecom" and leaf == "use" and ov.lower() == "mobile" and source is not None
                ):
                    number = e.get("value", "")
                    if norm_phone((o or {}).get("value", "")) == norm_phone(number) and (
                        where := source.mobile(number)
                    ):
                        why = f"{where} has XTN-3 CP: Sluice says use mobile (IG), MS keeps {ev!r}"
                    rule = "xtn-cp-mobile"
                elif category == "names" and leaf == "given":
                    why, rule = _called_by(ours, ov, ev, source), "xpn15-nickname"
                _diff(score, category, f"{base}.{key}[{label}].{leaf}", ov, ev, why, rule)

    # scalars
    for key, category, kind in (
        ("birthDate", "birthDate", "date"),
        ("gender", "gender", "ci"),
        ("status", "statuses", "ci"),
    ):
        if isinstance(expected.get(key), str) and norm_text(expected[key]):
            ov = norm_text(ours.get(key)) if isinstance(ours.get(key), str) else ""
            if ov and _eq(kind, ov, expected[key]):
                score.record(category, True)
            else:
                _diff(score, category, f"{base}.{key}", ov, expected[key])

    # periods and times
    our_times = _times(ours)
    for key, ev in _times(expected).items():
        ov = our_times.get(key, "")
        if ov and compare_dates(ov, ev):
            score.record("periods", True)
        else:
            _diff(score, "periods", f"{base}.{key}", ov, ev)

    # codes and coded statuses (CodeableConcept / Coding anywhere outside the skipped elements)
    exp_codes: dict[str, list[tuple[str, str]]] = {}
    our_codes: dict[str, list[tuple[str, str]]] = {}
    _codes(dict(expected), "", exp_codes)
    _codes(dict(ours), "", our_codes)
    exp_vleaves, exp_vcodes = _values(expected)
    our_vleaves, our_vcodes = _values(ours)
    exp_codes.update(exp_vcodes)
    our_codes.update(our_vcodes)
    for path, codings in exp_codes.items():
        category = _status_category(path)
        mine = our_codes.get(path, [])
        for system, code in dict.fromkeys(codings):
            same_code = [s for s, c in mine if c == code]
            exp_text = f"{system}|{code}" if system else code
            if not same_code:
                ours_text = ", ".join(f"{s}|{c}" if s else c for s, c in mine)
                _diff(score, category, f"{base}.{path}", ours_text, exp_text)
            elif not system or any(norm_system(s) == norm_system(system) for s in same_code):
                score.record(category, True)
            else:
                rule = "ms-placeholder"
                why = _placeholder(code, system, source)
                if not why and (why := _system_name(code, system, same_code[0], source)):
                    rule = "ms-system-name"
                _diff(score, category, f"{base}.{path}", f"{same_code[0]}|{code}", exp_text, why, rule)

    # values (value[x] other than CodeableConcept)
    for path, (kind, ev) in exp_vleaves.items():
        if path in our_vleaves:
            ov = our_vleaves[path][1]
            if _eq(kind, ov, ev):
                score.record("values", True)
                continue
        else:
            ov = _summary_value(ours)
        why, rule = "", "ms-placeholder"
        if kind == "system" and path in our_vleaves:  # a Quantity's unit system: evidence next to its code
            unit = exp_vleaves.get(f"{path.rsplit('.', 1)[0]}.code", ("", ""))[1]
            why = _placeholder(unit, ev, source)
            if not why and (why := _system_name(unit, ev, ov, source)):
                rule = "ms-system-name"
        _diff(score, "values", f"{base}.{path}", ov, ev, why, rule)


# ----------------------------------------------------------------------------- matching resources
def resources(bundle: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for entry in _as_list(bundle.get("entry")):
        if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
            out.append(entry["resource"])
    return out


def _code_set(res: Mapping[str, Any]) -> set[str]:
    codes: dict[str, list[tuple[str, str]]] = {}
    _codes(res.get("code"), "code", codes)
    return {c for _s, c in codes.get("code", [])}


def _effective(res: Mapping[str, Any]) -> datetime | None:
    for key in ("effectiveDateTime", "effectiveInstant"):
        w = parse_when(res.get(key))
        if w is not None and w.has_time:
            try:
                return w.instant()
            except ValueError:
                return None
    period = res.get("effectivePeriod")
    if isinstance(period, dict):
        w = parse_when(period.get("start"))
        if w is not None and w.has_time:
            try:
                return w.instant()
            except ValueError:
                return None
    return None


def identity_score(ours: Mapping[str, Any], expected: Mapping[str, Any]) -> int:
    """How sure we are that two resources of one type are the same entity (0 = no evidence)."""
    score = 0
    ev = {i["value"] for i in _identifiers(expected)}
    ov = {i["value"] for i in _identifiers(ours)}
    score += 10 * len(ev & ov)
    ec, oc = _code_set(expected), _code_set(ours)
    if ec & oc:
        score += 5
        if expected.get("resourceType") == "Observation":
            et, ot = _effective(expected), _effective(ours)
            if et is not None and et == ot:
                score += 3
            if _values(expected)[0] and _values(expected)[0] == _values(ours)[0]:
                score += 2
    if expected.get("resourceType") == "Specimen":
        # its type, and for one without identifiers (IG OBR[Specimen]) the order's collection time
        etypes: dict[str, list[tuple[str, str]]] = {}
        otypes: dict[str, list[tuple[str, str]]] = {}
        _codes(expected.get("type"), "type", etypes)
        _codes(ours.get("type"), "type", otypes)
        if {c for _s, c in etypes.get("type", [])} & {c for _s, c in otypes.get("type", [])}:
            score += 5
        etimes, otimes = _times(expected), _times(ours)
        if any(
            compare_dates(otimes[k], v)
            for k, v in etimes.items()
            if k.startswith("collection.") and k in otimes
        ):
            score += 3
    if expected.get("resourceType") == "Coverage":
        # the plan (IG IN1-2 → class plan value) identifies a Coverage MS writes without identifiers
        eplans = {
            norm_text(c.get("value")) for c in _as_list(expected.get("class")) if isinstance(c, dict)
        } - {""}
        oplans = {norm_text(c.get("value")) for c in _as_list(ours.get("class")) if isinstance(c, dict)} - {
            ""
        }
        if eplans & oplans:
            score += 5
    enames = _names(expected)
    onames = _names(ours)
    efam = {n.get("family", "").lower() for n in enames} - {""}
    ofam = {n.get("family", "").lower() for n in onames} - {""}
    if efam & ofam:
        score += 3
        if any(n in onames for n in enames):
            score += 2  # family and given names agree
        if expected.get("birthDate") and compare_dates(ours.get("birthDate"), expected.get("birthDate")):
            score += (
                1  # two people of one name (a mother as next of kin and as the insured): the birth date tells
            )
    return score


def resource_label(res: Mapping[str, Any]) -> str:
    rtype = str(res.get("resourceType", "?"))
    idents = [i["value"] for i in _identifiers(res) if not i.get("system", "").startswith("urn:sluice:key")]
    codes = sorted(_code_set(res))
    if rtype == "Observation" and codes:
        when = res.get("effectiveDateTime") or ""
        return f"{rtype}[{codes[0]}{'@' + str(when) if when else ''}]"
    if idents:
        return f"{rtype}[{idents[0]}]"
    if codes:
        return f"{rtype}[{codes[0]}]"
    names = _names(res)
    if names:
        return f"{rtype}[{_label(names[0], 'names')}]"
    return rtype


def _different_entities(ours: Mapping[str, Any], expected: Mapping[str, Any]) -> bool:
    """Both sides identify themselves, and by nothing in common: identifier values on both sides but none shared,
    and family names on both sides but none shared (two people, e.g. the PD1-4 doctor and the EVN-5 operator)."""
    ev = {i["value"] for i in _identifiers(expected)}
    ov = {i["value"] for i in _identifiers(ours)}
    efam = {n.get("family", "").lower() for n in _names(expected)} - {""}
    ofam = {n.get("family", "").lower() for n in _names(ours)} - {""}
    return bool(ev and ov and not ev & ov and efam and ofam and not efam & ofam)


def match_resources(
    ours: list[dict[str, Any]], expected: list[dict[str, Any]]
) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """Pair each expected resource with one of ours of the same type by business identity."""
    result: dict[int, int] = {}
    by_type: dict[str, tuple[list[int], list[int]]] = {}
    for i, e in enumerate(expected):
        by_type.setdefault(str(e.get("resourceType")), ([], []))[0].append(i)
    for j, o in enumerate(ours):
        if str(o.get("resourceType")) in by_type:
            by_type[str(o.get("resourceType"))][1].append(j)
    for exp_idx, our_idx in by_type.values():
        cands = []
        for i in exp_idx:
            for j in our_idx:
                s = identity_score(ours[j], expected[i])
                if s:
                    cands.append((s, i, j))
        cands.sort(key=lambda t: (-t[0], t[1], t[2]))
        used_o: set[int] = set()
        for _s, i, j in cands:
            if i in result or j in used_o:
                continue
            result[i] = j
            used_o.add(j)
        left_e = [i for i in exp_idx if i not in result]
        left_o = [j for j in our_idx if j not in used_o]
        if len(left_e) == 1 and len(left_o) == 1 and len(exp_idx) == 1 and len(our_idx) == 1:
            if not _different_entities(ours[left_o[0]], expected[left_e[0]]):
                result[left_e[0]] = left_o[0]  # the only one of its type on both sides
            continue
        # the reference repeats an entity (e.g. the same practitioner in two roles): allow many-to-one
        for s, i, j in cands:
            if i not in result and s >= 10:
                result[i] = j
    return [(e, ours[result[i]] if i in result else None) for i, e in enumerate(expected)]


# The segments the IG's message maps leave without a FHIR target, per message structure: conformance/igmaps.py
# (read from the IG's CSVs).  The MS converter maps several of them anyway (GT1 → a RelatedPerson and Patient
# identifiers, IN2 → Patient identifiers and names, DB1 → identifiers, PDA/ACC → Observations, RF1 →
# ServiceRequest, FT1 of an ORM/ORU → ChargeItem, MedicationDispense).  A reference value found *only* in such
# segments of the message (:attr:`Source.unmapped`) is explained ("outside the IG's message map"), never
# counted as agreeing.

MS_OBSERVATION_CODE_SYSTEM = "http://example.com/v2-to-fhir-converter/CodeSystem/observation-code"
MS_SEGMENT_OBSERVATIONS: dict[str, tuple[str, int | None]] = {
    "death-certificate": ("PDA", 3),
    "autopsy": ("PDA", 6),
    "coroner": ("PDA", 9),
    "injury-incident": ("ACC", None),
}
"""Observations the MS converter synthesises from one segment, under a code system of its own (no code
of the message): its ADT templates (``data/Templates/Hl7v2/ADT_A01.liquid``) include
``Resource/Observation`` with ``PDA_3`` (death-certificate), ``PDA_6`` (autopsy), ``PDA_9``
(coroner) and ``ACC`` (injury-incident).  Evidence: for a PDA indicator, that field of the message's
PDA carries the Observation's value; for ACC, the message has a valued ACC carrying the Observation's
identifiers (if it has any)."""

UNSCORED_PRACTITIONER_FIELDS: dict[str, str] = {
    "EVN-5": "Provenance.agent (IG EVN[Provenance])",
    "OBR-10": "Specimen.collection.collector (IG OBR[Specimen])",
}
"""XCN fields whose IG target is a resource that is not scored (:data:`SCORED_TYPES`).  Besides these,
a ROL of the PROCEDURE or INSURANCE group (after PR1, IN1, IN2 or IN3) has no target in the IG's
message maps, nor has any field of a segment the message's IG map leaves unmapped (:attr:`Source.unmapped`)."""

_MAPPED_ORDER_PRT_ROLES = frozenset({"OP", "SC", "ARI", "TN", "TR", "PRI"})
"""PRT-4.1 codes (table 0443) of an order-level PRT (after ORC / OBR) the IG's ORU_R01 and OML_O21 maps give a
target (a PractitionerRole), each only with PRT-4.3 HL70443."""

_NO_TARGET_ROL_GROUPS = {"PR1": "PROCEDURE", "IN1": "INSURANCE", "IN2": "INSURANCE", "IN3": "INSURANCE"}

MS_PERFORMER_ROLE = "http://example.com/v2-to-fhir-converter/CodeSystem/performer-role"
MS_PERFORMER_ROLES: dict[str, tuple[int, str]] = {
    "anesthesiologist": (8, "88189002"),
    "surgeon": (11, "304292004"),
    "procedure-practitioner": (12, ""),
}
"""MS's Procedure.performer.function code → the PR1 field it comes from and the IG's SNOMED function for that
field (PR1[Procedure]; none for PR1-12)."""


# ----------------------------------------------------------------------------- the source message: evidence
def _split_hl7(text: str) -> list[list[str]]:
    segs = []
    for line in re.split(r"[\r\n]+", text.lstrip("\ufeff")):
        if len(line) >= 4 and line[:3].isalnum():
            segs.append(line.split(line[3]) if line.startswith(("MSH", "FHS", "BHS")) else line.split("|"))
    return segs


def source_tokens(hl7_text: str) -> dict[str, set[str]]:
    """Normalised component/subcomponent values of the message → the segment names they occur in."""
    out: dict[str, set[str]] = {}
    for fields in _split_hl7(hl7_text):
        name = fields[0].strip().upper()
        for f in fields[1:]:
            for tok in re.split(r"[~^&]", f):
                t = norm_text(tok).lower()
                if t:
                    out.setdefault(t, set()).add(name)
            t = norm_text(f.replace("^", " ").replace("&", " ")).lower()
            if t:
                out.setdefault(t, set()).add(name)
    return out


@dataclass(frozen=True)
class _Rep:
    """One repetition of one field of the source message."""

    segment: str
    field: int  # the HL7 field number (MSH-1 is the field separator itself)
    ordinal: int  # the segment's position in the message (0-based): the repetitions of one segment share it
    after: str  # the last segment before this one that is not a ROL or NTE: a ROL's group
    comps: tuple[tuple[str, ...], ...]  # the components, each as its (trimmed) subcomponents
    tokens: frozenset[str]  # every normalised, lower-case component and subcomponent value

    @property
    def where(self) -> str:
        return f"{self.segment}-{self.field}"

    def comp(self, n: int) -> str:
        """Component ``n`` (1-based), its subcomponents joined by spaces."""
        return norm_text(" ".join(x for x in self.comps[n - 1] if x)) if n <= len(self.comps) else ""


class Source:
    """The HL7 v2 message a bundle was converted from: the evidence every explanation checks."""

    def __init__(self, text: str) -> None:
        self.tokens = source_tokens(text)
        self.reps: list[_Rep] = []
        self.unmapped: frozenset[str] = igmaps.DEFAULT
        """The segments the IG's map for this message's structure leaves without a target (igmaps)."""
        self.structure = ""
        """The IG message map this message is judged by ("" when the IG has none for its structure)."""
        self.segments: list[tuple[int, str]] = []  # (ordinal, name) of every segment, in message order
        fs, comp, rep, sub = "|", "^", "~", "&"
        anchor = ""
        for ordinal, line in enumerate(re.split(r"[\r\n]+", text.lstrip("\ufeff"))):
            if len(line) < 4 or not line[:3].isalnum():
                continue
            name = line[:3].upper()
            self.segments.append((ordinal, name))
            header = name in ("MSH", "FHS", "BHS")
            if header:
                fs = line[3]
                enc = line[4:].split(fs, 1)[0]
                comp, rep, sub = (enc[:1] or "^"), (enc[1:2] or "~"), (enc[3:4] or "&")
            fields = line.split(fs)
            for i, value in enumerate(fields[1:], start=1):
                number = i + 1 if header else i
                if header and number == 2:
                    continue  # the encoding characters
                for r in value.split(rep):
                    comps = tuple(tuple(x.strip() for x in c.split(sub)) for c in r.split(comp))
                    tokens = frozenset(
                        t for c in comps for x in (*c, " ".join(c)) if (t := norm_text(x).lower())
                    )
                    if tokens:
                        self.reps.append(_Rep(name, number, ordinal, anchor, comps, tokens))
            if name not in ("ROL", "NTE"):
                anchor = name
        msh9 = next((r for r in self.reps if r.segment == "MSH" and r.field == 9), None)
        if msh9 is not None:
            kind, trigger, declared = msh9.comp(1).upper(), msh9.comp(2).upper(), msh9.comp(3)
            self.unmapped = igmaps.unmapped_segments(kind, trigger, declared)
            self.structure = igmaps.structure(kind, trigger, declared)

    def find(self, value: str) -> list[_Rep]:
        """The field repetitions that carry ``value`` as a component or subcomponent."""
        v = norm_text(value).lower()
        return [r for r in self.reps if v in r.tokens] if v else []

    def names(self, value: str, name: str) -> str:
        """Where one field repetition carries both ``value`` and ``name`` (blanks in it may be ``-``)."""
        n = norm_text(name).lower()
        for r in self.find(value):
            if n and (n in r.tokens or any(t.replace(" ", "-") == n for t in r.tokens)):
                return r.where
        return ""

    def in_field(self, value: str, segment: str, number: int) -> str:
        """Where field ``segment``-``number`` carries ``value``."""
        for r in self.find(value):
            if r.segment == segment and r.field == number:
                return r.where
        return ""

    def charge_resource(self, res: Mapping[str, Any], ours: list[dict[str, Any]]) -> tuple[str, str]:
        """(explanation, rule) for an unproduced MS resource made from an FT1: a MedicationDispense of the FT1-29
        NDC, or a Procedure of the FT1-25 code when the PR1 after that FT1 (its FINANCIAL group) has the same code.
        Where the message's IG map leaves FT1 unmapped (ORM, ORU) it is ``ig-unmapped-segment``; otherwise (DFT,
        BAR) ``ms-charge-resource``, only when Sluice has the NDC as a ChargeItem's productCodeableConcept, or a
        Procedure with that code.  ("", "") without that evidence."""
        rtype = res.get("resourceType")
        if rtype == "MedicationDispense":
            codes = json_codes(res.get("medicationCodeableConcept"))
            ft1s = [r for r in self.reps if r.segment == "FT1" and r.field == 29 and r.comp(1) in codes]
            if not ft1s:
                return "", ""
            code = ft1s[0].comp(1)
            if "FT1" in self.unmapped:
                return (
                    f"MS makes it from FT1-29 ({code!r}); FT1 has no target in the IG's map",
                    "ig-unmapped-segment",
                )
            if any(
                o.get("resourceType") == "ChargeItem" and code in json_codes(o.get("productCodeableConcept"))
                for o in ours
            ):
                return (
                    f"MS makes a MedicationDispense of the NDC {code!r} charged in FT1-29; Sluice keeps it as the "
                    "ChargeItem's productCodeableConcept",
                    "ms-charge-resource",
                )
            return "", ""
        if rtype != "Procedure":
            return "", ""
        codes = {c.lower() for c in json_codes(res.get("code"))}
        if not any(
            o.get("resourceType") == "Procedure" and codes & {c.lower() for c in json_codes(o.get("code"))}
            for o in ours
        ):
            return "", ""
        in_group = False  # reps are in message order: an FT1, then the PR1s (and PRT, ROL, NTE) of its group
        for r in self.reps:
            if r.segment == "FT1":
                if r.field == 1:
                    in_group = False
                elif r.field == 25:
                    in_group = r.comp(1).lower() in codes
            elif r.segment not in _FINANCIAL_GROUP:
                in_group = False
            elif in_group and r.segment == "PR1" and r.field == 3 and r.comp(1).lower() in codes:
                code = r.comp(1)
                if "FT1" in self.unmapped:
                    return (
                        f"MS makes it from FT1-25 ({code!r}); FT1 has no target in the IG's map",
                        "ig-unmapped-segment",
                    )
                return (
                    f"MS makes a Procedure of FT1-25 {code!r} beside the PR1 of that FT1's group with the same "
                    "code; Sluice makes one Procedure, the PR1's",
                    "ms-charge-resource",
                )
        return "", ""

    def only_in_patient_prt(self, value: str) -> str:
        """Where ``value`` occurs, when that is only PRT-5 of PRT segments after PID / PD1 whose PRT-4 is not ``PP``
        (the IG's maps make such a person the Patient's generalPractitioner only IF PRT-4 IS PP); "" otherwise."""
        found = self.find(value)
        if not found:
            return ""
        for r in found:
            if r.segment != "PRT" or r.field != 5 or r.after not in ("PID", "PD1"):
                return ""
            roles = {o.comp(1).upper() for o in self.reps if o.ordinal == r.ordinal and o.field == 4}
            if not roles or "PP" in roles:
                return ""
            where = f"PRT-5 of a PRT after {r.after} with PRT-4 {'/'.join(sorted(roles))!r}"
        return where

    def family_names(self, identifier: str) -> set[str]:
        """The family names the message gives next to ``identifier`` in an XCN (component 2) or a CNN
        (subcomponent 2 of its first component, as in OBR-32)."""
        v = norm_text(identifier).lower()
        out: set[str] = set()
        for r in self.find(identifier):
            if r.comp(1).lower() == v and len(r.comps) > 1 and (family := norm_text(r.comps[1][0])):
                out.add(family.lower())
            first = r.comps[0] if r.comps else ()
            if len(first) > 1 and norm_text(first[0]).lower() == v and (family := norm_text(first[1])):
                out.add(family.lower())
        return out

    def sibling_name(self, value: str, name: str) -> str:
        """Where a segment that holds ``value`` in a field of :data:`MS_SIBLING_PLACEHOLDERS` has ``name`` in
        the component that placeholder is named after."""
        n = norm_text(name).lower()
        for r in self.find(value):
            field_comp = MS_SIBLING_PLACEHOLDERS.get((r.segment, r.field))
            if field_comp is None or r.comp(1).lower() != norm_text(value).lower():
                continue
            number, comp = field_comp
            for other in self.reps:
                if other.ordinal == r.ordinal and other.field == number and other.comp(comp).lower() == n:
                    return f"{r.segment}-{number}.{comp}"
        return ""

    def mobile(self, number: str) -> str:
        """Where an XTN with XTN-3 ``CP`` (cellular phone) carries the phone number ``number``."""
        want = norm_phone(number)
        for r in self.reps:
            if not want or r.comp(3).upper() != "CP":
                continue
            local = r.comp(7) + (f"x{r.comp(8)}" if r.comp(8) else "")
            candidates = {
                r.comp(1),
                r.comp(4),
                r.comp(12),
                local,
                r.comp(6) + local,
                r.comp(5) + r.comp(6) + local,
            }
            if want in {norm_phone(c) for c in candidates if c}:
                return r.where
        return ""

    def called_by(self, given: str, nick: str) -> str:
        """Where an XPN with given names (XPN-2, XPN-3) ``given`` has XPN-15 (called by) ``nick``."""
        for r in self.find(nick):
            if r.comp(15).lower() == norm_text(nick).lower() and (
                norm_text(f"{r.comp(2)} {r.comp(3)}").lower() == norm_text(given).lower()
            ):
                return r.where
        return ""

    def only_in_unmapped(self, value: str) -> str:
        """The explanation when ``value`` occurs in the message only in segments the IG leaves unmapped."""
        v = norm_text(value).lower()
        if "|" in v:
            v = v.rsplit("|", 1)[1]
        segs = self.tokens.get(v)
        if not segs or not segs <= self.unmapped:
            return ""
        return f"only in {'/'.join(sorted(segs))}, which MS maps and the IG's message maps leave unmapped"

    def only_in_unscored_fields(self, value: str) -> str:
        """The fields, each with its IG target, when ``value`` occurs only in XCN fields whose target is
        not scored (:data:`UNSCORED_PRACTITIONER_FIELDS`, ROL of the PROCEDURE/INSURANCE group, or a
        field of an IG-unmapped segment); "" if it occurs anywhere else, or nowhere."""
        found = set()
        for r in self.find(value):
            if r.segment in self.unmapped:
                found.add(f"{r.where} (segment not mapped by the IG)")
            elif r.segment == "ROL" and r.field == 4 and r.after in _NO_TARGET_ROL_GROUPS:
                found.add(
                    f"ROL-4 of the {_NO_TARGET_ROL_GROUPS[r.after]} group (no target in the IG's message map)"
                )
            elif r.where in UNSCORED_PRACTITIONER_FIELDS:
                found.add(f"{r.where} → {UNSCORED_PRACTITIONER_FIELDS[r.where]}")
            else:
                return ""
        return ", ".join(sorted(found))

    def practitioner_without_id(self, res: Mapping[str, Any], ours: list[dict[str, Any]]) -> str:
        """The explanation for an unproduced MS Practitioner without identifiers: the message gives its name only in
        XCN repetitions with XCN-1 empty, and one of Sluice's resources refers to that name by display alone."""
        if res.get("resourceType") != "Practitioner" or _identifiers(res):
            return ""
        names = [(n["family"].lower(), n.get("given", "").lower()) for n in _names(res) if "family" in n]
        if not names:
            return ""
        family, given = names[0]
        reps = [
            r for r in self.reps if r.comp(2).lower() == family and r.comp(3).lower() == given.split(" ")[0]
        ]
        if not reps or any(r.comp(1) for r in reps):
            return ""
        displays: list[str] = []
        _collect_displays(ours, displays)
        if not any(family in d.lower().split() for d in displays):
            return ""
        return f"{', '.join(sorted({r.where for r in reps}))} names {family.upper()!r} without an id (XCN-1): Sluice refers to the name alone"

    def person_only_in_unmapped(self, res: Mapping[str, Any]) -> str:
        """The explanation for an unproduced MS RelatedPerson without identifiers whose every name (family and first
        given name) the message gives only in segments the IG leaves unmapped (a GT1 guarantor)."""
        if res.get("resourceType") != "RelatedPerson" or _identifiers(res):
            return ""
        names = [
            (n["family"].lower(), n["given"].split()[0].lower())
            for n in _names(res)
            if "family" in n and "given" in n
        ]
        if not names:
            return ""
        wheres: set[str] = set()
        for family, given in names:
            reps = [
                r
                for r in self.reps
                if r.comps
                and r.comps[0]
                and r.comps[0][0].lower() == family
                and r.comp(2).lower().split()[:1] == [given]
            ]
            if not reps or any(r.segment not in self.unmapped for r in reps):
                return ""
            wheres.update(r.where for r in reps)
        return f"its name is only in {', '.join(sorted(wheres))}, which MS maps and the IG's message maps leave unmapped"

    def only_in_no_target_rol(self, value: str) -> str:
        """Where ``value`` occurs, when that is only in ROL-4 of a PROCEDURE or INSURANCE group (no target in the
        IG's message maps); "" if it occurs anywhere else, or nowhere."""
        found = set()
        for r in self.find(value):
            if r.segment != "ROL" or r.field != 4 or r.after not in _NO_TARGET_ROL_GROUPS:
                return ""
            found.add(f"ROL-4 of the {_NO_TARGET_ROL_GROUPS[r.after]} group")
        return ", ".join(sorted(found))

    def pr1_field(self, procedure: str, number: int) -> str:
        """Where the PR1 identified by ``procedure`` (its PR1-19 id, else a PR1-3 code) has field ``number``
        valued; "" when no such PR1 has it."""
        v = norm_text(procedure).lower()
        ordinals = {
            r.ordinal
            for r in self.reps
            if r.segment == "PR1" and r.field in (3, 19) and r.comp(1).lower() == v and v
        }
        for r in self.reps:
            if r.ordinal in ordinals and r.field == number and r.comp(1):
                return r.where
        return ""

    def parent_procedure(self, res: Mapping[str, Any], ours: list[dict[str, Any]]) -> str:
        """The explanation for an unproduced MS Procedure that has no code and only identifiers a PR1-25 (parent
        procedure id) of the message gives, when Sluice's Procedure of that PR1 is ``partOf`` that identifier."""
        if res.get("resourceType") != "Procedure" or res.get("code"):
            return ""
        values = {i["value"] for i in _identifiers(res)}
        if not values:
            return ""
        parts = {
            norm_text(p["identifier"].get("value"))
            for o in ours
            if o.get("resourceType") == "Procedure"
            for p in _as_list(o.get("partOf"))
            if isinstance(p, dict) and isinstance(p.get("identifier"), dict)
        }
        wheres = {self.in_field(v, "PR1", 25) for v in values if v in parts}
        if len(wheres) != 1 or "" in wheres or len(values & parts) != len(values):
            return ""
        return (
            f"MS makes a Procedure of the parent procedure id in {wheres.pop()}; Sluice's Procedure is partOf it "
            "by that identifier (IG PR1-25 → partOf)"
        )

    def document_result(self, res: Mapping[str, Any]) -> str:
        """The explanation for an unproduced MS Observation (DiagnosticReport) made from an OBX (OBR) of a
        document message: the message has a TXA, and the resource's code is the OBX-3 of an OBX after it
        (the OBR-4 of an OBR).  The IG's MDM maps put those OBX into DocumentReference.content and the
        OBR into the ServiceRequest."""
        rtype = res.get("resourceType")
        seg, number = {"Observation": ("OBX", 3), "DiagnosticReport": ("OBR", 4)}.get(str(rtype), ("", 0))
        if not seg or not any(r.segment == "TXA" for r in self.reps):
            return ""
        code = res.get("code")
        codes = {
            norm_text(c.get("code")).lower()
            for c in _as_list(code.get("coding") if isinstance(code, dict) else None)
            if isinstance(c, dict) and c.get("code")
        }
        seen_txa = False
        for r in self.reps:
            if r.segment == "TXA":
                seen_txa = True
            elif (
                r.segment == seg
                and r.field == number
                and r.comp(1).lower() in codes
                and (seg == "OBR" or seen_txa)
            ):
                return f"MS makes it from {r.where} of a document message (TXA); the IG maps it to " + (
                    "DocumentReference.content" if seg == "OBX" else "a ServiceRequest"
                )
        return ""

    def unordered_appointment(self, res: Mapping[str, Any]) -> str:
        """The explanation for an unproduced MS ServiceRequest of an SIU whose SCH has neither SCH-26 nor
        SCH-27: the IG's SIU maps make a ServiceRequest only IF SCH-26 or SCH-27 VALUED."""
        if res.get("resourceType") != "ServiceRequest":
            return ""
        if not any(r.segment == "SCH" for r in self.reps):  # an SIU (only SIU carries SCH)
            return ""
        if any(r.segment == "SCH" and r.field in (26, 27) for r in self.reps):
            return ""
        return (
            "SIU with neither SCH-26 nor SCH-27: the IG makes a ServiceRequest only IF SCH-26 or SCH-27 "
            "VALUED (MS makes one from the AIS)"
        )

    def account_outside_adt(self, res: Mapping[str, Any]) -> str:
        """The explanation for an unproduced MS Account made from PID-18 of a message that is not an ADT:
        of the IG's message maps only the ADT ones map PID[Account]."""
        if res.get("resourceType") != "Account":
            return ""
        kinds = {r.comp(1).upper() for r in self.reps if r.segment == "MSH" and r.field == 9}
        if not kinds or "ADT" in kinds:
            return ""
        values = {norm_text(i["value"]) for i in _identifiers(res)}
        if not values or not all(self.in_field(v, "PID", 18) for v in values):
            return ""
        kind = "/".join(sorted(kinds))
        return (
            f"an Account from PID-18 of a {kind} message: of the IG's message maps only ADT maps PID[Account]"
        )

    def field(self, ordinal: int, number: int) -> list[_Rep]:
        """The repetitions of field ``number`` of the segment at ``ordinal``."""
        return [r for r in self.reps if r.ordinal == ordinal and r.field == number]

    def message_kinds(self) -> set[str]:
        """MSH-9.1 (ORU, MDM, ...), upper case."""
        return {r.comp(1).upper() for r in self.reps if r.segment == "MSH" and r.field == 9}

    def order_groups(self) -> list[tuple[int, int | None]]:
        """(ordinal of each OBR, ordinal of its group's ORC or None), in message order: an ORC opens the group of
        the OBR after it (ORU, MDM, OML: ORC before OBR); an OBR with no ORC since the previous OBR or PID has none."""
        out: list[tuple[int, int | None]] = []
        orc: int | None = None
        for ordinal, name in self.segments:
            if name == "ORC":
                orc = ordinal
            elif name == "PID":
                orc = None
            elif name == "OBR":
                out.append((ordinal, orc))
                orc = None
        return out

    def order_of(self, value: str) -> list[tuple[int | None, int | None]]:
        """(OBR ordinal, ORC ordinal) of each order whose placer or filler number (OBR-2/3, ORC-2/3) is
        ``value``; an ORC with no OBR after it gives (None, its ordinal)."""
        v = norm_text(value).lower()
        if not v:
            return []
        numbered = {
            r.ordinal
            for r in self.reps
            if r.field in (2, 3) and r.segment in ("OBR", "ORC") and r.comp(1).lower() == v
        }
        out: list[tuple[int | None, int | None]] = []
        grouped: set[int] = set()
        for obr, orc in self.order_groups():
            if obr in numbered or (orc is not None and orc in numbered):
                out.append((obr, orc))
            if orc is not None:
                grouped.add(orc)
        out.extend((None, o) for o in sorted(numbered - grouped) if dict(self.segments).get(o) == "ORC")
        return out

    def parent_order(self, value: str) -> str:
        """Where a parent order number (OBR-29 EIP, ORC-8 EIP) is ``value``."""
        v = norm_text(value).lower()
        for r in self.reps:
            if (
                r.where in ("OBR-29", "ORC-8")
                and v
                and any(c and norm_text(c[0]).lower() == v for c in r.comps[:2])
            ):
                return r.where
        return ""

    def attachment_report(self, res: Mapping[str, Any]) -> str:
        """The explanation for an MS DiagnosticReport made from an OBX with an attachment (OBX-2 RP or ED): its code
        is that OBX's OBX-3 and no OBR of the message orders it (OBR-4)."""
        if res.get("resourceType") != "DiagnosticReport":
            return ""
        code = res.get("code")
        codes = [
            norm_text(c.get("code"))
            for c in _as_list(code.get("coding") if isinstance(code, dict) else None)
            if isinstance(c, dict) and c.get("code")
        ]
        return next((w for c in codes if (w := self.attachment_obx(c))), "")

    def attachment_obx(self, code: str) -> str:
        """Where an OBX of type RP or ED has OBX-3 ``code`` that no OBR-4 of the message names."""
        c = norm_text(code).lower()
        if not c or any(r.where == "OBR-4" and r.comp(1).lower() == c for r in self.reps):
            return ""
        for r in self.reps:
            if r.where == "OBX-3" and r.comp(1).lower() == c:
                kind = next((t.comp(1).upper() for t in self.field(r.ordinal, 2)), "")
                if kind in ("RP", "ED"):
                    return f"OBX-3 {code!r} of an OBX of type {kind}"
        return ""

    def only_in_no_target_participant(self, value: str) -> str:
        """Where ``value`` occurs, when that is only PRT-5 of order-level PRTs (after an ORC or OBR, other PRTs and
        NTEs aside) whose PRT-4 the IG's maps give no target, or OBR-28; "" otherwise."""
        found = self.find(value)
        if not found:
            return ""
        group: dict[int, str] = {}
        last = ""
        for ordinal, name in self.segments:
            group[ordinal] = last
            if name not in ("PRT", "NTE", "ROL"):
                last = name
        wheres = set()
        for r in found:
            if r.where == "OBR-28":
                wheres.add("OBR-28 (result copies to: deferred by the IG)")
                continue
            if r.where != "PRT-5" or group.get(r.ordinal) not in ("ORC", "OBR"):
                return ""
            roles = self.field(r.ordinal, 4)
            role = roles[0] if roles else None
            if (
                role is not None
                and role.comp(1).upper() in _MAPPED_ORDER_PRT_ROLES
                and role.comp(3).upper() == "HL70443"
            ):
                return ""
            wheres.add(f"PRT-5 of an order's PRT with PRT-4 {role.comp(1) if role is not None else ''!r}")
        return ", ".join(sorted(wheres))

    def contact_only_in_ctd(self, coding: str) -> str:
        """The explanation for a Patient.contact relationship ``system|code`` MS takes from CTD-1 when the message
        has no NK1 (no other source of a contact) and CTD is IG-unmapped in its structure."""
        code = norm_text(coding).rpartition("|")[2].lower()
        if "CTD" not in self.unmapped or any(name == "NK1" for _o, name in self.segments):
            return ""
        if any(r.where == "CTD-1" and r.comp(1).lower() == code for r in self.reps):
            return "Patient.contact from CTD-1 (the message has no NK1): CTD has no target in the IG's message map"
        return ""

    def keyless_encounter(self, res: Mapping[str, Any]) -> str:
        """The explanation for an MS Encounter (without identifiers) made from the one PV1 of a message that is not
        an ADT, when that PV1 has neither PV1-19 nor PV1-44."""
        if res.get("resourceType") != "Encounter" or _identifiers(res):
            return ""
        kinds = self.message_kinds()
        pv1s = [o for o, name in self.segments if name == "PV1"]
        if not kinds or "ADT" in kinds or len(pv1s) != 1:
            return ""
        if self.field(pv1s[0], 19) or self.field(pv1s[0], 44):
            return ""
        kind = "/".join(sorted(kinds))
        return (
            f"the {kind} message's PV1 has neither PV1-19 nor PV1-44: Sluice makes no Encounter it could not find "
            "again (the ADT feed owns it), MS makes one"
        )

    def unsplit(self, value: str) -> str:
        """Where one component of the message has exactly the subcomponents of ``value`` split at ``&``."""
        parts = tuple(norm_text(x).lower() for x in value.split("&"))
        if len(parts) < 2:
            return ""
        for r in self.reps:
            if any(tuple(norm_text(x).lower() for x in c) == parts for c in r.comps):
                return r.where
        return ""

    def orc8_parent(self, res: Mapping[str, Any]) -> str:
        """The explanation for an MS ServiceRequest made from ORC-8 (parent order): every identifier it has is a
        component of an ORC-8 and none an order number (ORC-2/3, OBR-2/3) or OBR-29 parent of the message."""
        if res.get("resourceType") != "ServiceRequest":
            return ""
        values = {norm_text(i["value"]).lower() for i in _identifiers(res)}
        if not values:
            return ""
        for v in values:
            reps = [r for r in self.reps if v in r.tokens]
            if not any(r.where == "ORC-8" for r in reps) or any(
                r.where in ("ORC-2", "ORC-3", "OBR-2", "OBR-3", "OBR-29") for r in reps
            ):
                return ""
        return "MS makes it from ORC-8 (parent order); the IG's ORC[ServiceRequest] map has no ORC-8 row"

    def specimen_outside_map(self, res: Mapping[str, Any]) -> str:
        """The explanation for an MS Specimen made from the OBR of a message whose IG map makes no Specimen from
        OBR (MDM_T02, ORM_O01: only ORU_R01 and OML_O21 map OBR[Specimen]): every identifier it has is an OBR-2,
        OBR-3 or OBR-53 of the message, none an SPM's."""
        if res.get("resourceType") != "Specimen":
            return ""
        kinds = self.message_kinds() & {"MDM", "ORM"}
        values = {norm_text(i["value"]).lower() for i in _identifiers(res)}
        if kinds and not values:
            # no identifiers (IG OBR[Specimen] gives it none): its collection time is an OBR-7 of the message
            when = _times(res).get("collection.collectedDateTime", "")
            if when and any(
                r.where == "OBR-7" and compare_dates(hl7_when(r.comp(1)), when) for r in self.reps
            ):
                kind = "/".join(sorted(kinds))
                return f"a Specimen from OBR-7 of an {kind} message: the IG's {kind} map makes no Specimen from OBR"
            return ""
        if not kinds or not values:
            return ""
        for v in values:
            reps = [r for r in self.reps if v in r.tokens]
            if any(r.segment == "SPM" for r in reps) or not any(
                r.where in ("OBR-2", "OBR-3", "OBR-53") and r.comp(1).lower() == v for r in reps
            ):
                return ""
        kind = "/".join(sorted(kinds))
        return f"a Specimen from the OBR of an {kind} message: the IG's {kind} map makes no Specimen from OBR"

    def obx_status(self, code: str) -> list[str]:
        """The OBX-11 values of the OBX segments whose OBX-3 has the code ``code``."""
        c = norm_text(code).lower()
        ordinals = {
            r.ordinal for r in self.reps if r.segment == "OBX" and r.field == 3 and r.comp(1).lower() == c
        }
        return [r.comp(1).upper() for r in self.reps if r.ordinal in ordinals and r.field == 11]

    def segment_observation(self, res: Mapping[str, Any]) -> str:
        """The explanation for an unproduced MS Observation synthesised from an IG-unmapped segment
        (:data:`MS_SEGMENT_OBSERVATIONS`), when the message holds what it was made from."""
        if res.get("resourceType") != "Observation":
            return ""
        code = res.get("code")
        for coding in _as_list(code.get("coding") if isinstance(code, dict) else None):
            if not isinstance(coding, dict) or coding.get("system") != MS_OBSERVATION_CODE_SYSTEM:
                continue
            seg, number = MS_SEGMENT_OBSERVATIONS.get(str(coding.get("code")), ("", None))
            if not seg or seg not in self.unmapped:
                continue
            if number is not None:
                value = res.get("valueCodeableConcept")
                codes = [
                    norm_text(c.get("code")).lower()
                    for c in _as_list(value.get("coding") if isinstance(value, dict) else None)
                    if isinstance(c, dict)
                ]
                for r in self.reps:
                    if r.segment == seg and r.field == number and (not codes or r.comp(1).lower() in codes):
                        return f"MS makes it from {r.where}, which the IG's message maps leave unmapped"
                continue
            idents = [i["value"] for i in _identifiers(res)]
            reps = [r for r in self.reps if r.segment == seg]
            if reps and all(any(r.segment == seg for r in self.find(v)) for v in idents):
                return f"MS makes it from {seg}, which the IG's message maps leave unmapped"
        return ""


MS_PROCEDURE_CODE_SYSTEM = "http://example.com/v2-to-fhir-converter/CodeSystem/procedure-code"
MS_SEGMENT_PROCEDURES: dict[str, tuple[str, int]] = {
    "death-certification": ("PDA", 6),  # death certificate signed date/time
    "autopsy-performed": ("PDA", 9),  # autopsy start and end date/time
}
"""Procedures the MS converter synthesises from PDA fields under a code system of its own (its ADT templates:
``Resource/Procedure`` from ``PDA_6`` and ``PDA_9``).  Evidence: that field of the message's PDA is valued."""


def _segment_procedure(source: Source, res: Mapping[str, Any]) -> str:
    if res.get("resourceType") != "Procedure":
        return ""
    code = res.get("code")
    for coding in _as_list(code.get("coding") if isinstance(code, dict) else None):
        if not isinstance(coding, dict) or coding.get("system") != MS_PROCEDURE_CODE_SYSTEM:
            continue
        seg, number = MS_SEGMENT_PROCEDURES.get(str(coding.get("code")), ("", 0))
        if not seg or seg not in source.unmapped:
            continue
        for r in source.reps:
            if r.segment == seg and r.field == number and r.comp(1):
                return f"MS makes it from {r.where}, which the IG's message maps leave unmapped"
    return ""


MS_SYSTEM_NAMES: dict[tuple[str, str], str] = {
    ("I9", "http://hl7.org/fhir/sid/icd-9"): "http://hl7.org/fhir/sid/icd-9-cm",
    ("ISO", "urn:iso:std:iso:3986"): "urn:sluice:codesystem:ISO",
}
"""(coding-system name in the message, MS's URI for it) → Sluice's documented system for that name."""


def _system_name(value: str, system: str, ours: str, source: Source | None) -> str:
    """The explanation when MS's ``system`` is its name table's URI for the coding-system name the message gives
    ``value`` and ``ours`` is Sluice's documented system for that name (:data:`MS_SYSTEM_NAMES`)."""
    if source is None or not value:
        return ""
    for (name, ms), mine in MS_SYSTEM_NAMES.items():
        same = norm_system(system) == norm_system(ms) and norm_system(ours) == norm_system(mine)
        if same and (where := source.names(value, name)):
            return f"{where} gives {value!r} with the name {name!r}: MS writes {ms}, Sluice {mine}"
    return ""


_OID = re.compile(r"^[0-2](\.(0|[1-9]\d*))+$")


def _invalid_oid(system: str, source: Source | None) -> str:
    """The explanation when MS's identifier ``system`` is ``urn:oid:`` + a value that is no OID and that the message
    gives as the universal id (HD-2) of an authority."""
    s = norm_text(system)
    if source is None or not s.lower().startswith("urn:oid:"):
        return ""
    oid = s[len("urn:oid:") :]
    if not oid or _OID.match(oid):
        return ""
    for r in source.reps:
        for c in r.comps:
            if len(c) > 1 and c[1] == oid:
                return f"{r.where} gives the authority universal id {oid!r}, which is no OID: MS writes {s}"
    return ""


def _placeholder(value: str, system: str, source: Source | None) -> str:
    """The explanation when the reference ``system`` is an MS placeholder invented for the name the
    message gives ``value`` (or for the field it sits in); "" without that evidence."""
    s = norm_text(system)
    if source is None or not value or not s.lower().startswith(MS_PLACEHOLDER_PREFIX):
        return ""
    rest = s[len(MS_PLACEHOLDER_PREFIX) :]
    if rest in MS_FIELD_PLACEHOLDERS:
        where = source.in_field(value, *MS_FIELD_PLACEHOLDERS[rest])
        return f"MS placeholder system named after the field {where} that holds {value!r}" if where else ""
    name = rest.partition("/")[2]
    where = source.names(value, name) if name else ""
    if where:
        return f"MS placeholder system: {where} gives {value!r} with the name {name!r}"
    where = source.sibling_name(value, name) if name else ""
    return (
        f"MS placeholder system named after {where} ({name!r}) of the segment giving {value!r}"
        if where
        else ""
    )


def _called_by(ours: Mapping[str, Any], ov: str, ev: str, source: Source | None) -> str:
    """The reference ``given`` is ours plus the XPN-15 of that name in the message, which ours carries
    as a ``nickname`` name."""
    if source is None or not ov:
        return ""
    for name in _as_list(ours.get("name")):
        if not isinstance(name, dict) or name.get("use") != "nickname":
            continue
        for g in _as_list(name.get("given")):
            nick = norm_text(g)
            if nick and norm_text(f"{ov} {nick}") == norm_text(ev) and (where := source.called_by(ov, nick)):
                return (
                    f"{where} has XPN-15 (called by) {nick!r}: Sluice makes it a nickname name, MS appends it"
                )
    return ""


_ELEMENT_LEAF = re.compile(r"\.(?:identifier|name|telecom|address)\[([^\]]*)\]\.\w+$")
"""``<Resource>[..].<list element>[<label>].<leaf>``: a leaf of an identifier, name, telecom or address."""


def explain_outside_ig(score: Score, source: Source) -> None:
    """Mark still-unexplained differences whose reference value comes only from IG-unmapped segments."""
    for n, d in enumerate(score.diffs):
        if d.explanation or d.ours or d.category == "resource":
            continue
        why = source.only_in_unmapped(d.expected)
        if not why and (m := _ELEMENT_LEAF.search(d.path)):
            # a leaf of a list element (an identifier's system, a name's given, a telecom's use, an address's
            # state): judge by the element it belongs to, i.e. the label the element is paired by
            why = source.only_in_unmapped(m.group(1))
        if not why and _CONTACT_RELATIONSHIP.match(d.path):
            why = source.contact_only_in_ctd(d.expected)
        if why:
            score.explain(n, why, "ig-unmapped-segment")


_CONTACT_RELATIONSHIP = re.compile(r"^Patient\[[^\]]+\]\.contact\.relationship$")

_OBSERVATION_STATUS = re.compile(r"^Observation\[([^@\]]+)(?:@[^\]]*)?\]\.status$")


def explain_unmapped_codes(score: Score, source: Source) -> None:
    """Mark an Observation.status where MS says ``unknown`` for an OBX-11 code the IG's concept map leaves
    unmapped (:data:`OBX_STATUS_IG_UNMAPPED`) and Sluice gives its documented choice for that code."""
    from transforms.oru import OBX_STATUS

    for n, d in enumerate(score.diffs):
        if d.explanation or d.category != "statuses" or norm_text(d.expected) != "unknown":
            continue
        if not (m := _OBSERVATION_STATUS.match(d.path)):
            continue
        codes = set(source.obx_status(m.group(1)))
        if len(codes) == 1 and (code := codes.pop()) in OBX_STATUS_IG_UNMAPPED and OBX_STATUS[code] == d.ours:
            score.explain(
                n,
                f"OBX-11 {code!r} has no FHIR target in the IG's concept map: Sluice maps it to {d.ours!r}",
                "ig-unmapped-code",
            )


_REPORT_STATUS = re.compile(r"^DiagnosticReport\[([^\]]+)\]\.status$")
_ORDER_STATUS = re.compile(r"^ServiceRequest\[([^\]]+)\]\.status$")
_REPORT_CODE = re.compile(r"^DiagnosticReport\[[^\]]+\]\.code$")


def explain_order_statuses(score: Score, source: Source) -> None:
    """Mark report and order statuses the message does not state the way the IG maps them
    (derived-report-status, order-status-unstated, ig-order-control), and a report code MS takes from an
    attachment OBX (ms-attachment-report)."""
    from transforms.oru import ORDER_CONTROL_STATUS

    for n, d in enumerate(score.diffs):
        if d.explanation or d.fields != 1:
            continue
        expected = norm_text(d.expected)
        if (m := _REPORT_STATUS.match(d.path)) and expected == "unknown" and d.ours:
            label = norm_text(m.group(1)).lower()
            obrs = {
                r.ordinal
                for r in source.reps
                if r.segment == "OBR" and r.field in (2, 3, 4) and r.comp(1).lower() == label
            }
            if obrs and not any(source.field(o, 25) for o in obrs):
                score.explain(
                    n,
                    f"OBR-25 is empty: MS says unknown, Sluice derives {d.ours!r} from the results' statuses",
                    "derived-report-status",
                )
        elif (m := _ORDER_STATUS.match(d.path)) and d.ours == "unknown" and expected:
            value = m.group(1)
            if where := source.parent_order(value):
                score.explain(
                    n,
                    f"{value!r} is the parent order {where} names: the message states no status for it",
                    "order-status-unstated",
                )
            elif (groups := source.order_of(value)) and all(orc is None for _obr, orc in groups):
                score.explain(
                    n,
                    f"the OBR with order number {value!r} has no ORC: no ORC-5 / ORC-1 states its status",
                    "order-status-unstated",
                )
        elif (m := _ORDER_STATUS.match(d.path)) and expected == "unknown" and d.ours:
            orcs = {orc for _obr, orc in source.order_of(m.group(1)) if orc is not None}
            controls = {r.comp(1).upper() for o in orcs for r in source.field(o, 1)}
            if (
                orcs
                and not any(source.field(o, 5) for o in orcs)
                and len(controls) == 1
                and ORDER_CONTROL_STATUS.get(code := controls.pop()) == d.ours
            ):
                score.explain(
                    n,
                    f"ORC-5 is empty and ORC-1 is {code!r}: the IG's OrderControlCode map gives {d.ours!r}, MS says "
                    "unknown",
                    "ig-order-control",
                )
        elif _REPORT_CODE.match(d.path) and (where := source.attachment_obx(expected.rsplit("|", 1)[-1])):
            score.explain(
                n,
                f"MS takes the report's code from the {where}; Sluice's is the OBR-4 of the report",
                "ms-attachment-report",
            )


_IMPLEMENTER_STATUS = re.compile(r"^(Procedure|ChargeItem)\[([^\]]+)\]\.status$")
IMPLEMENTER_STATUS_FIELDS: dict[str, tuple[tuple[str, int], ...]] = {
    "Procedure": (("PR1", 3), ("PR1", 19), ("FT1", 25)),  # a reported (PR1) or a billed (FT1-25) procedure
    "ChargeItem": (("FT1", 2), ("FT1", 7)),  # a posted financial transaction
}
"""Where the message must carry the resource's identity (its label: identifier or code) for
:func:`explain_implementer_status`."""


def explain_implementer_status(score: Score, source: Source) -> None:
    """Mark a Procedure.status / ChargeItem.status where MS writes its constant ``unknown`` and Sluice its documented
    choice, when the message carries the resource's identity in PR1-3/-19 or FT1-25 (a procedure), FT1-2 or
    FT1-7 (a charge).  The IG's PR1[Procedure] map leaves Procedure.status to the implementer by the message context
    ('unknown' only if not clear): a reported PR1 or a billed FT1-25 is a procedure performed (``completed``); no IG
    map covers FT1, and a posted transaction is ``billable`` (transforms/dft.py)."""
    from transforms.dft import CHARGE_STATUS, PROCEDURE_STATUS

    documented = {"Procedure": PROCEDURE_STATUS, "ChargeItem": CHARGE_STATUS}
    for n, d in enumerate(score.diffs):
        if d.explanation or d.category != "statuses" or norm_text(d.expected) != "unknown":
            continue
        if not (m := _IMPLEMENTER_STATUS.match(d.path)) or d.ours != documented[m.group(1)]:
            continue
        label = m.group(2)
        where = next(
            (
                w
                for seg, number in IMPLEMENTER_STATUS_FIELDS[m.group(1)]
                if (w := source.in_field(label, seg, number))
            ),
            "",
        )
        if where:
            score.explain(
                n,
                f"{where} gives {label!r}: the IG leaves the status to the implementer; MS writes unknown, Sluice "
                f"{d.ours!r}",
                "ig-implementer-status",
            )


_SPECIMEN_IDENTIFIER = re.compile(r"^Specimen\[([^\]]+)\]\.identifier\[([^\]]*)\]\.(?:value|system)$")


_ORDER_IDENTIFIER = re.compile(r"^ServiceRequest\[[^\]]+\]\.identifier\[([^\]]*)\]\.value$")
_ORDER_LOCATION = re.compile(r"^ServiceRequest\[[^\]]+\]\.locationCode$")
_V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"


def explain_order_fields(score: Score, source: Source) -> None:
    """Mark ServiceRequest values MS takes from fields the IG maps elsewhere (ms-order-field): an ORC-4 placer group
    number sent as an EI among the identifiers (the IG: requisition; an identifier only for an EIP with ORC-4.2),
    and an OBR-24 diagnostic service section as a locationCode (the IG's OBR[ServiceRequest] maps no OBR-24)."""
    for n, d in enumerate(score.diffs):
        if d.explanation or d.fields != 1:
            continue
        if (m := _ORDER_IDENTIFIER.match(d.path)) and not d.ours:
            value = norm_text(m.group(1)).lower()
            if any(
                r.where == "ORC-4"
                and r.comp(1).lower() == value
                and len(r.comps[0]) == 1
                and (len(r.comps) < 2 or len(r.comps[1]) == 1)  # no EIP: no subcomponents
                for r in source.reps
            ):
                score.explain(
                    n,
                    f"ORC-4 {m.group(1)!r} is an EI placer group number: the IG maps it to requisition (as Sluice "
                    "does), MS adds it as an identifier",
                    "ms-order-field",
                )
        elif _ORDER_LOCATION.match(d.path) and "|" in d.expected:
            system, _bar, code = norm_text(d.expected).rpartition("|")
            if norm_system(system) == norm_system(_V2_0074) and any(
                r.where == "OBR-24" and r.comp(1).lower() == code.lower() for r in source.reps
            ):
                score.explain(
                    n,
                    f"OBR-24 {code!r} (diagnostic service section): MS makes it a locationCode, the IG's "
                    "OBR[ServiceRequest] maps no OBR-24",
                    "ms-order-field",
                )


_IDENTIFIER_LEAF = re.compile(r"^\w+\[[^\]]+\]\.identifier\[([^\]]*&[^\]]*)\]\.(?:value|system)$")


_V2_TABLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0"


def explain_table_systems(score: Score, source: Source) -> None:
    """Mark a code MS puts under an HL7 table's system (``.../v2-0nnn``) where the message sends that code with a
    coding system of its own (CWE-3 for the code in CWE-1, CWE-6 for CWE-4) and Sluice has the same code under
    another system."""
    for n, d in enumerate(score.diffs):
        if d.explanation or d.fields != 1 or d.category != "codes" or "|" not in d.expected or not d.ours:
            continue
        system, _bar, code = norm_text(d.expected).rpartition("|")
        if not system.startswith(_V2_TABLE_SYSTEM) or f"|{code}" not in d.ours:
            continue
        c = code.lower()
        named = next(
            (
                (r.where, r.comp(k + 2))
                for r in source.reps
                for k in (1, 4)
                if r.comp(k).lower() == c and r.comp(k + 2) and not r.comp(k + 2).upper().startswith("HL7")
            ),
            None,
        )
        if named is not None:
            score.explain(
                n,
                f"{named[0]} sends {code!r} with the coding system {named[1]!r}: MS gives it the table's system "
                f"{system!r}, Sluice the one the message names",
                "ms-table-system",
            )


def explain_unsplit_subcomponents(score: Score, source: Source) -> None:
    """Mark an identifier (value and system) MS makes of a component whose subcomponents it did not split: the
    label has an ``&`` and one component of the message has exactly those subcomponents."""
    for n, d in enumerate(score.diffs):
        if d.explanation or d.ours or d.fields != 1 or not (m := _IDENTIFIER_LEAF.match(d.path)):
            continue
        if where := source.unsplit(m.group(1)):
            score.explain(
                n,
                f"{where} holds {m.group(1)!r} as subcomponents: MS keeps the '&' in the value (and its placeholder "
                "system), Sluice reads the subcomponents",
                "ms-unsplit-subcomponents",
            )


def explain_obr_specimen_identifiers(score: Score, source: Source) -> None:
    """Mark the OBR-3 / OBR-53 numbers MS adds to the identifiers of the Specimen it makes of an OBR: only where
    an OBR has the Specimen's number in OBR-2 and that identifier in OBR-3 or OBR-53, and Sluice has none."""
    for n, d in enumerate(score.diffs):
        if d.explanation or d.ours or d.fields != 1 or not (m := _SPECIMEN_IDENTIFIER.match(d.path)):
            continue
        label, value = norm_text(m.group(1)).lower(), norm_text(m.group(2)).lower()
        for r in source.reps:
            if r.where != "OBR-2" or r.comp(1).lower() != label:
                continue
            where = next(
                (x.where for f in (3, 53) for x in source.field(r.ordinal, f) if x.comp(1).lower() == value),
                "",
            )
            if where:
                score.explain(
                    n,
                    f"{where} of the OBR whose OBR-2 is the Specimen's accession number: MS copies it onto the "
                    "Specimen, the IG's OBR[Specimen] maps OBR-2 only",
                    "ms-obr-specimen-identifier",
                )
                break


_RELATED_PERSON_FIELD = re.compile(
    r"^RelatedPerson\[([^\]]+)\]\.(identifier\[([^\]]*)\]\.value|relationship)$"
)
_MOTHER = "http://terminology.hl7.org/CodeSystem/v3-RoleCode|MTH"


def explain_merged_mother(score: Score, source: Source, ours: list[dict[str, Any]]) -> None:
    """Mark the PID-21 identifier and the MTH relationship MS adds to the RelatedPerson it makes of an NK1:
    only when the message has that mother's identifier in PID-21 and Sluice made her a RelatedPerson of her own
    (with that identifier and relationship MTH)."""
    mothers = {
        v: r.where
        for r in source.reps
        if r.segment == "PID"
        and r.field == 21
        and (v := norm_text(r.comp(1)))
        and any(
            o.get("resourceType") == "RelatedPerson"
            and any(norm_text(i.get("value")) == v for i in _identifiers(o))
            and "MTH" in json_codes(o.get("relationship"))
            for o in ours
        )
    }
    if not mothers:
        return
    for n, d in enumerate(score.diffs):
        if d.explanation or not (m := _RELATED_PERSON_FIELD.match(d.path)):
            continue
        if m.group(3) is not None:
            value = norm_text(d.expected)
            if value != norm_text(m.group(3)) or value not in mothers:
                continue
        elif norm_text(d.expected) != _MOTHER:
            continue
        else:
            value = next(iter(mothers))
        score.explain(
            n,
            f"{mothers[value]} gives the mother's identifier {value!r}: MS adds it (and MTH) to the NK1's "
            "RelatedPerson, Sluice makes her a RelatedPerson of her own",
            "ms-merged-mother",
        )


_HL7_DTM = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d+)?([+-]\d{4})?$")


def hl7_time(value: str) -> str:
    """An HL7 DTM (``20150209113419+0110``) in the FHIR form :func:`compare_dates` reads; "" if it is none."""
    m = _HL7_DTM.match(norm_text(value))
    if m is None:
        return ""
    y, mo, d, h, mi, sec, frac, off = m.groups()
    out = y + (f"-{mo}" if mo else "") + (f"-{d}" if mo and d else "")
    if d and h:
        out += f"T{h}:{mi or '00'}:{sec or '00'}{frac or ''}"
        if off:
            out += f"{off[:3]}:{off[3:]}"
    return out


_ENCOUNTER_PERIOD = re.compile(r"^Encounter\[[^\]]+\]\.period\.(start|end)$")


def explain_planned_period(score: Score, source: Source) -> None:
    """Mark an Encounter.period.start / end MS takes from PV2-8 / PV2-9 (expected admit / discharge date/time):
    the expected value is that field's, and Sluice's side is the actual stay (PV1-44 for the start; nothing for
    an end when PV1-45 is empty).  The IG maps PV2-8/9 to the planned start/end extensions."""
    pv1 = {r.field: r.comp(1) for r in source.reps if r.segment == "PV1" and r.field in (44, 45)}
    pv2 = {r.field: r.comp(1) for r in source.reps if r.segment == "PV2" and r.field in (8, 9)}
    for n, d in enumerate(score.diffs):
        if d.explanation or not (m := _ENCOUNTER_PERIOD.match(d.path)):
            continue
        start = m.group(1) == "start"
        planned = hl7_time(pv2.get(8 if start else 9, ""))
        if not planned or not compare_dates(planned, d.expected):
            continue
        actual = hl7_time(pv1.get(44 if start else 45, ""))
        if (actual and compare_dates(actual, d.ours)) if d.ours else not actual:
            which = "PV2-8 (expected admit)" if start else "PV2-9 (expected discharge)"
            ours = "PV1-44 (admit)" if start else "nothing: PV1-45 (discharge) is empty"
            score.explain(n, f"MS takes {which}; Sluice {ours}", "ig-planned-period")


_LANGUAGE = re.compile(r"^(Patient|RelatedPerson)\[([^\]]+)\]\.communication\.language$")


_PARTICIPANT_TYPE = re.compile(r"^Encounter\[[^\]]+\]\.participant\.type$")
_PV1_PARTICIPANT_FIELDS = {"ATND": (7,), "REF": (8,), "CON": (9,), "ADM": (17,)}


def explain_empty_participants(score: Score, source: Source, text: str) -> None:
    """Mark an Encounter.participant.type Sluice lacks where every PV1 field of that type is present in the message
    but holds only delimiters (``^^^^``): MS makes a participant (and an empty Practitioner) of nobody."""
    fields: dict[int, str] = {}
    for line in re.split(r"[\r\n]+", text.lstrip("\ufeff")):
        if line.startswith("PV1"):
            parts = line.split(line[3]) if len(line) > 3 else []
            fields = {n: parts[n] for n in (7, 8, 9, 17) if n < len(parts)}
            break
    for n, d in enumerate(score.diffs):
        if d.explanation or not _PARTICIPANT_TYPE.match(d.path):
            continue
        code = d.expected.rpartition("|")[2]
        numbers = _PV1_PARTICIPANT_FIELDS.get(code, ())
        if not numbers or f"|{code}" in d.ours:
            continue
        raw = [fields.get(k, "") for k in numbers]
        if all(v and not re.sub(r"[\^~&]", "", v).strip() for v in raw):
            where = ", ".join(f"PV1-{k}" for k in numbers)
            score.explain(
                n,
                f"{where} holds only delimiters ({raw[0]!r}): MS makes a {code} participant of nobody",
                "ms-empty-xcn",
            )


_CONTACT_RELATIONSHIP = re.compile(r"^Patient\[[^\]]+\]\.contact\.relationship$")


def explain_contact_codes(score: Score, source: Source) -> None:
    """Mark a Patient.contact.relationship code MS keeps as sent without a system where the message's NK1-3 or
    NK1-7 sends that code and Sluice has the IG Relationship map's target for it (EMC → v2-0131 C)."""
    from transforms.adt import RELATIONSHIP

    for n, d in enumerate(score.diffs):
        if d.explanation or "|" in d.expected or not _CONTACT_RELATIONSHIP.match(d.path):
            continue
        code = norm_text(d.expected).upper()
        target = RELATIONSHIP.get(code)
        if target is None or f"{target[0]}|{target[1]}" not in d.ours:
            continue
        for r in source.reps:
            if r.segment == "NK1" and r.field in (3, 7) and r.comp(1).upper() == code:
                score.explain(
                    n,
                    f"{r.where} sends {code!r}: Sluice applies the IG's Relationship map ({target[1]!r} in {target[0]}), "
                    "MS keeps the code as sent",
                    "ig-concept-map",
                )
                break


def explain_languages(score: Score, source: Source) -> None:
    """Language codes MS and Sluice write differently, each with its evidence in the message:

    * ``ms-placeholder``: MS writes a table-0296 code as sent under its placeholder system
      (``example.com/.../HL70296|EN``) where Sluice writes the BCP-47 tag R4 requires (``urn:ietf:bcp:47|en``):
      one field repetition gives the code with the name ``HL70296``, and Sluice's tag is that code's;
    * ``ig-unmapped-segment``: a RelatedPerson's language Sluice does not have, that MS converts from a code of an
      IG-unmapped segment (IN2-36 of the insured): the RelatedPerson is not an NK1's (NK1-20 is the IG's
      language field) and a repetition of an IG-unmapped segment gives a code whose BCP-47 tag is the expected one.
    """
    from transforms.datatypes import bcp47

    for n, d in enumerate(score.diffs):
        if d.explanation or not (m := _LANGUAGE.match(d.path)):
            continue
        system, _, code = d.expected.rpartition("|")
        tag = bcp47(code)
        if not tag:
            continue
        if d.ours:
            name = system.rpartition("/")[2]
            if (
                not norm_text(system).lower().startswith(MS_PLACEHOLDER_PREFIX)
                or f"urn:ietf:bcp:47|{tag}" not in d.ours
            ):
                continue
            if where := source.names(code, name):
                score.explain(
                    n,
                    f"MS placeholder system: {where} gives {code!r} with the name {name!r}; Sluice writes its "
                    f"BCP-47 tag {tag!r}",
                    "ms-placeholder",
                )
            continue
        if m.group(1) != "RelatedPerson" or any(r.segment == "NK1" for r in source.find(m.group(2))):
            continue
        for r in source.reps:
            if r.segment in source.unmapped and any(bcp47(c[0]) == tag for c in r.comps if c and c[0]):
                score.explain(
                    n,
                    f"only {r.where} gives the language {tag!r} of this RelatedPerson (not an NK1's), which MS maps "
                    "and the IG's message maps leave unmapped",
                    "ig-unmapped-segment",
                )
                break


_PERFORMER_FUNCTION = re.compile(r"^Procedure\[([^\]]+)\]\.performer\.function$")


def explain_performer_roles(score: Score, source: Source) -> None:
    """Mark MS's performer-role codes on Procedure.performer.function where the Procedure's PR1 has the field MS
    made that performer from, and Sluice gives the IG's function for that field (none for PR1-12)."""
    for n, d in enumerate(score.diffs):
        if d.explanation or not (m := _PERFORMER_FUNCTION.match(d.path)):
            continue
        system, _, code = d.expected.rpartition("|")
        if norm_system(system) != MS_PERFORMER_ROLE.lower() or code not in MS_PERFORMER_ROLES:
            continue
        number, snomed = MS_PERFORMER_ROLES[code]
        if snomed and f"http://snomed.info/sct|{snomed}" not in d.ours:
            continue
        if where := source.pr1_field(m.group(1), number):
            ig = f"SNOMED {snomed}" if snomed else "no function"
            score.explain(
                n, f"{where} is valued: MS says {code!r}, the IG {ig} (Sluice)", "ms-performer-role"
            )


_ENCOUNTER_DIAGNOSIS = re.compile(r"^Encounter\[[^\]]*\]\.diagnosis\.")


def explain_dg1_context(score: Score, source: Source) -> None:
    """Mark an ``Encounter.diagnosis`` element Sluice lacks where the message has DG1 segments and its IG map
    (:attr:`Source.structure`) has no DG1[Encounter] row (igmaps.ENCOUNTER_DIAGNOSIS); not for a structure the
    IG has no map for (DFT, BAR: Sluice fills it there, as the ADT maps do)."""
    if not source.structure or source.structure in igmaps.ENCOUNTER_DIAGNOSIS:
        return
    if not any(r.segment == "DG1" for r in source.reps):
        return
    for n, d in enumerate(score.diffs):
        if d.explanation or d.ours or d.fields != 1 or not _ENCOUNTER_DIAGNOSIS.match(d.path):
            continue
        score.explain(
            n,
            f"the message has DG1, and the IG's {source.structure} map makes it a Condition only (no DG1[Encounter])",
            "ig-dg1-context",
        )


_PRACTITIONER_NAME = re.compile(r"^Practitioner\[([^\]]+)\]\.name\[([^\]]*)\]\.(family|given)$")


def explain_split_practitioner(score: Score, source: Source, ours: list[dict[str, Any]]) -> None:
    """Mark a name of a reference Practitioner that differs from Sluice's one Practitioner with that identifier
    because the message gives the identifier two family names (:meth:`Source.family_names`): MS makes one
    Practitioner per name, Sluice one per identifier."""
    for n, d in enumerate(score.diffs):
        if d.explanation or not (m := _PRACTITIONER_NAME.match(d.path)):
            continue
        ident, family = m.group(1), norm_text(m.group(2)).lower()
        names = source.family_names(ident)
        if family not in names or len(names) < 2:
            continue
        mine = {
            norm_text(nm.get("family")).lower()
            for o in ours
            if o.get("resourceType") == "Practitioner" and any(i["value"] == ident for i in _identifiers(o))
            for nm in _as_list(o.get("name"))
            if isinstance(nm, dict)
        }
        other = (mine & names) - {family}
        if other:
            score.explain(
                n,
                f"the message gives {ident!r} the family names {', '.join(sorted(names))}: MS makes a Practitioner "
                f"per name, Sluice one per identifier ({sorted(other)[0]!r})",
                "ms-split-practitioner",
            )


def json_codes(concepts: Any) -> set[str]:
    """Every ``code`` of the codings of one or more CodeableConcepts."""
    return {
        str(c.get("code"))
        for cc in _as_list(concepts)
        if isinstance(cc, dict)
        for c in _as_list(cc.get("coding"))
        if isinstance(c, dict) and c.get("code")
    }


REFERENCED_ONLY: frozenset[str] = frozenset({"Practitioner"})
"""Types whose unproduced reference resources may be explained as "unscored-practitioner".

The MS converter makes a Practitioner for every XCN of every segment (EVN-5, PR1 surgeons, ROL, ...).
A reference Practitioner Sluice did not produce is always compared (all of its fields disagree); it is
explained only when no scored reference resource refers to it (directly or via a PractitionerRole) *and*
the message has its identifying value only in fields whose IG target is not scored
(:meth:`Source.only_in_unscored_fields`)."""


def _in_scope(bundle: Mapping[str, Any], scored: list[dict[str, Any]]) -> set[int]:
    by_ref: dict[str, dict[str, Any]] = {}
    for entry in _as_list(bundle.get("entry")):
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict):
            continue
        if res.get("id"):
            by_ref[f"{res.get('resourceType')}/{res['id']}"] = res
        if isinstance(entry.get("fullUrl"), str):
            by_ref[entry["fullUrl"]] = res
    scope = {id(r) for r in scored if r.get("resourceType") not in REFERENCED_ONLY}
    for res in scored:
        if id(res) not in scope:
            continue
        refs: list[str] = []
        _collect_refs(res, refs)
        for ref in refs:
            target = by_ref.get(ref)
            if target is None:
                continue
            scope.add(id(target))
            if target.get("resourceType") == "PractitionerRole":
                inner: list[str] = []
                _collect_refs(target.get("practitioner"), inner)
                scope.update(id(by_ref[r]) for r in inner if r in by_ref)
    return scope


def _collect_displays(obj: Any, out: list[str]) -> None:
    """The ``display`` of every reference that has no ``reference`` (a name alone) under ``obj``."""
    if isinstance(obj, list):
        for x in obj:
            _collect_displays(x, out)
    elif isinstance(obj, dict):
        if (
            isinstance(obj.get("display"), str)
            and "reference" not in obj
            and "system" not in obj
            and "code" not in obj
        ):
            out.append(obj["display"])
        for v in obj.values():
            if isinstance(v, dict | list):
                _collect_displays(v, out)


def _collect_refs(obj: Any, out: list[str]) -> None:
    if isinstance(obj, list):
        for x in obj:
            _collect_refs(x, out)
    elif isinstance(obj, dict):
        if isinstance(obj.get("reference"), str):
            out.append(obj["reference"])
        for k, v in obj.items():
            if k != "extension" and isinstance(v, dict | list):
                _collect_refs(v, out)


def score_bundles(
    ours: Mapping[str, Any],
    expected: Mapping[str, Any],
    scored_types: Iterable[str] = SCORED_TYPES,
    source: str | None = None,
) -> Score:
    """Field-level agreement of ``ours`` with the reference bundle ``expected``.

    Every reference resource of ``scored_types`` is compared, field by field.  Differences are explained
    (:data:`RULES`) only with the HL7 ``source`` text the bundles were converted from, and only where it
    holds the rule's evidence."""
    src = Source(source) if source else None
    types = set(scored_types)
    score = Score()
    our_res = resources(ours)
    exp_res = resources(expected)
    score.our_resources.update(str(r.get("resourceType")) for r in our_res)
    score.expected_resources.update(str(r.get("resourceType")) for r in exp_res)
    exp_scored = [r for r in exp_res if r.get("resourceType") in types]
    our_scored = [r for r in our_res if r.get("resourceType") in types]
    # a reference resource the IG's maps do not make (MS's Specimen of an MDM OBR, its report of an attachment OBX,
    # its ServiceRequest of ORC-8) brings none of its practitioners into scope
    outside = (
        {
            id(r)
            for r in exp_scored
            if src.specimen_outside_map(r) or src.attachment_report(r) or src.orc8_parent(r)
        }
        if src is not None
        else set()
    )
    in_scope = _in_scope(expected, [r for r in exp_scored if id(r) not in outside])
    for exp, mine in match_resources(our_scored, exp_scored):
        label = resource_label(exp)
        if mine is not None:
            compare_resources(mine, exp, label, score, src)
            continue
        missing = Score()
        compare_resources({}, exp, label, missing)
        if not missing.compared:
            continue
        why, rule = "", ""
        if src is not None:
            inner = label[label.find("[") + 1 : -1].split("@")[0] if "[" in label else ""
            if inner and (why := src.only_in_unmapped(inner)):
                rule = "ig-unmapped-segment"
            elif why := src.segment_observation(exp):
                rule = "ms-segment-observation"
            elif why := _segment_procedure(src, exp):
                rule = "ms-segment-procedure"
            elif why := src.document_result(exp):
                rule = "ig-document-obx"
            elif why := (
                src.unordered_appointment(exp)
                or src.account_outside_adt(exp)
                or src.specimen_outside_map(exp)
            ):
                rule = "ig-condition"
            elif why := src.orc8_parent(exp):
                rule = "ms-order-field"
            elif why := src.keyless_encounter(exp):
                rule = "keyless-encounter"
            elif exp.get("resourceType") == "Practitioner" and (
                where := src.only_in_no_target_participant(inner)
            ):
                why = f"the message has {inner!r} only in {where}, which the IG's message maps give no target"
                rule = "ig-no-target-participant"
            elif why := src.attachment_report(exp):
                why = f"MS makes it from the {why}; the IG maps that OBX to an Observation or presentedForm"
                rule = "ms-attachment-report"
            elif inner and id(exp) not in in_scope and (where := src.only_in_unscored_fields(inner)):
                why = f"no scored reference resource refers to it; the message has {inner!r} only in {where}"
                rule = "unscored-practitioner"
            elif exp.get("resourceType") == "Practitioner" and (where := src.only_in_patient_prt(inner)):
                why = (
                    f"the message has {inner!r} only in {where}: the IG's maps make it no generalPractitioner"
                )
                rule = "ig-prt-role"
            elif exp.get("resourceType") == "Practitioner" and (where := src.only_in_no_target_rol(inner)):
                why = f"the message has {inner!r} only in {where}, which the IG's message maps give no target"
                rule = "ig-unmapped-rol"
            elif why := src.parent_procedure(exp, our_scored):
                rule = "ms-parent-procedure"
            elif why := src.person_only_in_unmapped(exp):
                rule = "ig-unmapped-segment"
            elif why := src.practitioner_without_id(exp, our_res):
                rule = "xcn-without-id"
            else:
                why, rule = src.charge_resource(exp, our_scored)
        score.record_missing(label, missing, why, rule)
    if src is not None:
        explain_outside_ig(score, src)
        explain_unmapped_codes(score, src)
        explain_implementer_status(score, src)
        explain_merged_mother(score, src, our_scored)
        explain_split_practitioner(score, src, our_scored)
        explain_dg1_context(score, src)
        explain_performer_roles(score, src)
        explain_order_statuses(score, src)
        explain_obr_specimen_identifiers(score, src)
        explain_order_fields(score, src)
        explain_unsplit_subcomponents(score, src)
        explain_table_systems(score, src)
        explain_languages(score, src)
        explain_planned_period(score, src)
        explain_contact_codes(score, src)
        explain_empty_participants(score, src, source or "")
    return score
