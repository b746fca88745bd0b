"""HL7 v2 datatypes → FHIR R4 datatypes, as plain dicts (pure functions; no models on the hot path).

Conventions shared by every message module (adt, oru, siu):

* Inputs are :class:`engine.hl7.Rep` (one field repetition) or plain strings; empty input gives
  ``None`` (or ``[]`` for lists) so callers can write ``if (x := xpn(rep)): ...``.
* Functions that need settings, counted events or to add resources take the
  :class:`transforms.bundle.ConvertContext` ``ctx``.
* Content problems raise :class:`engine.errors.ConversionError` with a table-0357 code and a
  :class:`engine.errors.Location` ``loc`` the caller passes in (``seg.loc(field, component)``).
  Error texts never contain message values (no PHI).
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final
from urllib.parse import quote

from engine.errors import ConversionError, Location
from engine.hl7 import Delimiters, Rep, Segment
from transforms.bundle import ConvertContext
from transforms.bundle import copy_json as copy_json
from transforms.settings import DERIVED_SYSTEM_PREFIX, MAPS_DIR, ConvertSettings

JSON = dict[str, Any]

# ---------------------------------------------------------------------------
# Code systems
# ---------------------------------------------------------------------------
LOINC: Final = "http://loinc.org"
SNOMED: Final = "http://snomed.info/sct"
UCUM: Final = "http://unitsofmeasure.org"
NULL_FLAVOR: Final = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"
NPI_SYSTEM: Final = "http://hl7.org/fhir/sid/us-npi"
NPI_OID: Final = "2.16.840.1.113883.4.6"
LOCAL_CODE_SYSTEM_PREFIX: Final = "urn:sluice:codesystem:"
V2_TABLE: Final = "http://terminology.hl7.org/CodeSystem/v2-"

CODE_SYSTEMS: Final[dict[str, str]] = {
    "LN": LOINC,
    "LOINC": LOINC,
    "SCT": SNOMED,
    "SNOMED": SNOMED,
    "SNOMEDCT": SNOMED,
    "SNOMED-CT": SNOMED,
    "SNM": SNOMED,
    "SNM3": SNOMED,  # table 0396 SNOMED International: senders send SNOMED CT ids under it (as MS maps it)
    "I10": "http://hl7.org/fhir/sid/icd-10-cm",
    "I10C": "http://hl7.org/fhir/sid/icd-10-cm",
    "ICD10CM": "http://hl7.org/fhir/sid/icd-10-cm",
    "ICD-10-CM": "http://hl7.org/fhir/sid/icd-10-cm",
    "ICD10": "http://hl7.org/fhir/sid/icd-10",
    "ICD-10": "http://hl7.org/fhir/sid/icd-10",
    "I10P": "http://www.cms.gov/Medicare/Coding/ICD10",
    "I9CM": "http://hl7.org/fhir/sid/icd-9-cm",
    "I9CDX": "http://hl7.org/fhir/sid/icd-9-cm",  # table 0396: ICD-9CM diagnosis codes
    "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
    "I9": "http://hl7.org/fhir/sid/icd-9-cm",
    "ICD9CM": "http://hl7.org/fhir/sid/icd-9-cm",
    "RXNORM": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "RXN": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "CPT": "http://www.ama-assn.org/go/cpt",
    "C4": "http://www.ama-assn.org/go/cpt",
    "CPT4": "http://www.ama-assn.org/go/cpt",
    "CVX": "http://hl7.org/fhir/sid/cvx",
    "NDC": "http://hl7.org/fhir/sid/ndc",
    "UCUM": UCUM,
    "UOM": UCUM,
    "CDCREC": "urn:oid:2.16.840.1.113883.6.238",
    "ISO3166_1": "urn:iso:std:iso:3166",
    "ISO3166": "urn:iso:std:iso:3166",
    "ISO639": "urn:ietf:bcp:47",
    "NUCC": "http://nucc.org/provider-taxonomy",
    "HCPCS": "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
    "ICDO": "http://terminology.hl7.org/CodeSystem/icd-o",
    "ICDO3": "http://terminology.hl7.org/CodeSystem/icd-o",
    "ICD-O": "http://terminology.hl7.org/CodeSystem/icd-o",
    # more table 0396 names with a published FHIR system (HL7 Terminology / FHIR's sid namespace)
    "SCT2": SNOMED,
    "I10PCS": "http://www.cms.gov/Medicare/Coding/ICD10",
    "ICD10PCS": "http://www.cms.gov/Medicare/Coding/ICD10",
    "I9CP": "http://www.cms.gov/Medicare/Coding/ICD9",
    "ICD10CA": "http://hl7.org/fhir/sid/icd-10-ca",
    "HPC": "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
    "MVX": "http://hl7.org/fhir/sid/mvx",
    "NCIT": "http://ncicb.nci.nih.gov/xml/owl/EVS/Thesaurus.owl",
    "MDC": "urn:iso:std:iso:11073:10101",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "FDAUNII": "http://fdasis.nlm.nih.gov",
    "NULLFL": NULL_FLAVOR,
    "ISO3166_2": "urn:iso:std:iso:3166:-2",
    "ISO4217": "urn:iso:std:iso:4217",
    # CDC PHIN vocabulary (immunization and public-health reporting guides)
    "CDCPHINVS": "urn:oid:2.16.840.1.114222.4.5.274",
    "PHINQUESTION": "urn:oid:2.16.840.1.114222.4.5.232",
}
_HL7_TABLE: Final = re.compile(r"^HL7[-_]?(\d{4})$", re.IGNORECASE)
_URI_SAFE: Final = "-._~:"


def code_system(name: str, overrides: Mapping[str, str] | None = None) -> str | None:
    """HL7 v2 coding-system name (CWE-3) → FHIR system URI.  Unknown names → a local system.

    ``overrides``: the channel's ``coding_systems`` (name stripped and upper-cased → URI), before the shipped
    names."""
    if overrides:
        hit = overrides.get(name.strip().upper())
        if hit is not None:
            return hit
    try:
        return _SYSTEM_CACHE[name]
    except KeyError:
        pass
    out = _code_system(name)
    if len(_SYSTEM_CACHE) < 4096:
        _SYSTEM_CACHE[name] = out
    return out


_SYSTEM_CACHE: Final[dict[str, str | None]] = {}


def _code_system(name: str) -> str | None:
    name = name.strip()
    if not name:
        return None
    known = CODE_SYSTEMS.get(name.upper())
    if known:
        return known
    m = _HL7_TABLE.match(name)
    if m:
        return V2_TABLE + m.group(1)
    if name.startswith(("http://", "https://", "urn:")):
        return name
    return LOCAL_CODE_SYSTEM_PREFIX + quote(name, safe=_URI_SAFE)


# ---------------------------------------------------------------------------
# Vocabulary (IG concept maps)
# ---------------------------------------------------------------------------
ADMINISTRATIVE_SEX: Final = {
    "F": "female",
    "M": "male",
    "O": "other",
    "U": "unknown",
    "A": "other",
    "N": "other",
}
NAME_USE: Final = {
    "BAD": "old",
    "D": "usual",
    "L": "official",
    "M": "maiden",
    "MSK": "anonymous",
    "N": "nickname",
    "NAV": "temp",
    "R": "official",
    "TEMP": "temp",
    "NOUSE": "old",
}
ADDRESS_USE: Final = {"BA": "old", "BI": "billing", "C": "temp", "B": "work", "O": "work", "H": "home"}
ADDRESS_TYPE: Final = {"M": "postal", "SH": "postal"}
TELECOM_USE: Final = {
    "PRN": "home",
    "WPN": "work",
    "PRS": "mobile",
    "VHN": "temp",
    "ORN": "home",
    "EMR": "home",
}
TELECOM_SYSTEM: Final = {
    "PH": "phone",
    "FX": "fax",
    "MD": "other",
    "CP": "phone",
    "SAT": "other",
    "BP": "pager",
    "INTERNET": "email",
    "X.400": "email",
    "TDD": "other",
    "TTY": "other",
}


# ---------------------------------------------------------------------------
# Raw-field shortcuts for the hot mappers (same results as the parser's accessors)
# ---------------------------------------------------------------------------
def value(seg: Segment, n: int, ctx: ConvertContext) -> str:
    """``seg.get(n)`` (component 1 of the first repetition, unescaped; "" when absent).

    A raw value of letters and digits only (a code, a date, a number: most single-valued fields) is
    returned as it is, without the parser's per-field split and cache."""
    f = seg.fields
    v = f[n] if n < len(f) else ""
    if not v or (ctx.alnum_plain and v.isalnum()):
        return v
    return seg.get(n)


