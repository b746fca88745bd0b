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
equal precision.  Differences caused by known quirks of the reference converter are
*explained* (kept in the list with the reason, but left out of the agreement percentage):
see :func:`explain_system` and :func:`compare_dates`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

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
    "Appointment",
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
``.../CodeSystem/<table>`` systems for authorities and coding systems it has no URI for."""

MS_HOST_OFFSET = "+05:30"
"""The offset of the machine the MS expected files were generated on."""

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
    """One compared field on which the two bundles disagree."""

    path: str  # e.g. "Patient[12345].birthDate"
    category: str
    ours: str  # "" when Sluice has no value there
    expected: str
    explanation: str = ""  # non-empty: a known, explained difference (not counted against us)
    file: str = ""


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
    # reference resources not produced and only reachable from elements outside Sluice's mapping scope
    out_of_scope: list[str] = field(default_factory=list)

    @property
    def scored(self) -> int:
        """Compared fields minus explained differences: the agreement denominator."""
        return self.compared - self.explained

    @property
    def percent(self) -> float | None:
        return 100.0 * self.agreeing / self.scored if self.scored else None

    @property
    def raw_percent(self) -> float | None:
        return 100.0 * self.agreeing / self.compared if self.compared else None

    def record(self, category: str, ok: bool, diff: FieldDiff | None = None) -> None:
        cat = self.by_category.setdefault(category, [0, 0, 0])
        self.compared += 1
        cat[0] += 1
        if ok:
            self.agreeing += 1
            cat[1] += 1
            return
        assert diff is not None
        if diff.explanation:
            self.explained += 1
            cat[2] += 1
        self.diffs.append(diff)

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
        self.out_of_scope.extend(f"{file}: {u}" if file else u for u in other.out_of_scope)


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


def compare_dates(ours: Any, expected: Any) -> tuple[bool, str]:
    """(agree, explanation).  Instants when both carry offsets, else wall clock at equal precision."""
    a, b = parse_when(ours), parse_when(expected)
    if a is None or b is None:
        return norm_text(ours) == norm_text(expected), ""
    if a.has_time and b.has_time and a.offset is not None and b.offset is not None:
        try:
            if a.instant() == b.instant():
                return True, ""
        except ValueError:
            return False, ""
        if a.parts == b.parts and norm_text(expected).endswith(MS_HOST_OFFSET):
            return False, (
                "HL7 time without offset: Sluice applies the channel's site zone, "
                f"the MS converter its build host's zone ({MS_HOST_OFFSET})"
            )
        return False, ""
    return a.parts == b.parts, ""


def explain_system(ours: str, expected: str) -> str:
    """Why a system difference is not a Sluice error, or ""."""
    if norm_text(expected).lower().startswith(MS_PLACEHOLDER_PREFIX):
        return "MS placeholder system (example.com) for an authority/coding system without a known URI"
    return ""


# ----------------------------------------------------------------------------- extraction
def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _identifiers(res: Mapping[str, Any]) -> list[dict[str, str]]:
    out = []
    for ident in _as_list(res.get("identifier")):
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


EXPLAIN_CALLED_BY = (
    "IG XPN[HumanName]: XPN-15 (called by) is a second name with use nickname, which Sluice emits; "
    "MS appends it to given"
)


def _explain_called_by(ours: Mapping[str, Any], ov: str, ev: str) -> str:
    """The reference ``given`` is ours plus an XPN-15 value that ours carries as a ``nickname`` name."""
    for name in _as_list(ours.get("name")):
        if not isinstance(name, dict) or name.get("use") != "nickname":
            continue
        for g in _as_list(name.get("given")):
            nick = norm_text(g)
            if nick and norm_text(f"{ov} {nick}") == norm_text(ev):
                return EXPLAIN_CALLED_BY
    return ""


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
        "start",
        "end",
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


def _values(res: Mapping[str, Any]) -> tuple[dict[str, tuple[str, str]], dict[str, list[tuple[str, str]]]]:
    leaves: dict[str, tuple[str, str]] = {}
    codes: dict[str, list[tuple[str, str]]] = {}
    for k, v in res.items():
        if _is_value_key(k):
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
def _eq(kind: str, ours: str, expected: str) -> tuple[bool, str]:
    if kind == "date":
        return compare_dates(ours, expected)
    if kind == "system":
        if norm_system(ours) == norm_system(expected):
            return True, ""
        return False, explain_system(ours, expected)
    if kind == "number":
        return norm_number(ours) == norm_number(expected), ""
    if kind == "phone":
        return norm_phone(ours) == norm_phone(expected), ""
    if kind == "ci":
        return norm_text(ours).lower() == norm_text(expected).lower(), ""
    return norm_text(ours) == norm_text(expected), ""


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
            s = sum(
                1 for k, v in e.items() if k in o and _eq(_LEAF_KIND.get((category, k), "text"), o[k], v)[0]
            )
            # the identifying leaf weighs most (value of identifier/telecom, family of a name)
            key = (
                "value"
                if category in ("identifiers", "telecom")
                else ("family" if category == "names" else "line")
            )
            if key in e and key in o and _eq(_LEAF_KIND.get((category, key), "text"), o[key], e[key])[0]:
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


def compare_resources(ours: Mapping[str, Any], expected: Mapping[str, Any], base: str, score: Score) -> None:
    """Record every reference leaf of ``expected`` against ``ours`` into ``score``."""
    # identifiers, names, addresses, telecom: lists matched element by element
    for category, (key, fn) in _LIST_FIELDS.items():
        exp_elems = fn(expected)
        if not exp_elems:
            continue
        for e, o in _pair_lists(category, exp_elems, fn(ours)):
            label = _label(e, category)
            for leaf, ev in e.items():
                kind = _LEAF_KIND.get((category, leaf), "text")
                ov = (o or {}).get(leaf, "")
                ok, why = _eq(kind, ov, ev) if ov else (False, "")
                if not ok and category == "telecom" and leaf == "use" and ov == "mobile":
                    why = "IG TelecommunicationEquipmentType map: XTN-3 CP → use mobile (MS keeps the field's use)"
                if not ov and category == "identifiers" and leaf == "system":
                    why = explain_system("", ev)
                if not ok and category == "names" and leaf == "given":
                    why = why or _explain_called_by(ours, ov, ev)
                score.record(
                    category,
                    ok,
                    None if ok else FieldDiff(f"{base}.{key}[{label}].{leaf}", category, ov, ev, why),
                )

    # scalars
    for key, category, kind in (
        ("birthDate", "birthDate", "date"),
        ("gender", "gender", "ci"),
        ("status", "statuses", "ci"),
    ):
        if isinstance(expected.get(key), str) and norm_text(expected[key]):
            ov = norm_text(ours.get(key)) if isinstance(ours.get(key), str) else ""
            ok, why = _eq(kind, ov, expected[key]) if ov else (False, "")
            score.record(
                category, ok, None if ok else FieldDiff(f"{base}.{key}", category, ov, expected[key], why)
            )

    # periods and times
    our_times = _times(ours)
    for key, ev in _times(expected).items():
        ov = our_times.get(key, "")
        ok, why = compare_dates(ov, ev) if ov else (False, "")
        score.record("periods", ok, None if ok else FieldDiff(f"{base}.{key}", "periods", ov, ev, why))

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
                score.record(category, False, FieldDiff(f"{base}.{path}", category, ours_text, exp_text))
                continue
            if not system or any(norm_system(s) == norm_system(system) for s in same_code):
                score.record(category, True)
                continue
            why = explain_system(same_code[0], system)
            score.record(
                category,
                False,
                FieldDiff(f"{base}.{path}", category, f"{same_code[0]}|{code}", exp_text, why),
            )

    # values (value[x] other than CodeableConcept)
    for path, (kind, ev) in exp_vleaves.items():
        if path in our_vleaves:
            ov = our_vleaves[path][1]
            ok, why = _eq(kind, ov, ev)
        else:
            ov, ok, why = _summary_value(ours), False, ""
        score.record("values", ok, None if ok else FieldDiff(f"{base}.{path}", "values", ov, ev, why))


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
    enames = _names(expected)
    onames = _names(ours)
    efam = {n.get("family", "").lower() for n in enames} - {""}
    ofam = {n.get("family", "").lower() for n in onames} - {""}
    if efam & ofam:
        score += 3
        if any(n in onames for n in enames):
            score += 2  # family and given names agree
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
            result[left_e[0]] = left_o[0]  # the only one of its type on both sides
            continue
        # the reference repeats an entity (e.g. the same practitioner in two roles): allow many-to-one
        for s, i, j in cands:
            if i not in result and s >= 10:
                result[i] = j
    return [(e, ours[result[i]] if i in result else None) for i, e in enumerate(expected)]


IG_UNMAPPED_SEGMENTS: frozenset[str] = frozenset(
    {
        "ARV",
        "UAC",
        "OH1",
        "OH2",
        "OH3",
        "OH4",
        "DB1",
        "IAM",
        "DRG",
        "GT1",
        "IN2",
        "AUT",
        "RF1",
        "ACC",
        "UB1",
        "UB2",
        "PDA",
        "RGS",
        "TQ2",
        "CTD",
        "FT1",
        "CTI",
        "DSC",
        "TXA",
    }
)
"""Segments the HL7 V2-to-FHIR IG's message maps (ADT_A01..., ORU_R01, SIU_S12) give no FHIR target.