def rep_of(seg: Segment, n: int, ctx: ConvertContext) -> Rep:
    """``seg.rep(n)`` (the first repetition of field ``n``).  A field without repetitions becomes a
    :class:`Rep` of its raw text directly (not cached on the segment: for fields a mapper reads once)."""
    f = seg.fields
    v = f[n] if n < len(f) else ""
    d = ctx.delimiters
    if not v or d.repetition in v or n < 3:  # (MSH-1/2 are literal: the parser's accessor knows)
        return seg.rep(n)
    return Rep(v, d)


def table(
    ctx: ConvertContext, mapping: Mapping[str, str], code: str, loc: Location, table_name: str
) -> str | None:
    """Look ``code`` up in an IG concept map.  Unknown → counted ``code_table_miss`` (or AE 103)."""
    code = code.strip()
    if not code:
        return None
    hit = mapping.get(code) or mapping.get(code.upper())
    if hit is not None:
        return hit
    ctx.count("code_table_miss")
    if ctx.settings.code_table_errors == "reject":
        raise ConversionError(f"value not in HL7 table {table_name}", code="103", location=loc)
    return None


def table_at(
    ctx: ConvertContext, mapping: Mapping[str, str], seg: Segment, field: int, table_name: str
) -> str | None:
    """:func:`table` of ``seg``-``field`` component 1: the location is built only for a miss."""
    code = value(seg, field, ctx).strip()
    if not code:
        return None
    hit = mapping.get(code) or mapping.get(code.upper())
    if hit is not None:
        return hit
    return table(ctx, mapping, code, seg.loc(field), table_name)


# ---------------------------------------------------------------------------
# Dates and times
# ---------------------------------------------------------------------------
_DTM: Final = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?([+-]\d{4})?$")


def _bad_date(loc: Location | None, why: str) -> ConversionError:
    return ConversionError(f"{_where(loc)} is not a valid HL7 date/time ({why})", code="102", location=loc)


def _where(loc: Location | None) -> str:
    return str(loc) if loc is not None else "value"


def _fmt_offset(off: timedelta) -> str:
    total = int(off.total_seconds() // 60)
    sign = "+" if total >= 0 else "-"
    total = abs(total)
    return f"{sign}{total // 60:02d}:{total % 60:02d}"


_DTM_CACHE: Final[dict[tuple[str, str, str, str | None], str]] = {}
_DTM_CACHE_MAX: Final = 16384


def dtm(
    value: str, settings: ConvertSettings, loc: Location | None = None, kind: str = "dateTime"
) -> str | None:
    """HL7 DTM/TS/DT → FHIR date/dateTime/instant (see :func:`_dtm`).

    Results are cached per (value, kind, site zone, date format): the conversion is a pure function
    of those, and the same timestamps recur within a message (MSH-7, EVN-2, OBX-14, ...) and a feed.
    Only successes are cached; an invalid value raises with its location every time."""
    if not value:
        return None
    key = (value, kind, settings.site_tz, settings.date_format)
    hit = _DTM_CACHE.get(key)
    if hit is not None:
        return hit
    out = _dtm(value, settings, loc, kind)
    if out is not None:
        if len(_DTM_CACHE) >= _DTM_CACHE_MAX:
            _DTM_CACHE.clear()
        _DTM_CACHE[key] = out
    return out


def dtm_at(
    value: str, settings: ConvertSettings, seg: Segment, field: int, kind: str = "dateTime"
) -> str | None:
    """:func:`dtm` of a value read from ``seg``-``field``: the location is only built when the value is
    not cached (it is only needed for an error)."""
    if not value:
        return None
    hit = _DTM_CACHE.get((value, kind, settings.site_tz, settings.date_format))
    if hit is not None:
        return hit
    return dtm(value, settings, seg.loc(field), kind)


def _dtm(
    value: str, settings: ConvertSettings, loc: Location | None = None, kind: str = "dateTime"
) -> str | None:
    """HL7 DTM/TS/DT (any precision) → FHIR ``date`` / ``dateTime`` / ``instant`` string.

    Precision is kept (``2025`` → ``2025``, ``202503`` → ``2025-03``); a time part is padded to
    seconds (FHIR requires them).  An explicit offset is kept; without one the time is in the
    channel's site zone (``settings.site_tz``, DST-correct), never the host's.  ``kind="date"``
    cuts to the date; ``kind="instant"`` pads to full seconds.  Invalid values raise AE 102.
    """
    value = value.strip()
    if not value:
        return None
    m = _DTM.match(value)
    if m is None:
        if settings.date_format:
            return _custom(value, settings, loc, kind)
        raise _bad_date(loc, "expected YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]")
    y, mo, d, hh, mi, ss, frac, off = m.groups()
    year = int(y)
    if year < 1:
        raise _bad_date(loc, "year out of range")
    try:
        datetime(year, int(mo or 1), int(d or 1))
    except ValueError:
        raise _bad_date(loc, "no such date") from None
    if off and (int(off[3:5]) > 59 or int(off[1:3]) > 14 or (off[1:3] == "14" and off[3:5] != "00")):
        raise _bad_date(loc, "time zone offset out of range")
    if kind == "date" or hh is None:
        out = y
        if mo:
            out += "-" + mo
            if d:
                out += "-" + d
        if kind != "instant":
            return out
        if mo is None or d is None:
            raise _bad_date(loc, "an instant needs at least a full date")
    h, mn, s = int(hh or 0), int(mi or 0), int(ss or 0)
    if h > 23 or mn > 59 or s > 59:
        raise _bad_date(loc, "time out of range")
    if off:
        oh, om = int(off[1:3]), int(off[3:5])
        if om > 59 or oh > 14 or (oh == 14 and om):
            raise _bad_date(loc, "time zone offset out of range")
        sign = 1 if off[0] == "+" else -1
        offset = timedelta(hours=oh, minutes=om) * sign
    else:
        local = datetime(year, int(mo or 1), int(d or 1), h, mn, s, tzinfo=settings.zone)
        o = local.utcoffset()
        offset = o if o is not None else timedelta(0)
    text = f"{y}-{mo or '01'}-{d or '01'}T{h:02d}:{mn:02d}:{s:02d}"
    if frac:
        text += "." + frac
    return text + _fmt_offset(offset)


def _custom(value: str, settings: ConvertSettings, loc: Location | None, kind: str) -> str | None:
    fmt = settings.date_format or ""
    has_time = any(t in fmt for t in ("%H", "%I", "%M", "%S"))
    parsed: datetime | None = None
    date_only = False
    try:
        parsed = datetime.strptime(value, fmt)
    except ValueError:
        date_fmt = fmt.split(" ")[0] if has_time else fmt
        try:
            parsed = datetime.strptime(value, date_fmt)
            date_only = True
        except ValueError:
            raise _bad_date(loc, "matches neither HL7 DTM nor the channel's date_format") from None
    if not has_time:
        date_only = True
    if kind == "date" or (date_only and kind != "instant"):
        return parsed.strftime("%Y-%m-%d")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=settings.zone)
    o = parsed.utcoffset() or timedelta(0)
    return parsed.strftime("%Y-%m-%dT%H:%M:%S") + _fmt_offset(o)


def dt(value: str, settings: ConvertSettings, loc: Location | None = None) -> str | None:
    """HL7 DT (or a DTM cut to its date) → FHIR ``date``."""
    return dtm(value, settings, loc, kind="date")


def period(
    start: str,
    end: str,
    settings: ConvertSettings,
    loc_start: Location | None = None,
    loc_end: Location | None = None,
) -> JSON | None:
    """Two DTM strings → Period (or None if both empty)."""
    p: JSON = {}
    if start and (s := dtm(start, settings, loc_start)):
        p["start"] = s
    if end and (e := dtm(end, settings, loc_end)):
        p["end"] = e
    return p or None


def period_at(
    start: str, end: str, settings: ConvertSettings, seg: Segment, start_field: int, end_field: int
) -> JSON | None:
    """:func:`period` of two values read from ``seg`` (locations built only when needed for an error)."""
    p: JSON = {}
    if start and (s := dtm_at(start, settings, seg, start_field)):
        p["start"] = s
    if end and (e := dtm_at(end, settings, seg, end_field)):
        p["end"] = e
    return p or None


def ends_before_start(start: str, end: str) -> bool:
    """Do two FHIR date/dateTime strings (as :func:`dtm` writes them) make a period that ends before it
    starts (FHIR invariant per-1)?  Values of different precision are compared as FHIRPath does only when
    both have a time with an offset, else as dates when both are full dates; otherwise they are not
    comparable and the period is kept."""
    if len(start) >= 25 and len(end) >= 25:  # YYYY-MM-DDThh:mm:ss[.f]+zz:zz
        try:
            return datetime.fromisoformat(end) < datetime.fromisoformat(start)
        except ValueError:
            return False
    if len(start) == len(end):  # same date precision (YYYY, YYYY-MM, YYYY-MM-DD): text order is time order
        return end < start
    return False


def drop_end_before_start(p: JSON, ctx: ConvertContext, kind: str, loc: Location, text: str) -> None:
    """FHIR per-1: a period ``p`` (``start``/``end``) that ends before it starts loses its end, with the located
    warning ``kind``; the start is kept (it begins, and often keys, what the period times)."""
    if "start" in p and "end" in p and ends_before_start(p["start"], p["end"]):
        del p["end"]
        ctx.warn(kind, loc, text)


def dr(rep: Rep, comp: int, settings: ConvertSettings, loc: Location | None = None) -> JSON | None:
    """DR (date range) held in component ``comp`` of ``rep`` (subcomponents 1 and 2) → Period."""
    return period(rep.c(comp, 1), rep.c(comp, 2), settings, loc, loc)


def utc_now_instant() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")


# ---------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------
_TAG: Final = re.compile(r"<[^>]{0,2000}>")
TRUNCATION_MARKER: Final = " [truncated]"


def plain_text(rep: Rep, d: Delimiters) -> str:
    """A value of a composite or unknown type (OBX-5; a CWE sent in an ST field such as SPM-14) as text: its
    components and subcomponents (unescaped) joined by a space, empty ones left out, so the HL7 encoding
    (``99999999^NJ`` of a DLN, ``^182``) never reaches a FHIR string."""
    raw = rep.raw
    if d.component not in raw and d.subcomponent not in raw:
        return rep.text.strip()
    parts = (s.strip() for i in range(1, len(rep) + 1) for s in rep.subs(i))
    return " ".join(p for p in parts if p)


def clean_text(ctx: ConvertContext, value: str) -> str:
    """TX/FT/ST text cleanup per channel: strip HTML tags (keeps line breaks), truncate with a marker."""
    s = ctx.settings
    if s.strip_html and "<" in value:
        stripped = _TAG.sub("", re.sub(r"(?i)<br\s*/?>", "\n", value))
        if stripped != value:
            ctx.count("html_stripped")
            value = html.unescape(stripped)
    n = s.note_max_length
    if n is not None and len(value) > n:
        ctx.count("text_truncated")
        value = value[: max(0, n - len(TRUNCATION_MARKER))] + TRUNCATION_MARKER
    return value


def string(value: str) -> str | None:
    """ST → string, stripped; None when empty."""
    v = value.strip()
    return v or None


# ---------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------
_NUM: Final = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


_INT64: Final = 1 << 63
EXACT_DIGITS: Final = 15  # a decimal with at most 15 significant digits survives float and back unchanged
MAX_NUMBER_DIGITS: Final = 4300  # longer is no measurement (and Python's int() refuses it): a located error
MAX_WHOLE_DIGITS: Final = (
    308  # 1e308 and past: JSON readers (orjson, JavaScript) read it as infinite or refuse it
)
NUMBER_RANGE: Final = f"more than {MAX_NUMBER_DIGITS:,} digits, or 1e{MAX_WHOLE_DIGITS} or more"


def exact_number(num: str) -> int | float | Decimal | None:
    """Text already matched as a plain number (optional sign, digits, optional fraction) → its FHIR decimal
    with the precision kept: an int when there is no decimal point and it fits 64 bits, a float when the
    value has at most 15 significant digits (and so survives the round trip), else a ``Decimal`` of the
    digits as sent, which :func:`engine.exactjson.dumps` writes as that JSON number token (orjson refuses
    integers past 64 bits and a float would round a longer decimal).  ``None`` when it is out of range
    (:func:`number_out_of_range`)."""
    if len(num) <= EXACT_DIGITS:  # the usual case: too short to be either
        return float(num) if "." in num else int(num)
    digits = num.lstrip("+-")
    if number_out_of_range(digits):
        return None
    if "." not in digits:
        if len(digits.lstrip("0")) <= 19:
            n = int(num)
            if -_INT64 <= n < _INT64:
                return n
        return Decimal(num)
    whole, _, frac = digits.partition(".")
    if len(digits) > 300 or len((whole + frac).strip("0")) > EXACT_DIGITS:  # float would round or overflow
        return Decimal(num)
    return float(num)


def number_out_of_range(text: str) -> bool:
    """Longer than ``MAX_NUMBER_DIGITS`` digits, or a whole part of more than ``MAX_WHOLE_DIGITS`` digits:
    no measurement, and no FHIR reader would take it (a fallback to text would hide that)."""
    body = text.strip().lstrip("+-")
    if len(body) - ("." in body) > MAX_NUMBER_DIGITS:
        return True
    return len(body.split(".")[0].lstrip("0")) > MAX_WHOLE_DIGITS


def nm(value: str, loc: Location | None = None) -> int | float | Decimal | None:
    """NM → JSON number (int when there is no decimal point; a ``Decimal`` past what int/float carry, see
    :func:`exact_number`).  Not a number, or out of range (:func:`number_out_of_range`) → AE 102."""
    v = value.strip()
    if not v:
        return None
    if not _NUM.match(v):
        raise ConversionError(f"{_where(loc)} is not a number", code="102", location=loc)
    n = exact_number(v)
    if n is None:
        raise ConversionError(
            f"{_where(loc)} is a number out of range ({NUMBER_RANGE}); send a measurement",
            code="102",
            location=loc,
        )
    return n


def nm_or_none(value: str) -> int | float | Decimal | None:
    """:func:`nm` without the error, for optional numbers whose caller drops a bad one with a warning:
    ``None`` for an empty value, a value that is not a number, or one out of range.  Raising and
    catching the error cost more than the rest of such a mapping (callgrind)."""
    v = value.strip()
    return exact_number(v) if v and _NUM.match(v) else None


def unsigned_int(value: str) -> int | None:
    """ASCII digits → a FHIR ``unsignedInt`` (0 to 2**31 - 1); ``None`` for anything else (``str.isdigit``
    alone would pass ``"²"``, which ``int()`` refuses)."""
    v = value.strip()
    if not (v.isascii() and v.isdigit()) or len(v) > 10:
        return None
    n = int(v)
    return n if n < 1 << 31 else None


def positive_int(value: str) -> int | None:
    """ASCII digits → a FHIR ``positiveInt`` (1 to 2**31 - 1); ``None`` for anything else."""
    n = unsigned_int(value)
    return n if n else None


def unit(rep: Rep | None, settings: ConvertSettings | None = None) -> JSON:
    """CWE units (OBX-6) → the ``unit``/``system``/``code`` part of a Quantity (a new dict each call).

    The UCUM system only for valid UCUM: a unit in the channel's ``unit_map`` or the shipped
    ``transforms/maps/units.csv`` (``mmHg`` → ``mm[Hg]``) gets its UCUM code; otherwise the code is
    checked with the UCUM grammar (:func:`valid_ucum`); a unit that is neither keeps its text, no system.
    A code sent under another coding system (OBX-6.3 ``ISO+``, a local table) keeps that system.  A units CWE with
    only its alternate triplet (CWE-4/5/6) is read from that."""
    if rep is None or not rep:
        return {}
    c = rep.cs(3)
    if not c[0].strip() and not c[1].strip():
        # no primary unit but an alternate one (``^^^mm Hg^^L``: CWE-4/5/6, as some lab systems send it)
        c = rep.cs(6)[3:6]
    if settings is not None and settings.unit_map:
        local = settings.unit_map.get(c[0].strip()) or settings.unit_map.get(c[0].strip().upper())
        if local is not None and _ucum_or_unnamed(c[2].strip()):
            return {"unit": c[1].strip() or c[0].strip(), "system": UCUM, "code": local}
    key = (c[0], c[1], c[2])
    hit = _UNIT_CACHE.get(key)
    if hit is None:
        hit = dict(_unit(*key))
        if len(_UNIT_CACHE) >= _UNIT_CACHE_MAX:
            _UNIT_CACHE.clear()
        _UNIT_CACHE[key] = hit
    return hit.copy()  # a dict copy is a clone of its table; dict(pairs) inserts one by one