The MS converter maps several of them anyway (GT1 → a RelatedPerson and Patient identifiers, IN2 →
Patient identifiers and names, DB1 → identifiers, PDA/ACC → Observations, RF1 → ServiceRequest).  A
reference value found *only* in such segments is explained ("outside the IG's message map"), never
counted as agreeing."""

EXPLAIN_OUTSIDE_IG = "MS maps {segs}, which the IG's message map leaves unmapped (Sluice follows the IG)"

MS_OBSERVATION_CODE_SYSTEM = "http://example.com/v2-to-fhir-converter/CodeSystem/observation-code"
MS_SEGMENT_OBSERVATIONS: dict[str, str] = {
    "death-certificate": "PDA",
    "autopsy": "PDA",
    "coroner": "PDA",
    "injury-incident": "ACC",
}
"""Observations the MS converter synthesises from one segment, under a code system of its own (no code
of the message): its ADT templates (``data/Templates/Hl7v2/ADT_A01.liquid``) include
``Resource/Observation`` with ``PDA_3`` (death-certificate), ``PDA_6`` (autopsy), ``PDA_9``
(coroner) and ``ACC`` (injury-incident).  Their values (Y/N indicators, dates) are not distinctive enough
to trace back through :func:`source_tokens`, so the origin is recognised by this code instead; the
explanation applies only when the message has that segment and the IG leaves it unmapped."""


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


def _outside_ig(value: str, tokens: Mapping[str, set[str]]) -> str:
    """The explanation when ``value`` occurs in the message only in segments the IG leaves unmapped."""
    v = norm_text(value).lower()
    if "|" in v:
        v = v.rsplit("|", 1)[1]
    segs = tokens.get(v)
    if not segs or not segs <= IG_UNMAPPED_SEGMENTS:
        return ""
    return EXPLAIN_OUTSIDE_IG.format(segs="/".join(sorted(segs)))


def _synthesised_outside_ig(res: Mapping[str, Any], segments: set[str]) -> str:
    """The explanation for an unproduced resource the MS converter synthesises from an IG-unmapped segment
    (:data:`MS_SEGMENT_OBSERVATIONS`) present in the message; "" otherwise."""
    if res.get("resourceType") != "Observation":
        return ""
    code = res.get("code")
    for coding in _as_list(code.get("coding") if isinstance(code, dict) else None):
        if not isinstance(coding, dict) or coding.get("system") != MS_OBSERVATION_CODE_SYSTEM:
            continue
        seg = MS_SEGMENT_OBSERVATIONS.get(str(coding.get("code")))
        if seg and seg in segments and seg in IG_UNMAPPED_SEGMENTS:
            return EXPLAIN_OUTSIDE_IG.format(segs=seg)
    return ""


_ELEMENT_LEAF = re.compile(r"\.(?:identifier|name|telecom|address)\[([^\]]*)\]\.\w+$")
"""``<Resource>[..].<list element>[<label>].<leaf>``: a leaf of an identifier, name, telecom or address."""


def explain_outside_ig(score: Score, tokens: Mapping[str, set[str]]) -> None:
    """Mark still-unexplained differences whose reference value comes only from IG-unmapped segments."""
    for n, d in enumerate(score.diffs):
        if d.explanation or d.ours or d.category == "resource":
            continue
        why = _outside_ig(d.expected, tokens)
        if not why and (m := _ELEMENT_LEAF.search(d.path)):
            # a leaf of a list element (an identifier's system, a name's given, a telecom's use, an address's
            # state): judge by the element it belongs to, i.e. the label the element is paired by
            why = _outside_ig(m.group(1), tokens)
        if why:
            score.diffs[n] = FieldDiff(d.path, d.category, d.ours, d.expected, why, d.file)
            score.explained += 1
            score.by_category.setdefault(d.category, [0, 0, 0])[2] += 1


REFERENCED_ONLY: frozenset[str] = frozenset({"Practitioner"})
"""Types scored only when a scored resource refers to them (directly or via a PractitionerRole).