# (code, text, coding system) of a units CWE → the Quantity items: a pure function, and a feed uses few units.
# The cached dicts are never handed out, only copies of them.
_UNIT_CACHE: Final[dict[tuple[str, str, str], dict[str, str]]] = {}
_UNIT_CACHE_MAX: Final = 4096


def _ucum_or_unnamed(sysname: str) -> bool:
    return not sysname or code_system(sysname) == UCUM


def _unit(code: str, text: str, sysname: str) -> tuple[tuple[str, str], ...]:
    code, text, sysname = code.strip(), text.strip(), sysname.strip()
    q: list[tuple[str, str]] = []
    if text or code:
        q.append(("unit", text or code))
    if code.isdigit() and code != "1" and _ucum_or_unnamed(sysname):
        # A bare number (RXE-5 ``43^mg/hr``) is a sender's local unit code: UCUM's grammar reads it as a
        # dimensionless factor (5 times 43), so the unit's text, when it is UCUM or mapped, is the code instead.
        code = text
    if code:
        if _ucum_or_unnamed(sysname):
            ucum = UNIT_MAP.get(code) or UNIT_MAP.get(code.upper())
            if ucum is None and _upper_case_only(code):
                # MG, G, EA: UCUM's case-insensitive form (what upper-case-only senders write), never read as the
                # case-sensitive codes they spell (megagram, gauss, exa-ampere)
                ucum = ucum_from_case_insensitive(code)
            elif ucum is None and valid_ucum(code):
                ucum = code
            if ucum is not None:
                q.append(("system", UCUM))
                q.append(("code", ucum))
        elif system := code_system(sysname):
            q.append(("system", system))
            q.append(("code", code))
    return tuple(q)


def _load_unit_map() -> dict[str, str]:
    from transforms.settings import load_unit_map

    return load_unit_map(str(MAPS_DIR / "units.csv"), MAPS_DIR)


UNIT_MAP: Final[dict[str, str]] = _load_unit_map()
"""The shipped local-unit → UCUM map (transforms/maps/units.csv); keys exact and upper-cased."""

_UCUM_LIKE: Final = re.compile(r"^[A-Za-z0-9%/.\[\]{}()*^'_-]+$")
_UCUM_VALID: Final[dict[str, bool]] = {}
_UCUM_VALID_MAX: Final = 4096
_ucum_parse: list[Any] = []  # [parse function] once ucumvert is loaded; [None] when it is not installed


def valid_ucum(code: str) -> bool:
    """Is ``code`` valid UCUM (case-sensitive)?  Checked with ``ucumvert`` (the UCUM grammar and its unit
    atoms, a dependency), cached per unit; without it (an install that dropped it) only the UCUM character
    set is checked."""
    hit = _UCUM_VALID.get(code)
    if hit is not None:
        return hit
    if not _ucum_parse:
        try:
            from ucumvert import get_ucum_parser

            _ucum_parse.append(get_ucum_parser().parse)
        except ImportError:  # pragma: no cover - ucumvert is a dependency
            _ucum_parse.append(None)
    parse = _ucum_parse[0]
    if parse is None:  # pragma: no cover
        ok = bool(_UCUM_LIKE.match(code))
    else:
        try:
            parse(code)
            ok = True
        except Exception:  # lark's UnexpectedInput family, and anything else the grammar refuses
            ok = False
    if len(_UCUM_VALID) >= _UCUM_VALID_MAX:
        _UCUM_VALID.clear()
    _UCUM_VALID[code] = ok
    return ok


def _upper_case_only(code: str) -> bool:
    return any(ch.isalpha() for ch in code) and not any(ch.islower() for ch in code)


# UCUM's case-insensitive codes (the ``CODE`` attributes of ucum-essence.xml, which ucumvert ships) → the
# case-sensitive ones: prefixes, and units with whether they take a prefix.  Loaded on first use.
_CI_PREFIXES: Final[dict[str, str]] = {}
_CI_UNITS: Final[dict[str, tuple[str, bool]]] = {}
_CI_TERM: Final = re.compile(r"^(10\*|10\^|(?:\[[^\[\]]*\]|[^0-9+\-{}\[\]])+?)([+-]?\d+)?(\{[^{}]*\})?$")
_CI_CACHE: Final[dict[str, str | None]] = {}


def _load_case_insensitive() -> None:
    import xml.etree.ElementTree as ET
    from importlib import resources

    try:
        root = ET.fromstring(resources.files("ucumvert").joinpath("vendor/ucum-essence.xml").read_bytes())
    except (ImportError, OSError, ET.ParseError):  # pragma: no cover - ucumvert is a dependency
        _CI_PREFIXES["?"] = "?"  # loaded, empty: every upper-case-only code is then left without a system
        return
    for el in root:
        cs, ci, tag = el.get("Code"), el.get("CODE"), el.tag.rsplit("}", 1)[-1]  # namespaced tags
        if not cs or not ci:
            continue
        if tag == "prefix":
            _CI_PREFIXES[ci] = cs
        elif tag in ("base-unit", "unit"):
            metric = tag == "base-unit" or el.get("isMetric") == "yes"
            # two units share a case-insensitive code (l and L, [iU] and [IU]): the one spelt like it wins
            if ci not in _CI_UNITS or cs == ci:
                _CI_UNITS[ci] = (cs, metric)


def _ci_atom(atom: str) -> str | None:
    hit = _CI_UNITS.get(atom)
    if hit is not None:
        return hit[0]
    for n in (2, 1):  # the prefixes' case-insensitive codes are one or two letters (DA, MA, ...)
        prefix, rest = _CI_PREFIXES.get(atom[:n]), _CI_UNITS.get(atom[n:])
        if prefix is not None and rest is not None and rest[1]:
            return prefix + rest[0]
    return None


def ucum_from_case_insensitive(code: str) -> str | None:
    """A unit in UCUM's case-insensitive form (``MG/DL``, ``10*3/UL``, ``MMOL/L``) → its case-sensitive code
    (``mg/dL``, ``10*3/uL``, ``mmol/L``); ``None`` for a code that is not case-insensitive UCUM (``EA``, ``TAB``).
    Terms joined by ``.`` and ``/``, each an atom with an optional prefix, exponent and annotation."""
    if code in _CI_CACHE:
        return _CI_CACHE[code]
    if not _CI_PREFIXES:
        _load_case_insensitive()
    out: str | None = None
    if code and "(" not in code and ")" not in code:
        parts = re.split(r"([./])", code)
        built: list[str] = []
        for part in parts:
            if part in (".", "/") or (not part and not built):
                built.append(part)
                continue
            m = _CI_TERM.match(part)
            if part.isdigit() or (part.startswith("{") and part.endswith("}")):
                built.append(part)
                continue
            if m is None or (atom := _ci_atom(m.group(1))) is None:
                built = []
                break
            built.append(atom + (m.group(2) or "") + (m.group(3) or ""))
        candidate = "".join(built)
        if built and valid_ucum(candidate):
            out = candidate
    if len(_CI_CACHE) < 4096:
        _CI_CACHE[code] = out
    return out


def quantity(value: str, units: Rep | None, loc: Location | None = None) -> JSON | None:
    """NM + units → Quantity."""
    n = nm(value, loc)
    if n is None:
        return None
    q: JSON = {"value": n}
    q.update(unit(units))
    return q


_COMPARATORS: Final = {"<": "<", ">": ">", "<=": "<=", ">=": ">="}


def sn(
    rep: Rep, units: Rep | None = None, loc: Location | None = None, settings: ConvertSettings | None = None
) -> tuple[str, Any] | None:
    """SN (structured numeric) → ``(value[x] name, value)``: valueQuantity, valueRange, valueRatio or valueString.

    ``<^5`` → Quantity with comparator; ``^1^-^5`` → Range; ``^1^:^128`` / ``^1^/^2`` → Ratio;
    ``^5^+`` (or anything unusual) → valueString of the original text.
    """
    if not rep:
        return None
    comp, n1, sep, n2 = rep.c(1).strip(), rep.c(2).strip(), rep.c(3).strip(), rep.c(4).strip()
    u = unit(units, settings)
    try:
        if not sep and not n2 and n1:
            q: JSON = {"value": nm(n1, loc)}
            if comp in ("=", ""):
                pass
            elif comp in _COMPARATORS:
                q["comparator"] = _COMPARATORS[comp]
            else:
                return ("valueString", _sn_text(rep))
            q.update(u)
            return ("valueQuantity", q)
        if sep == "-" and n1 and n2 and not comp:
            return ("valueRange", {"low": {"value": nm(n1, loc), **u}, "high": {"value": nm(n2, loc), **u}})
        if sep in (":", "/") and n1 and n2 and not comp:
            return (
                "valueRatio",
                {"numerator": {"value": nm(n1, loc)}, "denominator": {"value": nm(n2, loc)}},
            )
    except ConversionError:
        raise
    return ("valueString", _sn_text(rep)) if _sn_text(rep) else None


def _sn_text(rep: Rep) -> str:
    return "".join(rep.c(i) for i in range(1, 5)).strip()


# ---------------------------------------------------------------------------
# Names, addresses, telecom
# ---------------------------------------------------------------------------
def xpn(rep: Rep, settings: ConvertSettings | None = None) -> JSON | None:
    """XPN → HumanName.  A single component holding ``"Last, First [Middle]"`` is split."""
    if not rep:
        return None
    return _xpn(rep, rep.cs(15), settings)


def _xpn(rep: Rep, c: list[str], settings: ConvertSettings | None) -> JSON | None:
    """:func:`xpn` of a non-empty repetition and its components (at least 15)."""
    family = c[0].strip()
    given = [g for g in (c[1].strip(), c[2].strip()) if g] if c[1] or c[2] else []
    if family and not given and "," in family:
        last, _, rest = family.partition(",")
        family = last.strip()
        given = rest.split()
    if not (family or given):
        return None
    name: JSON = {}
    if c[6]:
        use = NAME_USE.get(c[6].strip().upper())
        if use:
            name["use"] = use
    if family:
        name["family"] = family
    if given:
        name["given"] = given
    if c[4] and (prefix := c[4].strip()):
        name["prefix"] = [prefix]
    if c[3] or c[5] or c[13]:
        suffix = [x for x in (c[3].strip(), c[5].strip(), c[13].strip()) if x]
        if suffix:
            name["suffix"] = suffix
    if settings is not None and len(rep) > 9:
        try:
            p = dr(rep, 10, settings) or period(c[11], c[12], settings)
        except ConversionError:
            p = None  # a bad name-validity date is not worth rejecting a message for
        if p:
            name["period"] = p
    return name


def xpns(seg: Segment, field: int, settings: ConvertSettings | None = None) -> list[JSON]:
    """Every XPN repetition → HumanName.  XPN-15 "called by" becomes a second HumanName with
    ``use: nickname`` (IG XPN[HumanName]: ``[2].given`` / ``[2].use``, for elements that allow several
    names; a single-name element such as Patient.contact.name uses :func:`xpn` and drops it)."""
    out: list[JSON] = []
    for r in seg.reps(field):
        if not r:
            continue
        c = r.cs(15)
        n = _xpn(r, c, settings)
        if n is None:
            continue
        out.append(n)
        called = c[14].strip() if c[14] else ""
        if called and called not in n.get("given", ()):
            nick: JSON = {"use": "nickname", "given": [called]}
            if nick not in out:
                out.append(nick)
    return out


_XAD_PARTS: Final = (
    (2, "city"),
    (8, "district"),
    (3, "state"),
    (4, "postalCode"),
    (5, "country"),
)  # element order


def xad(rep: Rep, settings: ConvertSettings | None = None) -> JSON | None:
    """XAD → Address."""
    if not rep:
        return None
    c = rep.cs(19)
    a: JSON = {}
    # XAD-1 SAD: street/mailing address & street name & dwelling number → one line (IG line[1-3];
    # "1000&Hospital Lane" is the street "1000 Hospital Lane"); XAD-2 other designation; XAD-19 addressee
    # subcomponents 1-3 of XAD-1 (the same as rep.subs(1)[:3], read in one call)
    s1, s2, s3 = rep.hd(1)
    street = " ".join(p for p in (s1.strip(), s2.strip(), s3.strip()) if p) if s2 or s3 else s1.strip()
    lines = [x for x in (street, c[1].strip(), c[18].strip()) if x]
    if kind := c[6].strip().upper():
        if use := ADDRESS_USE.get(kind):
            a["use"] = use
        if atype := ADDRESS_TYPE.get(kind):
            a["type"] = atype
    found = False
    if lines:
        a["line"] = lines
        found = True
    for index, key in _XAD_PARTS:
        if v := c[index].strip():
            a[key] = v
            found = True
    if settings is not None and len(rep) > 11:
        try:
            p = dr(rep, 12, settings) or period(c[12], c[13], settings)
        except ConversionError:
            p = None
        if p:
            a["period"] = p
    if not found:
        return None
    return a


def xads(seg: Segment, field: int, settings: ConvertSettings | None = None) -> list[JSON]:
    return [a for r in seg.reps(field) if (a := xad(r, settings)) is not None]


def xtn(rep: Rep, default_use: str | None = None) -> JSON | None:
    """XTN → ContactPoint (phone, fax, pager, email)."""
    if not rep:
        return None
    return _xtn(rep.cs(18), default_use)


def _xtn(c: list[str], default_use: str | None) -> JSON | None:
    """:func:`xtn` on the components (at least 18) of a non-empty repetition.

    Hot path: most components are empty, so each is tested before it is stripped."""
    equip = c[2].strip() if c[2] else ""
    equip_u = equip.upper() if equip else ""
    email = c[3].strip() if c[3] else ""
    cp: JSON = {}
    if equip_u in ("INTERNET", "X.400") or (not equip and email and not c[0].strip()):
        if not email:
            email = c[0].strip()
        if not email:
            return None
        cp["system"] = "email"
        cp["value"] = email
    else:
        # IG XTN: XTN-12 (unformatted number) when valued, else the number built from XTN-5..8, else XTN-1
        number = c[11].strip() if c[11] else ""
        if not number:
            local = c[6].strip() if c[6] else ""
            if local:
                area, ext, country = c[5].strip(), c[7].strip(), c[4].strip()
                number = (
                    (f"+{country.lstrip('+')} " if country else "") + (f"({area}) " if area else "") + local
                )
                if ext:
                    number += f" ext. {ext}"
            else:
                number = c[0].strip() if c[0] else ""
        if not number:
            if email:
                return {"system": "email", "value": email}
            return None
        cp["system"] = TELECOM_SYSTEM.get(equip_u, "phone")
        cp["value"] = number
    use = TELECOM_USE.get(c[1].strip().upper()) if c[1] else None
    if equip_u == "CP" and use is None:
        use = "mobile"
    use = use or default_use
    if use:
        cp["use"] = use
    if c[17] and (rank := positive_int(c[17])) is not None:
        cp["rank"] = rank
    return cp


def xtns(seg: Segment, field: int, default_use: str | None = None) -> list[JSON]:
    return [t for c in seg.rep_comps(field, 18) if (t := _xtn(c, default_use)) is not None]