The MS converter makes a Practitioner for every XCN of every segment (PR1 surgeons, GT1, ROL, ...);
Sluice maps the segments of its spec only, so an unproduced Practitioner counts against us only when
a resource we are scored on (Encounter.participant, Observation.performer, ...) refers to it."""


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

    With the HL7 ``source`` text, differences whose reference value occurs only in segments the IG's
    message map leaves unmapped (:data:`IG_UNMAPPED_SEGMENTS`) are explained, not counted."""
    tokens = source_tokens(source) if source else {}
    segments = {f[0].strip().upper() for f in _split_hl7(source)} if source else set()
    types = set(scored_types)
    score = Score()
    our_res = resources(ours)
    exp_res = resources(expected)
    score.our_resources.update(str(r.get("resourceType")) for r in our_res)
    score.expected_resources.update(str(r.get("resourceType")) for r in exp_res)
    exp_scored = [r for r in exp_res if r.get("resourceType") in types]
    our_scored = [r for r in our_res if r.get("resourceType") in types]
    in_scope = _in_scope(expected, exp_scored)
    for exp, mine in match_resources(our_scored, exp_scored):
        label = resource_label(exp)
        if mine is not None:
            compare_resources(mine, exp, label, score)
            continue
        if id(exp) not in in_scope:
            score.out_of_scope.append(label)
            continue
        missing = Score()
        compare_resources({}, exp, label, missing)
        if not missing.compared:
            continue
        inner = label[label.find("[") + 1 : -1].split("@")[0] if "[" in label else ""
        why = _outside_ig(inner, tokens) if inner and tokens else ""
        if not why and segments:
            why = _synthesised_outside_ig(exp, segments)
        score.compared += missing.compared
        if why:
            score.explained += missing.compared
        for cat, (c, _a, _e) in missing.by_category.items():
            counts = score.by_category.setdefault(cat, [0, 0, 0])
            counts[0] += c
            if why:
                counts[2] += c
        score.unmatched.append(label)
        score.diffs.append(
            FieldDiff(label, "resource", "", f"(not produced: {missing.compared} reference fields)", why)
        )
    if tokens:
        explain_outside_ig(score, tokens)
    return score