# ---------------------------------------------------------------------------
# Identifiers
# ---------------------------------------------------------------------------
_IDENTIFIER_TYPES: Final = {
    "MR": "Medical record number",
    "PI": "Patient internal identifier",
    "SS": "Social Security number",
    "DL": "Driver's license number",
    "PT": "Patient external identifier",
    "AN": "Account number",
    "VN": "Visit number",
    "NPI": "National provider identifier",
    "PN": "Person number",
    "EI": "Employee number",
    "MA": "Patient Medicaid number",
    "MC": "Patient's Medicare number",
    "PRN": "Provider number",
    "FILL": "Filler Identifier",
    "PLAC": "Placer Identifier",
    "SB": "Social Beneficiary Identifier",
    "BC": "Bank Card Number",
    "PPN": "Passport number",
    "XX": "Organization identifier",
    "LN": "License number",
    "DN": "Doctor number",
    "ANON": "Anonymous identifier",
}
SSN_SYSTEM: Final = "http://hl7.org/fhir/sid/us-ssn"
_OID: Final = re.compile(r"^[0-2](\.(0|[1-9]\d*))+$")
_UUID: Final = re.compile(r"^[0-9a-fA-F-]{36}$")


def hd_system(
    ctx: ConvertContext, namespace: str, universal_id: str, uid_type: str
) -> tuple[str | None, str]:
    """Assigning authority (HD) → ``(system, how)``: :func:`_hd_system`, cached per channel settings
    (a feed names the same few authorities over and over)."""
    cache = ctx.hd_cache
    key = (namespace, universal_id, uid_type)
    hit = cache.get(key)
    if hit is None:
        hit = _hd_system(ctx.settings, namespace, universal_id, uid_type)
        if len(cache) < 4096:
            cache[key] = hit
    return hit


def _hd_system(
    settings: ConvertSettings, namespace: str, universal_id: str, uid_type: str
) -> tuple[str | None, str]:
    """Assigning authority (HD) → ``(system, how)``.

    ``how`` is ``"mapped"`` (settings.identifier_systems), ``"oid"``/``"uuid"``/``"uri"`` (from HD-2/3),
    ``"derived"`` (``urn:sluice:authority:<namespace>`` when derive_unknown_systems) or ``"none"``.
    """
    systems = settings.identifier_systems
    namespace, universal_id, uid_type = namespace.strip(), universal_id.strip(), uid_type.strip().upper()
    if namespace and namespace in systems:
        return systems[namespace], "mapped"
    if universal_id and universal_id in systems:
        return systems[universal_id], "mapped"
    if universal_id:
        # HD-2 universal id: an OID (whatever HD-3 says: senders often put CLIP/L/HCD there) → urn:oid
        if uid_type not in ("UUID", "GUID", "URI", "URL") and _OID.match(universal_id):
            return "urn:oid:" + universal_id, "oid"
        if uid_type in ("UUID", "GUID") and _UUID.match(universal_id):
            return "urn:uuid:" + universal_id.lower(), "uuid"
        if uid_type in ("URI", "URL") and ":" in universal_id:
            return universal_id, "uri"
    if namespace.upper() == "NPI":
        return NPI_SYSTEM, "mapped"
    if namespace.upper() in ("SSA", "USSSA") or namespace.upper() == "SS":
        return SSN_SYSTEM, "mapped"
    if settings.derive_unknown_systems and (namespace or universal_id):
        return DERIVED_SYSTEM_PREFIX + quote(namespace or universal_id, safe=_URI_SAFE), "derived"
    return None, "none"


def identifier_type(code: str) -> JSON | None:
    """CX-5 / XCN-13 identifier type code → Identifier.type (v2 table 0203).  Shared: the same dict for the same
    code, in every bundle (bundles are read-only once made; nothing changes an identifier's type in place)."""
    hit = _ID_TYPE_CACHE.get(code)
    if hit is None:
        coding = _identifier_type(code)
        hit = {"coding": [coding]} if coding else {}
        if len(_ID_TYPE_CACHE) < 1024:
            _ID_TYPE_CACHE[code] = hit
    return hit or None


def _identifier_type(code: str) -> JSON:
    code = fhir_code(code)  # a FHIR code: no inner line breaks or runs of spaces (e.g. an escaped \.br\)
    if not code:
        return {}
    coding: JSON = {"system": V2_TABLE + "0203", "code": code}
    if disp := _IDENTIFIER_TYPES.get(code):
        coding["display"] = disp
    return coding


# raw CX-5 / XCN-13 text -> the Identifier.type handed out (shared; empty: no type)
_ID_TYPE_CACHE: Final[dict[str, JSON]] = {}


def cx(rep: Rep, ctx: ConvertContext, loc: Location | None = None) -> JSON | None:
    """CX → Identifier (system from the assigning authority CX-4 via :func:`hd_system`)."""
    if not rep:
        return None
    c = rep.cs(8)
    value = c[0].strip()
    if not value:
        return None
    ident: JSON = {}
    if c[4] and (t := identifier_type(c[4])):
        ident["type"] = t
    # c[3] is only HD-1 (namespace): an authority can be HD-2/3 alone ("&2.16.840.1...&ISO")
    if c[3] or len(rep) > 3:
        ns, uid, utype = rep.hd(4)  # (not *rep.hd(4): a star call is a generic call in the compiled build)
        system, how = hd_system(ctx, ns, uid, utype)
    else:
        system, how = None, "none"
    if system is None and c[4].strip().upper() == "SS":
        system = SSN_SYSTEM
    if how == "derived":
        ctx.count("identifier_system_derived")
    if system:
        ident["system"] = system
    ident["value"] = value
    if c[6] or c[7]:
        try:
            p = period(c[6], c[7], ctx.settings, loc, loc)
        except ConversionError:
            p = None
        if p:
            ident["period"] = p
    return ident


def ei(rep: Rep, ctx: ConvertContext, loc: Location | None = None) -> JSON | None:
    """EI (entity identifier: id^namespace^universal id^type) → Identifier."""
    if not rep:
        return None
    value = rep.c(1).strip()
    if not value:
        return None
    system, how = hd_system(ctx, rep.c(2), rep.c(3), rep.c(4))
    ident: JSON = {}
    if how == "derived":
        ctx.count("identifier_system_derived")
    if system:
        ident["system"] = system
    ident["value"] = value
    return ident


# ---------------------------------------------------------------------------
# Coded values
# ---------------------------------------------------------------------------
def fhir_code(value: str) -> str:
    """A FHIR ``code``: no leading/trailing whitespace, single spaces inside."""
    return " ".join(value.split())


def _coding(code: str, display: str, sysname: str, systems: Mapping[str, str]) -> JSON | None:
    code, display = fhir_code(code), display.strip()
    if not code:
        return None
    c: JSON = {}
    if system := code_system(sysname, systems):
        c["system"] = system
    c["code"] = code
    if display:
        c["display"] = display
    return c


def cwe(
    rep: Rep,
    ctx: ConvertContext,
    loc: Location | None = None,
    *,
    field: str | None = None,
    seg: Segment | None = None,
    at: int = 0,
) -> JSON | None:
    """CWE/CE/CNE → CodeableConcept.

    ``seg``/``at`` instead of ``loc``: the value's segment and field, for a location built only when
    an error needs it.

    Codings from the identifier triplet (1-3) and the alternate triplet (4-6); text from CWE-9
    (original text) or, for a text-only value, CWE-2/CWE-1.  A code map applies when one is
    configured under the field's name (``field="OBX-3"``) or under the CWE-3 coding-system name:
    the mapped coding comes first and the local coding is kept.  A code the map lacks is counted
    as ``unmapped_code`` (or AE 103 when ``unmapped_codes: reject``).
    """
    if not rep:
        return None
    c = rep.cs(9)
    codings: list[JSON] = []
    systems = ctx.coding_systems
    first = _coding(c[0], c[1], c[2], systems) if c[0] else None
    if first:
        codings.append(first)
    alt = _coding(c[3], c[4], c[5], systems) if c[3] else None
    if alt and alt != first:
        codings.append(alt)
    maps = ctx.settings.code_maps
    if maps and first:
        cmap = (maps.get(field) if field else None) or maps.get(c[2].strip())
        if cmap is not None:
            hit = cmap.get(first["code"])
            if hit is not None:
                mapped: JSON = {"system": hit[0], "code": hit[1]}
                if hit[2]:
                    mapped["display"] = hit[2]
                if not any(c.get("system") == hit[0] and c.get("code") == hit[1] for c in codings):
                    codings.insert(0, mapped)
                ctx.count("mapped_code")
            else:
                ctx.count("unmapped_code")
                if ctx.settings.unmapped_codes == "reject":
                    if loc is None and seg is not None:
                        loc = seg.loc(at)
                    raise ConversionError(
                        f"{_where(loc)}: code not in the channel's code map; add a row for it to the map file "
                        "its code_maps entry names (sluice maps check lists what is not covered), sluice reload, "
                        "then replay; or set unmapped_codes: keep",
                        code="103",
                        location=loc,
                    )
    cc: JSON = {}
    if codings:
        cc["coding"] = codings
    text = c[8].strip()
    if not codings:
        text = text or c[1].strip() or c[0].strip()
    if text:
        cc["text"] = text
    return cc or None


def cwes(seg: Segment, n: int, ctx: ConvertContext, *, field: str | None = None) -> list[JSON]:
    return [c for r in seg.reps(n) if (c := cwe(r, ctx, field=field, seg=seg, at=n)) is not None]


def coded_table(code: str, table_no: str, display: str | None = None) -> JSON:
    """A v2 table code as a CodeableConcept with the ``terminology.hl7.org`` v2 system."""
    coding: JSON = {"system": V2_TABLE + table_no, "code": fhir_code(code)}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


# ---------------------------------------------------------------------------
# Practitioners (XCN) and locations (PL)
# ---------------------------------------------------------------------------
def _xcn_name(c: list[str]) -> JSON | None:
    """The HumanName of an XCN's components (at least 21)."""
    family = c[1].strip()
    given = [x for x in (c[2].strip(), c[3].strip()) if x] if c[2] or c[3] else []
    if family and not given and "," in family:
        last, _, rest = family.partition(",")
        family, given = last.strip(), rest.split()
    n: JSON = {}
    if family:
        n["family"] = family
    if given:
        n["given"] = given
    if c[5] and (p := c[5].strip()):
        n["prefix"] = [p]
    if c[4] or c[6] or c[20]:
        suffix = [x for x in (c[4].strip(), c[6].strip(), c[20].strip()) if x]
        if suffix:
            n["suffix"] = suffix
    return n if ("family" in n or "given" in n) else None


def _display(name: JSON | None) -> str | None:
    if not name:
        return None
    return " ".join([*name.get("prefix", []), *name.get("given", []), name.get("family", "")]).strip() or None


_KEPT_MAX: Final = 4096  # kept entries and pieces per channel (ConvertSettings.entity_memo); full: cleared


def _keep(ctx: ConvertContext, key: tuple[str, ...], value: tuple[Any, ...]) -> None:
    kept = ctx.entity_memo
    if len(kept) >= _KEPT_MAX:
        kept.clear()
    kept[key] = value


def _facility(ctx: ConvertContext) -> str:
    """The sending facility (MSH-4, else MSH-3): the scope of a practitioner id without an authority."""
    msh = ctx.message.msh
    return msh.get(4, 1).strip() or msh.get(3, 1).strip()


# Pieces of a resource that are a pure function of a field's text and the channel's settings (an OBX's
# code, interpretation and reference range: a lab sends the same tests, flags and ranges all day), kept
# per channel (ConvertSettings.entity_memo) with the events computing them counted, and shared by the later
# bundles as the kept entries are (bundles are read-only once made).  A piece whose computation warned is not
# kept; what is kept is a copy made at once, so nothing the first message does to its own reaches the others.
_Mark = tuple[int, dict[str, int]]


def kept_piece(ctx: ConvertContext, key: tuple[str, ...]) -> tuple[Any] | None:
    """``(kept value,)`` for ``key`` (shared: never change it), its events counted again; ``None`` when nothing
    is kept."""
    hit: tuple[Any, tuple[tuple[str, int], ...]] | None = ctx.entity_memo.get(key)
    if hit is None:
        return None
    for event, times in hit[1]:
        ctx.count(event, times)
    return (hit[0],)


def piece_mark(ctx: ConvertContext) -> _Mark:
    """What :func:`keep_piece` compares with: the warnings and counted events before a computation."""
    return len(ctx.warnings), dict(ctx.events)


def _events_since(ctx: ConvertContext, mark: _Mark) -> tuple[tuple[str, int], ...] | None:
    """The events counted since ``mark`` (:func:`piece_mark`); ``None`` when something warned since (then
    nothing is kept)."""
    warned, before = mark
    if len(ctx.warnings) != warned:
        return None
    return tuple((k, n - before.get(k, 0)) for k, n in ctx.events.items() if n != before.get(k, 0))


def keep_piece(ctx: ConvertContext, key: tuple[str, ...], value: Any, mark: _Mark) -> None:
    """Keep ``value`` (a copy) for ``key`` with the events counted since ``mark``, unless it warned."""
    events = _events_since(ctx, mark)
    if events is not None:
        _keep(ctx, key, (copy_json(value), events))


def kept_with_entries(ctx: ConvertContext, key: tuple[str, ...]) -> tuple[Any] | None:
    """:func:`kept_piece` for a mapper that also adds entries: those are added again (shared, as
    :meth:`ConvertContext.reuse` does) and ``(kept value,)`` returned; ``None`` when nothing is kept."""
    hit: tuple[Any, tuple[tuple[str, int], ...], tuple[tuple[str, str, JSON], ...]] | None = (
        ctx.entity_memo.get(key)
    )
    if hit is None:
        return None
    ctx.reuse(hit[2])
    for event, times in hit[1]:
        ctx.count(event, times)
    return (hit[0],)


def keep_with_entries(
    ctx: ConvertContext,
    key: tuple[str, ...],
    value: Any,
    mark: _Mark,
    rec: list[tuple[str, str, str, bool, JSON]],
) -> None:
    """Keep ``value`` and the entries recorded in ``rec`` (``ctx.record()`` before the mapper ran; the
    recording must be stopped) with the events counted since ``mark``, unless the mapper warned."""
    events = _events_since(ctx, mark)
    if events is not None:
        _keep(ctx, key, (copy_json(value), events, ctx.kept_entries(rec)))


def xcn(rep: Rep, ctx: ConvertContext, loc: Location | None = None) -> JSON | None:
    """XCN → a Practitioner entry, returning a Reference dict ``{"reference": "urn:uuid:..."}``.

    Key: the NPI (XCN-13 = NPI, or authority NPI / 2.16.840.1.113883.4.6) → us-npi; else the id with
    its authority's system; else the id scoped by the sending facility (Sluice key).  An XCN with
    a name but no id gives ``{"display": name}`` and no Practitioner (no identity to match on).

    A feed names the same practitioners message after message: the entry made for an XCN's text is kept
    for the channel's next messages (``ConvertSettings.entity_memo``, shared, never changed in place).
    """
    if not rep:
        return None
    raw = rep.raw
    memo = ctx.xcn_memo
    hit = memo.get(raw)
    if hit is not None:
        # the same XCN text in the same message: same Practitioner, same reference (a second add would
        # only merge an identical resource into the first)
        if hit[2]:
            ctx.count("identifier_system_derived")
        return {"reference": hit[0], "display": hit[1]} if hit[1] else {"reference": hit[0]}
    # the sending facility scopes an id without an authority (below), so it is part of the key
    kept_key = ("XCN", ctx.delim_key, raw, _facility(ctx))
    kept = kept_with_entries(ctx, kept_key)
    if kept is not None:
        ref, disp, derived = kept[0]
        memo[raw] = (ref, disp, derived)
        return {"reference": ref, "display": disp} if disp else {"reference": ref}
    mark = piece_mark(ctx)
    c = rep.cs(21)
    pid = c[0].strip()
    name = _xcn_name(c)
    if not pid:
        disp = _display(name)
        return {"display": disp} if disp else None
    ns, uid, utype = rep.hd(9)
    id_type_raw = c[12]
    if (
        (id_type_raw and id_type_raw.strip().upper() == "NPI")
        or ns.strip().upper() == "NPI"
        or (uid and uid.strip() == NPI_OID)
    ):
        system: str | None = NPI_SYSTEM
        how = "mapped"
    else:
        system, how = hd_system(ctx, ns, uid, utype)
    ident: JSON = {}
    if t := identifier_type(id_type_raw):
        ident["type"] = t
    if system:
        ident["system"] = system
        if how == "derived":
            ctx.count("identifier_system_derived")
    ident["value"] = pid
    prac: JSON = {"resourceType": "Practitioner", "identifier": [ident]}
    if name:
        prac["name"] = [name]
    # A conditional create: a message names a practitioner in passing (an attending doctor, a scheduling
    # contact) and does not own the directory entry.  Created when absent, never rewritten, so one feed's
    # partial XCN (no name, another phone) cannot flip-flop what another feed wrote (docs/mapping.md).
    rec = ctx.record()
    try:
        if system:
            ref = ctx.add("Practitioner", prac, identifier=(system, pid), create_only=True)
        else:
            ref = ctx.add("Practitioner", prac, key=f"{kept_key[3]}|{ns.strip()}|{pid}", create_only=True)
    finally:
        if rec is not None:
            ctx.stop_recording()
    out: JSON = {"reference": ref}
    if disp := _display(name):
        out["display"] = disp
    derived = bool(system) and how == "derived"
    memo[raw] = (ref, disp, derived)
    if rec is not None:
        keep_with_entries(ctx, kept_key, (ref, disp, derived), mark, rec)
    return out


_PL_LEVELS: Final = ((1, "wa", "Ward"), (2, "ro", "Room"), (3, "bd", "Bed"))
LOCATION_PHYSICAL_TYPE: Final = "http://terminology.hl7.org/CodeSystem/location-physical-type"


def pl(rep: Rep, ctx: ConvertContext, loc: Location | None = None) -> JSON | None:
    """PL → Location entries (point of care ⊃ room ⊃ bed, linked by ``partOf``); returns a Reference
    dict to the most specific one.  Key: facility + the path of levels (Sluice key)."""
    if not rep:
        return None
    kept_key = ("PL", ctx.delim_key, rep.raw)
    kept = kept_with_entries(ctx, kept_key)
    if kept is not None:
        ref, display = kept[0]
    else:
        mark = piece_mark(ctx)
        rec = ctx.record()
        try:
            ref, display = _pl(rep, ctx)
        finally:
            if rec is not None:
                ctx.stop_recording()
        if rec is not None:
            keep_with_entries(ctx, kept_key, (ref, display), mark, rec)
    return {"reference": ref, "display": display} if ref is not None else None


def _pl(rep: Rep, ctx: ConvertContext) -> tuple[str | None, str]:
    c = rep.cs(9)
    facility = (c[3].strip() if c[3] else "") or rep.c(4, 2).strip()
    path = [facility, c[6].strip(), c[7].strip()]
    parent: str | None = None
    ref: str | None = None
    last_name = ""
    desc = c[8].strip() if c[8] else ""
    if facility:
        site: JSON = {
            "resourceType": "Location",
            "name": facility,
            "mode": "instance",
            "status": "active",
            "physicalType": {"coding": [{"system": LOCATION_PHYSICAL_TYPE, "code": "si", "display": "Site"}]},
        }
        ref = parent = ctx.add("Location", site, key=facility)
        last_name = facility
    levels: list[str] = []
    for comp, code, disp in _PL_LEVELS:
        value = c[comp - 1].strip()
        path.append(value)
        if not value:
            continue
        levels.append(value)
        loc_res: JSON = {
            "resourceType": "Location",
            "name": value,
            "mode": "instance",
            "status": "active",
            "physicalType": {"coding": [{"system": LOCATION_PHYSICAL_TYPE, "code": code, "display": disp}]},
        }
        if comp == 3 and (status := c[4].strip()):
            loc_res["operationalStatus"] = {
                "system": V2_TABLE + "0116",
                "code": status,
            }
        if parent:
            loc_res["partOf"] = {"reference": parent}
        if desc:
            loc_res["description"] = desc
        ref = ctx.add("Location", loc_res, key="|".join(path))
        parent = ref
        last_name = value
    if ref is None:
        return None, ""
    return ref, " ".join(levels) or last_name


# ---------------------------------------------------------------------------
# Languages (PID-15, NK1-20): R4 binds communication.language (required) to BCP-47
# ---------------------------------------------------------------------------
BCP47: Final = "urn:ietf:bcp:47"
# ISO 639-2 (B and T codes, as HL7 table 0296 uses them) → the ISO 639-1 code BCP-47 requires
ISO639_2_TO_1: Final[dict[str, str]] = {
    "ara": "ar",
    "ben": "bn",
    "bos": "bs",
    "bul": "bg",
    "cat": "ca",
    "ces": "cs",
    "cze": "cs",
    "chi": "zh",
    "zho": "zh",
    "cym": "cy",
    "wel": "cy",
    "dan": "da",
    "deu": "de",
    "ger": "de",
    "ell": "el",
    "gre": "el",
    "eng": "en",
    "est": "et",
    "fas": "fa",
    "per": "fa",
    "fin": "fi",
    "fra": "fr",
    "fre": "fr",
    "gle": "ga",
    "guj": "gu",
    "hat": "ht",
    "heb": "he",
    "hin": "hi",
    "hrv": "hr",
    "hun": "hu",
    "hye": "hy",
    "arm": "hy",
    "ind": "id",
    "isl": "is",
    "ice": "is",
    "ita": "it",
    "jpn": "ja",
    "kat": "ka",
    "geo": "ka",
    "khm": "km",
    "kor": "ko",
    "lao": "lo",
    "lav": "lv",
    "lit": "lt",
    "mkd": "mk",
    "mac": "mk",
    "mal": "ml",
    "mar": "mr",
    "msa": "ms",
    "may": "ms",
    "mya": "my",
    "bur": "my",
    "nep": "ne",
    "nld": "nl",
    "dut": "nl",
    "nor": "no",
    "nob": "nb",
    "nno": "nn",
    "pan": "pa",
    "pol": "pl",
    "por": "pt",
    "pus": "ps",
    "ron": "ro",
    "rum": "ro",
    "rus": "ru",
    "slk": "sk",
    "slo": "sk",
    "slv": "sl",
    "som": "so",
    "spa": "es",
    "sqi": "sq",
    "alb": "sq",
    "srp": "sr",
    "swa": "sw",
    "swe": "sv",
    "tam": "ta",
    "tel": "te",
    "tgl": "tl",
    "tha": "th",
    "tur": "tr",
    "ukr": "uk",
    "urd": "ur",
    "vie": "vi",
    "yid": "yi",
    "yor": "yo",
    "amh": "am",
    "aze": "az",
    "bel": "be",
    "eus": "eu",
    "baq": "eu",
    "glg": "gl",
    "kaz": "kk",
    "kin": "rw",
    "mon": "mn",
    "sin": "si",
    "tir": "ti",
    "uzb": "uz",
    "xho": "xh",
    "zul": "zu",
    "afr": "af",
    "hmn": "hmn",
    "smo": "sm",
    "ton": "to",
    "haw": "haw",
}
_BCP47_TAG: Final = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$")


def bcp47(code: str) -> str | None:
    """A language code (ISO 639-1/2, or already BCP-47 like ``en-US``) → a BCP-47 tag; None if it is not one."""
    code = code.strip()
    if not code or not _BCP47_TAG.match(code):
        return None
    head, sep, rest = code.partition("-")
    head = head.lower()
    head = ISO639_2_TO_1.get(head, head)
    return head + sep + rest if sep else head


def language(rep: Rep, ctx: ConvertContext, loc: Location | None = None) -> JSON | None:
    """CWE primary language → CodeableConcept with a ``urn:ietf:bcp:47`` coding (table 0296 and ISO 639
    codes converted: ``ara`` → ``ar``); a code that is no language tag keeps its original coding."""
    if not rep:
        return None
    comps = rep.cs(9)
    codings: list[JSON] = []
    for ci in (0, 3):  # the identifier triplet and the alternate one: code, text, coding system
        code = comps[ci].strip()
        if not code:
            continue
        tag = bcp47(code)
        if tag is None:
            if c := _coding(code, comps[ci + 1], comps[ci + 2], ctx.coding_systems):
                codings.append(c)
            ctx.count("language_not_bcp47")
            continue
        c = {"system": BCP47, "code": tag}
        if disp := comps[ci + 1].strip():
            c["display"] = disp
        if c not in codings and not any(x.get("code") == tag and x.get("system") == BCP47 for x in codings):
            codings.append(c)
    cc: JSON = {}
    if codings:
        cc["coding"] = codings
    if text := comps[8].strip() or ("" if codings else comps[1].strip()):
        cc["text"] = text
    return cc or None
