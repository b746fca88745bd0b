"""ORU^R01 (observation results) → DiagnosticReport + Observation (+ Patient, Practitioner, Organization).

One DiagnosticReport per OBR group, one Observation per OBX (an ED/base64 OBX becomes a
``DiagnosticReport.presentedForm`` attachment instead, because R4 ``Observation.value[x]`` has no
Attachment).  NTEs after an OBR become report notes, NTEs after an OBX become ``Observation.note``.

Identity (see docs/mapping.md):

* DiagnosticReport: OBR-3 filler order number (else OBR-2 placer, else ORC-3 / ORC-2).
* Observation: filler order number + OBX-3 code + OBX-4 sub-id, so a resend or a correction
  (OBX-11 ``C`` or OBR-25 ``C``) updates the *same* Observation.
* Every Observation and DiagnosticReport gets a status guard (resource key, status rank) so the engine
  sends a late preliminary after a final to manual review instead of applying it.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from typing import Any, Final

from engine.errors import ConversionError, Location
from engine.hl7 import Message, Rep, Segment, escape
from transforms.bundle import OBSERVATION_STATUS_RANK, ConvertContext
from transforms.datatypes import (
    NUMBER_RANGE,
    V2_TABLE,
    clean_text,
    coded_table,
    cwe,
    cx,
    dtm,
    dtm_at,
    ei,
    ends_before_start,
    exact_number,
    hd_system,
    keep_piece,
    kept_piece,
    nm,
    number_out_of_range,
    piece_mark,
    plain_text,
    sn,
    table,
    unit,
    xad,
    xcn,
    xpns,
)
from transforms.orders import group_numbers, occurrence, order_numbers, order_type, requisition_key, typed

JSON = dict[str, Any]

# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------
# OBX-11 (HL7 table 0085) → Observation.status.  IG ObservationResultStatusCodesInterpretation for
# A C D F P W X; the rest are Sluice choices (docs/mapping.md).  Only valid FHIR codes.
OBX_STATUS: Final[dict[str, str]] = {
    "F": "final",
    "C": "corrected",
    "A": "amended",
    "P": "preliminary",
    "D": "entered-in-error",
    "W": "entered-in-error",
    "X": "cancelled",
    # not mapped by the IG:
    "B": "amended",  # appended report: final results reviewed and more information added
    "V": "final",  # verified
    "U": "final",  # status changed to final without retransmitting the result
    "R": "preliminary",  # entered, not verified
    "S": "preliminary",  # partial (deprecated)
    "I": "registered",  # specimen in lab, results pending
    "O": "registered",  # order detail only, no result
    "N": "unknown",  # not asked (dataAbsentReason not-asked)
}

# OBR-25 (HL7 table 0123) → DiagnosticReport.status.  IG ResultStatus[Non-Queries] for O I S P C R F X;
# A, M, N are Sluice choices; Y and Z are errors ("IF NOT MAPPED ERROR").
OBR_STATUS: Final[dict[str, str]] = {
    "O": "registered",
    "I": "registered",
    "S": "registered",
    "P": "preliminary",
    "C": "corrected",
    "R": "partial",
    "F": "final",
    "X": "cancelled",
    "A": "partial",
    "M": "corrected",
    "N": "registered",
}

# DiagnosticReport.status → Observation.status (used when OBX-11 is empty)
_DR_TO_OBS: Final = {
    "registered": "registered",
    "partial": "preliminary",
    "preliminary": "preliminary",
    "final": "final",
    "corrected": "corrected",
    "cancelled": "cancelled",
}

DIAGNOSTIC_REPORT_STATUS_RANK: Final[dict[str, int]] = {
    "unknown": 0,
    "registered": 1,
    "partial": 2,
    "preliminary": 2,
    "final": 3,
    "appended": 4,
    "amended": 4,
    "corrected": 4,
    "cancelled": 5,
    "entered-in-error": 6,
}


def observation_rank(status: str) -> int:
    """Guard rank of an Observation.status (``unknown`` ranks lowest)."""
    return OBSERVATION_STATUS_RANK.get(status, 0)


INTERPRETATION_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
# OBX-8 (table 0078) → v3 ObservationInterpretation (IG InterpretationCodes: identity where mapped)
INTERPRETATION: Final[dict[str, str]] = {
    "<": "Off scale low",
    ">": "Off scale high",
    "A": "Abnormal",
    "AA": "Critical abnormal",
    "B": "Better",
    "CAR": "Carrier",
    "D": "Significant change down",
    "DET": "Detected",
    "E": "Equivocal",
    "EX": "outside threshold",
    "EXP": "Expected",
    "H": "High",
    "HH": "Critical high",
    "HU": "Significantly high",
    "I": "Intermediate",
    "IE": "Insufficient evidence",
    "IND": "Indeterminate",
    "L": "Low",
    "LL": "Critical low",
    "LU": "Significantly low",
    "MS": "moderately susceptible",
    "N": "Normal",
    "NCL": "No CLSI defined breakpoint",
    "ND": "Not detected",
    "NEG": "Negative",
    "NR": "Non-reactive",
    "NS": "Non-susceptible",
    "POS": "Positive",
    "R": "Resistant",
    "RR": "Reactive",
    "S": "Susceptible",
    "SDD": "Susceptible-dose dependent",
    "SYN-R": "Synergy - resistant",
    "SYN-S": "Synergy - susceptible",
    "U": "Significant change up",
    "VS": "very susceptible",
    "UNE": "Unexpected",
    "W": "Worse",
    "WR": "Weakly reactive",
}

OBSERVATION_CATEGORY: Final = "http://terminology.hl7.org/CodeSystem/observation-category"
# OBR-24 diagnostic service section (table 0074) → Observation.category (Sluice choice; IG silent)
_LAB_SECTIONS: Final = frozenset(
    [
        "BG",
        "BLB",
        "CG",
        "CH",
        "CP",
        "GE",
        "HM",
        "IMM",
        "LAB",
        "MB",
        "MCB",
        "MYC",
        "OSL",
        "SP",
        "SR",
        "TX",
        "VR",
        "URN",
    ]
)
_IMAGING_SECTIONS: Final = frozenset(
    ["CT", "CUS", "MR", "NMR", "NMS", "OUS", "RAD", "RUS", "RX", "VUS", "XRC"]
)

ALTERNATE_CODES: Final = "http://hl7.org/fhir/StructureDefinition/alternate-codes"
R5_DR_NOTE: Final = "http://hl7.org/fhir/5.0/StructureDefinition/extension-DiagnosticReport.note"
ANALYSIS_DATE_TIME: Final = "http://hl7.org/fhir/StructureDefinition/observation-analysis-date-time"
R5_OBS_ATTACHMENT: Final = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Observation.valueAttachment"
DATA_ABSENT: Final = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
DATA_ABSENT_REASON: Final = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"

_TEXT_TYPES: Final = frozenset({"ST", "TX", "FT"})
# value types whose OBX-6 units are appended to a measurement kept as valueString (not TX/FT: narrative)
_UNITS_IN_TEXT: Final = frozenset({"ST", "NM", "SN"})
# a measurement written as text: numbers and what joins them (``5.8``, ``120/80``, ``<0.5``, ``1:40``, ``10-20``)
_MEASUREMENT_TEXT: Final = re.compile(r"[<>=~]{0,2} ?[+-]?\d[\d.,:/ +-]*")


def _units_in_text(res: JSON, u: JSON, ctx: ConvertContext) -> None:
    """A measurement that stays text (an ST ``5.8``, an NM that is not one number: ``120/80``) has no Quantity
    to carry OBX-6, so its units follow the text, as the IG's SN text rule writes them (OBX-5 ... " " OBX-6):
    ``5.8 THOU/uL``, not a bare ``5.8``.  Text that is not a measurement (``see note``) is left as it is."""
    text = res.get("valueString")
    u_text = u.get("unit")
    if isinstance(text, str) and u_text and _MEASUREMENT_TEXT.fullmatch(text) and not text.endswith(u_text):
        res["valueString"] = f"{text} {u_text}"
        ctx.count("obx_units_in_text")


_CODED_TYPES: Final = frozenset({"CWE", "CE", "CNE", "CF", "IS", "ID"})
_DATE_TYPES: Final = frozenset({"DT", "DTM", "TS"})


# ---------------------------------------------------------------------------
# Patient (shared with siu)
# ---------------------------------------------------------------------------
def patient(pid: Segment, ctx: ConvertContext) -> str:
    """PID → Patient via the ADT module's helper (same match rule and content as ADT); returns its reference.

    Written as a conditional *create* (``POST`` + ``ifNoneExist``): a result or scheduling message
    carries a sparse PID and must never overwrite the Patient the ADT feed wrote (drift safety).

    Falls back to :func:`minimal_patient` (same key rule) when the ADT module is not available.
    """
    try:
        from transforms import adt
    except ImportError:  # pragma: no cover - adt ships with Sluice
        ref = minimal_patient(pid, ctx)
    else:
        ref, _key = adt.patient(pid, ctx.message, ctx, create_only=True)
    ctx.patient_ref = ref
    return ref


def encounter(msg: Message, ctx: ConvertContext) -> str | None:
    """PV1 → Encounter (keyed by PV1-19) via the ADT helper; None without a visit number.  A conditional
    create, like the Patient: the ADT feed owns the Encounter."""
    if msg.first("PV1") is None or not ctx.patient_ref:
        return None
    try:
        from transforms import adt
    except ImportError:  # pragma: no cover
        return None
    key = ctx.key_of(ctx.patient_ref) or ""
    ref: str | None = adt.encounter(msg, ctx, msg.trigger, ctx.patient_ref, key, create_only=True)
    return ref


def minimal_patient(pid: Segment, ctx: ConvertContext) -> str:
    """A Patient from PID-3/5/7/8/11/13 keyed by the first PID-3 identifier with a usable system.

    No PID-3 → AE 101; identifiers but none with a usable authority and no channel default → AE 204.
    """
    idents: list[JSON] = []
    for i, rep in enumerate(pid.reps(3), start=1):
        loc = Location("PID", pid.sequence, 3, i, 4)
        if (ident := cx(rep, ctx, loc)) is not None:
            idents.append(ident)
    if not idents:
        ctx.count("patient_match_failed")
        raise ConversionError(
            "PID-3 has no patient identifier: send the patient's identifier in PID-3",
            code="101",
            location=pid.loc(3),
        )
    key = next((i for i in idents if i.get("system")), None)
    if key is None:
        default = ctx.settings.default_identifier_system
        if default is None:
            ctx.count("patient_match_failed")
            raise ConversionError(
                "PID-3 identifiers have no assigning authority the channel can map to a system: "
                "send CX-4 or configure identifier_systems / default_identifier_system",
                code="204",
                location=Location("PID", pid.sequence, 3, 1, 4),
            )
        key = idents[0]
        key["system"] = default
        ctx.count("patient_default_system")
    res: JSON = {"identifier": idents, "active": True}
    if names := xpns(pid, 5, ctx.settings):
        res["name"] = names
    sex = pid.get(8).strip().upper()
    gender = {"F": "female", "M": "male", "O": "other", "U": "unknown", "A": "other", "N": "other"}.get(sex)
    if gender:
        res["gender"] = gender
    if bd := dtm_at(pid.get(7), ctx.settings, pid, 7, kind="date"):
        res["birthDate"] = bd
    addrs = [a for r in pid.reps(11) if (a := xad(r, ctx.settings)) is not None]
    if addrs:
        res["address"] = addrs
    return ctx.add("Patient", res, identifier=(key["system"], key["value"]), create_only=True)


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------
def _ref(ref: str) -> JSON:
    return {"reference": ref}


def _rank_key(ctx: ConvertContext, ref: str) -> str:
    return ctx.key_of(ref) or ref


def ndl_practitioner(rep: Rep, ctx: ConvertContext, loc: Location) -> JSON | None:
    """NDL (OBR-32/33/34/35: CNN in component 1) → Practitioner reference via the XCN helper."""
    subs = rep.subs(1)
    if not any(s.strip() for s in subs):
        return None
    d = ctx.message.delimiters

    def sub(i: int) -> str:
        return escape(subs[i - 1], d) if i <= len(subs) else ""

    hd = d.subcomponent.join(sub(i) for i in (9, 10, 11)).rstrip(d.subcomponent)
    parts = [sub(1), sub(2), sub(3), sub(4), sub(5), sub(6), sub(7), sub(8), hd]
    raw = d.component.join(parts).rstrip(d.component)
    return xcn(Rep(raw, d), ctx, loc)


def xon_organization(
    seg: Segment, name_field: int, addr_field: int | None, ctx: ConvertContext
) -> JSON | None:
    """XON (name^^id^^^authority^^^^org-identifier) → Organization reference."""
    rep = seg.rep(name_field)
    if not rep:
        return None
    name = rep.c(1).strip()
    ident_value = rep.c(10).strip() or rep.c(3).strip()
    org: JSON = {"active": True}
    if name:
        org["name"] = name
    if addr_field is not None and (a := xad(seg.rep(addr_field), ctx.settings)) is not None:
        org["address"] = [a]
    if ident_value:
        system, _how = hd_system(ctx, rep.c(6, 1), rep.c(6, 2), rep.c(6, 3))
        if system:
            org["identifier"] = [{"system": system, "value": ident_value}]
            ref = ctx.add("Organization", org, identifier=(system, ident_value))
            return {"reference": ref, **({"display": name} if name else {})}
    if not name and not ident_value:
        return None
    facility = ctx.message.msh.get(4, 1).strip() or ctx.message.msh.get(3, 1).strip()
    ref = ctx.add("Organization", org, key=f"{facility}|{name}|{ident_value}")
    return {"reference": ref, **({"display": name} if name else {})}


def annotation(ntes: list[Segment], ctx: ConvertContext) -> JSON | None:
    """Consecutive NTE segments → one Annotation (NTE-3 lines joined with line breaks)."""
    lines: list[str] = []
    author: JSON | None = None
    when: str | None = None
    for nte in ntes:
        if nte.name != "NTE":  # an OBX's PRT rides in its notes list
            continue
        reps = nte.reps(3)
        lines.extend(r.text for r in reps) if reps else lines.append("")
        if author is None and nte.rep(5):
            author = xcn(nte.rep(5), ctx, nte.loc(5))
        if when is None and nte.get(6).strip():
            when = dtm_at(nte.get(6), ctx.settings, nte, 6)
    while lines and not lines[-1].strip():
        lines.pop()
    while lines and not lines[0].strip():
        lines.pop(0)
    text = "\n".join(line.rstrip() for line in lines)
    if not text.strip():
        return None
    note: JSON = {"text": clean_text(ctx, text)}
    if author is not None:
        if "reference" in author:
            note["authorReference"] = author
        elif "display" in author:
            note["authorString"] = author["display"]
    if when:
        note["time"] = when
    return note


# ---------------------------------------------------------------------------
# OBX values
# ---------------------------------------------------------------------------
def _text_value(reps: list[Rep]) -> str | None:
    text = "\n".join(r.text.rstrip() for r in reps)
    text = text.rstrip()
    return text if text.strip() else None


def _plain_decimal(text: str) -> bool:
    """Is ``text`` ASCII digits with at most one decimal point and at least one digit (``12``, ``4.5``, ``5.``,
    ``.5``)?  Exactly what ``[+-]?(\\d+(\\.\\d*)?|\\.\\d+)`` matches without a sign (``\\d`` takes other
    scripts' digits too: those go through the regex)."""
    return text.isascii() and (text.isdigit() or (text.count(".") == 1 and text.replace(".", "").isdigit()))


_NUMERIC_PREFIX: Final = re.compile(r"^\s*(<=|>=|<|>|=)?\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*$")


def _numeric(value: str, units: Rep, loc: Location, u: JSON | None = None) -> tuple[str, Any] | None:
    """NM text → valueQuantity (with a comparator for ``<5`` style values sent in an NM), the value with
    the digits as sent (:func:`transforms.datatypes.exact_number`).  ``u``: the already computed
    ``unit(units)`` (its items are copied).  ``None`` when it is not a number: the caller keeps the text.
    A number out of range (``number_out_of_range``) → AE 102 at ``loc``."""
    comp: str | None
    if _plain_decimal(value):  # the usual value: what the regex would find, without its calls
        comp, num = None, value
    else:
        m = _NUMERIC_PREFIX.match(value)
        if m is None:
            return None
        comp, num = m.group(1), m.group(2)
    number = exact_number(num)
    if number is None:
        raise ConversionError(
            f"{loc} is a number out of range ({NUMBER_RANGE}); send a measurement",
            code="102",
            location=loc,
        )
    q: JSON = {"value": number}
    if comp and comp != "=":
        q["comparator"] = comp
    q.update(unit(units) if u is None else u)
    return ("valueQuantity", q)


def _tm(value: str) -> str | None:
    m = re.match(r"^(\d{2})(\d{2})?(\d{2})?(?:\.\d+)?(?:[+-]\d{4})?$", value.strip())
    if m is None:
        return None
    h, mi, s = int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)
    if h > 23 or mi > 59 or s > 59:
        return None
    return f"{h:02d}:{mi:02d}:{s:02d}"


def _date_value(rep: Rep, loc: Location, ctx: ConvertContext) -> tuple[str, Any] | None:
    """A DT/DTM/TS OBX-5 → valueDateTime.  One that is not a valid HL7 date/time (``20230229``, a ``99999999``
    placeholder, fractions without the dot) is, under ``strictness: lenient``, kept as sent in valueString with
    the located warning ``obx_date_kept_as_text`` (as an NM that is not a number: a reader sees the text rather
    than lose the result; the value is never dropped); ``strict`` rejects it (AE 102 at OBX-5)."""
    try:
        v = dtm(rep.c(1), ctx.settings, loc)
    except ConversionError as exc:
        if exc.hl7_error != "102" or ctx.settings.strictness != "lenient":
            raise
        ctx.warn(
            "obx_date_kept_as_text",
            loc,
            f"{exc.reason}; the value was kept as text (valueString) (channel strictness: lenient)",
        )
        return ("valueString", rep.c(1).strip())
    return ("valueDateTime", v) if v else None


def value_of(vtype: str, rep: Rep, units: Rep, obx: Segment, ctx: ConvertContext) -> tuple[str, Any] | None:
    """One OBX-5 repetition → ``(value[x] element name, value)``; None when empty."""
    loc = obx.loc(5)
    if not rep:
        return None
    if vtype in _TEXT_TYPES:
        text = _text_value([rep])
        return ("valueString", text) if text else None
    if vtype == "NM":
        d = ctx.message.delimiters
        if d.component in rep.raw or d.subcomponent in rep.raw:
            # NM has no components: a sender's extra ones (``85^^Hexoquinasa^false``: the method, a flag) are
            # not the number; component 1 is, as HL7 parsers read a primitive
            got = _numeric(rep.c(1).strip(), units, loc, unit(units, ctx.settings))
            if got is not None:
                ctx.warn(
                    "value_components_dropped",
                    loc,
                    "OBX-5 is NM but has components: component 1 is the value, the others were left out",
                )
                return got
            ctx.count("obx_value_not_numeric")
            text = plain_text(rep, d)
            return ("valueString", text) if text else None
        raw = rep.text.strip()
        got = _numeric(raw, units, loc, unit(units, ctx.settings))
        if got is None:
            ctx.count("obx_value_not_numeric")
            return ("valueString", raw)
        return got
    if vtype == "SN":
        try:
            return sn(rep, units, loc, ctx.settings)
        except ConversionError:
            if number_out_of_range(rep.c(2)) or number_out_of_range(rep.c(4)):
                raise
            ctx.count("obx_value_not_numeric")
            return ("valueString", rep.text.replace(ctx.message.delimiters.component, " ").strip())
    if vtype in _CODED_TYPES:
        if vtype in ("IS", "ID"):
            code = rep.c(1).strip()
            return ("valueCodeableConcept", {"coding": [{"code": code}], "text": code}) if code else None
        cc = cwe(rep, ctx, loc, field="OBX-5")
        return ("valueCodeableConcept", cc) if cc else None
    if vtype in _DATE_TYPES:
        return _date_value(rep, loc, ctx)
    if vtype == "TM":
        v = _tm(rep.c(1))
        if v is None:
            if ctx.settings.strictness != "lenient":
                raise ConversionError("OBX-5 is not a valid HL7 time (TM)", code="102", location=loc)
            # as a DT/DTM/TS result that is no date (_date_value): kept as sent, with the same warning
            ctx.warn(
                "obx_date_kept_as_text",
                loc,
                "not a valid HL7 time (TM); the value was kept as text (valueString) (channel strictness: lenient)",
            )
            text = rep.c(1).strip()
            return ("valueString", text) if text else None
        return ("valueTime", v)
    if vtype == "NR":
        low, high = rep.c(1).strip(), rep.c(2).strip()
        rng: JSON = {}
        try:
            if low:
                rng["low"] = {"value": nm(low, loc), **unit(units, ctx.settings)}
            if high:
                rng["high"] = {"value": nm(high, loc), **unit(units, ctx.settings)}
        except ConversionError:
            if number_out_of_range(low) or number_out_of_range(high):
                raise
            ctx.count("obx_value_not_numeric")
            return ("valueString", rep.text)
        return ("valueRange", rng) if rng else None
    if vtype == "DR":
        p: JSON = {}
        if s := dtm(rep.c(1), ctx.settings, loc):
            p["start"] = s
        if e := dtm(rep.c(2), ctx.settings, loc):
            p["end"] = e
        return ("valuePeriod", p) if p else None
    if vtype == "VR":
        text = "-".join(x for x in (rep.c(1).strip(), rep.c(2).strip()) if x)
        return ("valueString", text) if text else None
    # unknown / empty OBX-2, CP, RP, EI, ...: keep the text
    text = plain_text(rep, ctx.message.delimiters)
    if vtype and vtype not in ("RP", "CP", "EI", "XCN", "XPN", "XAD", "XTN", "PN", "CX", "MO"):
        ctx.count("obx_value_type_unknown")
    return ("valueString", text) if text else None


_CONTENT_TYPES: Final = {
    "PDF": "application/pdf",
    "JPEG": "image/jpeg",
    "JPG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "TIFF": "image/tiff",
    "TIF": "image/tiff",
    "BMP": "image/bmp",
    "RTF": "application/rtf",
    "HTML": "text/html",
    "XML": "application/xml",
    "PLAIN": "text/plain",
    "ASCII": "text/plain",
    "OCTET-STREAM": "application/octet-stream",
    "MSWORD": "application/msword",
    "DICOM": "application/dicom",
    "PS": "application/postscript",
    "POSTSCRIPT": "application/postscript",
    "WAV": "audio/wav",
    "MPEG": "video/mpeg",
    "SGML": "text/sgml",
    "X-HL7-CDA-LEVEL-ONE": "application/x-hl7-cda-level-one+xml",
}
_MEDIA_TYPES: Final = {
    "IM": "image",
    "SI": "image",
    "AP": "application",
    "AU": "audio",
    "TEXT": "text",
    "TX": "text",
    "NS": "application",
    "SD": "application",
    "MULTIPART": "multipart",
}
_TOKEN: Final = re.compile(r"^[A-Za-z0-9!#$&^_.+-]+$")


def content_type(type_of_data: str, subtype: str) -> str:
    """ED-2/ED-3 → MIME type (``^application^pdf`` → application/pdf, ``^IM^JPEG`` → image/jpeg)."""
    t, s = type_of_data.strip(), subtype.strip()
    if "/" in s and all(_TOKEN.match(p) for p in s.split("/", 1)):
        return s.lower()
    if known := _CONTENT_TYPES.get(s.upper()):
        return known
    major = (
        t.lower()
        if t.lower() in ("application", "image", "audio", "video", "text", "multipart", "model")
        else (_MEDIA_TYPES.get(t.upper(), ""))
    )
    if major and s and _TOKEN.match(s):
        return f"{major}/{s.lower()}"
    if major == "text":
        return "text/plain"
    return "application/octet-stream"


def attachment(rep: Rep, obx: Segment, ctx: ConvertContext) -> JSON | None:
    """ED (source^type^subtype^encoding^data) → Attachment with base64 ``data``.  Bad data → AE 102
    (:func:`result_attachment` decides what a result does with it); unknown encoding → AE 103."""
    data = rep.c(5)
    if not data.strip():
        return None
    return _described(
        {"contentType": content_type(rep.c(2), rep.c(3)), "data": _ed_data(rep, obx, ctx, data)}, obx, ctx
    )


def result_attachment(rep: Rep, obx: Segment, ctx: ConvertContext) -> JSON | None:
    """:func:`attachment` of a result (the report's ``presentedForm``, an Observation's valueAttachment).

    Under ``strictness: lenient`` an ED whose data is not valid in its encoding (truncated or corrupt base64,
    bad hex: AE 102 at OBX-5.5) keeps the attachment without its data (contentType, title, creation: valid
    FHIR, an Attachment need not carry data) with a located ``attachment_data_dropped`` warning, so the rest of
    the report is not lost with it; so does an encoding OBX-5.4 names that Sluice does not know (the data cannot
    be read).  Under ``strict``: AE 102 (bad data) or AE 103 (unknown encoding), as before."""
    try:
        return attachment(rep, obx, ctx)
    except ConversionError as exc:
        bad_data = exc.hl7_error == "102" and exc.location == obx.loc(5, 5)
        bad_encoding = exc.hl7_error == "103" and exc.location == obx.loc(5, 4)
        if ctx.settings.strictness != "lenient" or not (bad_data or bad_encoding):
            raise
        # "is not valid base64 data", "names an unknown ED encoding (...)": the location says where
        why = exc.message.removeprefix("OBX-5.5 ").removeprefix("OBX-5.4 ")
        ctx.warn(
            "attachment_data_dropped",
            exc.location,
            f"{why}; the attachment was kept without its data, with its type and title (channel strictness: "
            "lenient); send the data in the encoding OBX-5.4 names",
        )
    return _described({"contentType": content_type(rep.c(2), rep.c(3))}, obx, ctx)


def _described(att: JSON, obx: Segment, ctx: ConvertContext) -> JSON:
    """An ED attachment's title (OBX-3 text) and creation (OBX-14)."""
    title = obx.get(3, 2).strip() or obx.get(3, 1).strip()
    if title:
        att["title"] = title
    if created := dtm_at(obx.get(14), ctx.settings, obx, 14):
        att["creation"] = created
    return att


def _ed_data(rep: Rep, obx: Segment, ctx: ConvertContext, data: str) -> str:
    """ED-5 ``data`` in the encoding ED-4 names, as FHIR base64 (padded).  Bad data → AE 102 at OBX-5.5."""
    encoding = rep.c(4).strip().upper()
    loc = obx.loc(5, 5)
    if encoding in ("BASE64", "B64", ""):
        compact = re.sub(r"\s+", "", data)
        if len(compact) % 4 in (2, 3) and not compact.endswith("="):
            # base64 without its padding (encoders that strip the '=', RFC 4648 3.2): the length says what
            # is missing, the bytes are the same; FHIR's base64Binary gets the padded form below
            compact += "=" * (-len(compact) % 4)
            ctx.count("base64_padding_added")
        try:
            raw = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            raise ConversionError("OBX-5.5 is not valid base64 data", code="102", location=loc) from None
        b64 = base64.b64encode(raw).decode("ascii")
    elif encoding == "HEX":
        try:
            raw = bytes.fromhex(data.strip())
        except ValueError:
            raise ConversionError("OBX-5.5 is not valid hex data", code="102", location=loc) from None
        b64 = base64.b64encode(raw).decode("ascii")
    elif encoding == "A":
        b64 = base64.b64encode(data.encode("utf-8")).decode("ascii")
    else:
        raise ConversionError(
            "OBX-5.4 names an unknown ED encoding (use Base64, Hex or A)", code="103", location=obx.loc(5, 4)
        )
    return b64


def rp_attachment(rep: Rep, obx: Segment, ctx: ConvertContext) -> JSON | None:
    """RP (pointer^application id^type of data^subtype) → Attachment (IG RP[Attachment]): RP-1 → url,
    RP-3/RP-4 → contentType (when given), OBX-3 text → title, OBX-14 → creation.  No pointer → None."""
    pointer = rep.c(1).strip()
    if not pointer:
        return None
    att: JSON = {}
    type_of_data, subtype = rep.c(3).strip(), rep.c(4).strip()
    if type_of_data or subtype:
        att["contentType"] = content_type(type_of_data, subtype)
    att["url"] = pointer_url(pointer, ctx)
    return _described(att, obx, ctx)


_DRIVE_PATH: Final = re.compile(r"^[A-Za-z]:[\\/]")
# what a URI may hold as it is (RFC 3986 unreserved, reserved and '%'); anything else is percent-encoded
_URI_CHARS: Final = "-._~:/?#[]@!$&'()*+,;=%"


def pointer_url(pointer: str, ctx: ConvertContext) -> str:
    """RP-1 pointer → ``Attachment.url`` (a FHIR url: a URI, no blanks or backslashes).  A Windows file path
    (``\\\\server\\share\\a.pdf``, ``C:\\docs\\a.pdf``, which document and imaging systems send) becomes the
    ``file:`` URL of the same file (RFC 8089: ``file://server/share/a.pdf``, ``file://localhost/C:/docs/a.pdf``),
    counted ``attachment_path_as_file_url``; in any pointer, characters a URI cannot hold (blanks, non-ASCII) are
    percent-encoded (UTF-8).  URLs and relative references are otherwise kept as sent."""
    url = pointer
    if pointer.startswith("\\\\"):
        url = "file://" + pointer[2:].replace("\\", "/")
    elif _DRIVE_PATH.match(pointer):
        url = "file://localhost/" + pointer.replace("\\", "/")
    if url != pointer:
        ctx.count("attachment_path_as_file_url")
    return urllib.parse.quote(url, safe=_URI_CHARS)


_RR_NUM: Final = r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))"
# "4.3-6.2", "4.3 - 6.2" (also an en dash), "4.3 to 6.2"
_RR_RANGE: Final = re.compile(rf"^\s*{_RR_NUM}\s*(?:[-–]|\s[tT][oO]\s)\s*{_RR_NUM}\s*$")
_RR_RANGE_UNDERSCORE: Final = re.compile(rf"^\s*{_RR_NUM}\s*_\s*{_RR_NUM}\s*$")
_RR_BELOW: Final = re.compile(rf"^\s*(<=|<)\s*{_RR_NUM}\s*$")
_RR_ABOVE: Final = re.compile(rf"^\s*(>=|>)\s*{_RR_NUM}\s*$")


def reference_range(obx: Segment, vtype: str, ctx: ConvertContext, u: JSON | None = None) -> list[JSON]:
    """OBX-7 → referenceRange: text always; low/high parsed from ``a-b``, ``<b``, ``>a`` for numeric values.
    ``u``: the already computed ``unit(obx.rep(6))``, if the caller has it."""
    text = obx.value(7).strip()
    if not text:
        return []
    rr: JSON = {}
    if vtype in ("NM", "SN", "NR", ""):
        if u is None:
            u = unit(obx.rep(6), ctx.settings)
        if "comparator" in u:
            u = {k: v for k, v in u.items() if k != "comparator"}
        # bounds keep the digits as sent; one out of range is dropped with a located warning (the
        # text keeps it)
        low_text = high_text = ""
        low, dash, high = text.partition("-")
        if dash and _plain_decimal(low) and _plain_decimal(high):  # "60-100": what _RR_RANGE finds
            low_text, high_text = low, high
        elif m := _RR_RANGE.match(text) or _RR_RANGE_UNDERSCORE.match(text):
            low_text, high_text = m.group(1), m.group(2)
        elif m := _RR_BELOW.match(text):
            high_text = m.group(2)
        elif m := _RR_ABOVE.match(text):
            low_text = m.group(2)
        for name, bound in (("low", low_text), ("high", high_text)):
            if not bound:
                continue
            if (n := exact_number(bound)) is not None:
                rr[name] = {"value": n, **u}
            else:
                ctx.warn(
                    "reference_range_bound_dropped",
                    obx.loc(7),
                    f"a bound out of range ({NUMBER_RANGE}); referenceRange.{name} dropped "
                    "(referenceRange.text keeps the range)",
                )
    rr["text"] = text
    return [rr]


def interpretation(obx: Segment, ctx: ConvertContext) -> list[JSON]:
    out: list[JSON] = []
    for comps in obx.rep_comps(8, 2):  # (blank repetitions, which rep_comps leaves out, have no code)
        code = comps[0].strip()
        if not code:
            continue
        display = INTERPRETATION.get(code) or INTERPRETATION.get(code.upper())
        if display is not None:
            out.append(
                {
                    "coding": [
                        {
                            "system": INTERPRETATION_SYSTEM,
                            "code": code.upper() if code.upper() in INTERPRETATION else code,
                            "display": display,
                        }
                    ]
                }
            )
        else:
            ctx.count("code_table_miss")
            cc: JSON = {"coding": [{"system": V2_TABLE + "0078", "code": code}]}
            if t := comps[1].strip():
                cc["text"] = t
            out.append(cc)
    return out


# ---------------------------------------------------------------------------
# Groups
# ---------------------------------------------------------------------------
class _Order:
    """One ORDER_OBSERVATION group: its OBR, optional ORC, the OBX groups, the NTEs and the SPMs."""

    __slots__ = ("notes", "obr", "obr_specimen", "observations", "orc", "specimens", "tq1")

    def __init__(self, obr: Segment | None, orc: Segment | None, tq1: Segment | None = None):
        self.obr = obr
        self.orc = orc
        self.tq1 = tq1  # the order's first TQ1 (ORU: after the OBR; MDM: between ORC and OBR)
        self.notes: list[Segment] = []
        self.observations: list[tuple[Segment, list[Segment]]] = []
        self.specimens: list[Segment] = []
        self.obr_specimen = (
            True  # the IG's OBR[Specimen] beside the SPMs (OUL_R22: its specimen group's SPM only)
        )


def _groups(msg: Message) -> tuple[Segment | None, list[_Order], list[tuple[Segment, list[Segment]]]]:
    """Walk the segments: (first PID, order groups, patient-level OBX groups)."""
    pid: Segment | None = None
    orders: list[_Order] = []
    patient_obs: list[tuple[Segment, list[Segment]]] = []
    pending_orc: Segment | None = None
    pending_tq1: Segment | None = None
    obx_notes: list[Segment] | None = None  # the NTE/PRT list of the OBX the last segments follow
    current: _Order | None = None
    last_notes: list[Segment] | None = None
    for seg in msg.segments:
        name = seg.name
        if name == "PID":
            if pid is None:
                pid = seg
            last_notes = None
        elif name == "ORC":
            pending_orc = seg
            last_notes = None
        elif name == "OBR":
            current = _Order(seg, pending_orc, pending_tq1)
            pending_orc = pending_tq1 = None
            orders.append(current)
            last_notes = current.notes
        elif name == "OBX":
            group: tuple[Segment, list[Segment]] = (seg, [])
            if current is None:
                patient_obs.append(group)
            else:
                current.observations.append(group)
            last_notes = obx_notes = group[1]
            continue
        elif name == "NTE":
            if last_notes is not None:
                last_notes.append(seg)
            continue
        elif name == "PRT":
            # an OBX's PRT (IG OBSERVATION.PRT IF PRT-5 VALUED → Observation.performer) rides with its NTEs
            if obx_notes is not None:
                obx_notes.append(seg)
            continue
        elif name in ("SPM", "PV1", "PV2", "PD1", "NK1", "TQ1", "TQ2", "CTD", "FT1", "CTI"):
            if name == "SPM" and current is not None:
                current.specimens.append(seg)
            elif name == "TQ1":
                if pending_orc is not None or current is None:
                    pending_tq1 = pending_tq1 or seg  # before the OBR of its group (ORC, TQ1, OBR)
                elif current.tq1 is None:
                    current.tq1 = seg
            last_notes = None
        obx_notes = None
    return pid, orders, patient_obs


def _placer_filler(placer: JSON | None, filler: JSON | None) -> list[JSON]:
    """An order's placer and filler numbers as PLAC- and FILL-typed identifiers (ServiceRequest and
    DiagnosticReport carry the same two)."""
    idents: list[JSON] = []
    if placer:
        idents.append(typed(placer, "PLAC", "Placer Identifier"))
    if filler:
        idents.append(typed(filler, "FILL", "Filler Identifier"))
    return idents


def _category(section: str) -> list[JSON]:
    s = section.strip().upper()
    if s in _LAB_SECTIONS:
        return [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "laboratory", "display": "Laboratory"}]}]
    if s in _IMAGING_SECTIONS:
        return [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}]
    return []


def _obx_status_of(obx: Segment, code: str, obr_status_code: str, ctx: ConvertContext) -> str:
    """Observation.status from OBX-11 (``code``, stripped and upper-cased), else from OBR-25."""
    if code:
        status = OBX_STATUS.get(code) or table(ctx, OBX_STATUS, code, obx.loc(11), "0085") or "unknown"
    else:
        status = _DR_TO_OBS.get(OBR_STATUS.get(obr_status_code, ""), "unknown")
    # a corrected report (OBR-25 C) corrects its final results
    if obr_status_code == "C" and status in ("final", "unknown") and code in ("", "F"):
        status = "corrected"
    return status


def vtype_of(obx: Segment) -> str:
    return obx.get(2).strip().upper()


def observation(
    obx: Segment,
    notes: list[Segment],
    ctx: ConvertContext,
    *,
    key_prefix: str,
    obr: Segment | None,
    obr_status_code: str,
    seen: dict[str, int],
    enc: str | None = None,
) -> str | None:
    """OBX (+ its NTEs) → Observation; returns its reference (None for an OBX with no code).

    Hot path (one call per result): raw fields are tested before any accessor or datatype call (an empty
    raw field gives "" / an empty Rep / no repetitions)."""
    f = obx.fields
    nf = len(f)
    settings = ctx.settings
    dkey = ctx.delim_key
    piece_key = ("OBX-3", dkey, f[3] if nf > 3 else "", "")
    kept = kept_piece(ctx, piece_key)
    if kept is not None:
        code: JSON | None = kept[0]
    else:
        mark = piece_mark(ctx)
        code = cwe(obx.rep(3), ctx, obx.loc(3), field="OBX-3")
        if code is not None:
            keep_piece(ctx, piece_key, code, mark)
    if code is None:
        has_value = any(r.c(5).strip() if vtype_of(obx) == "ED" else bool(r) for r in obx.reps(5))
        if not has_value:
            ctx.count("obx_without_code_skipped")
            return None
        raise ConversionError("OBX-3 observation identifier is missing", code="101", location=obx.loc(3))
    vtype = obx.get(2).strip().upper()
    status_code = obx.get(11).strip().upper()
    status = _obx_status_of(obx, status_code, obr_status_code, ctx)
    res: JSON = {"resourceType": "Observation", "status": status}
    if status_code == "X":
        res["_status"] = {
            "extension": [
                {
                    "url": ALTERNATE_CODES,
                    "valueCodeableConcept": {"coding": [{"system": V2_TABLE + "0085", "code": "X"}]},
                }
            ]
        }
    cats = _category(obr.get(24)) if obr is not None else []
    if nf > 29 and f[29] and (otype := obx.get(29).strip().upper()):
        # IG OBX-29 observation type → category (table 0936: RSLT a result, QST an ask-at-order-entry answer)
        cats = [*cats, coded_table(otype, "0936")]
    if cats:
        res["category"] = cats
    res["code"] = code
    if ctx.patient_ref:
        res["subject"] = {"reference": ctx.patient_ref}
    if enc:
        res["encounter"] = {"reference": enc}
    own_time = obx.get(14)
    if own_time:
        eff = dtm_at(own_time, settings, obx, 14)
    elif obr is not None:
        eff = dtm_at(obr.get(7), settings, obr, 7)
    else:
        eff = None
    if eff:
        res["effectiveDateTime"] = eff
    if obr is not None and obr.get(22).strip():
        issued = dtm_at(obr.get(22), settings, obr, 22, kind="instant")
        if issued:
            res["issued"] = issued
    performers: list[JSON] = []
    if nf > 16 and f[16]:
        for i, rep in enumerate(obx.reps(16), start=1):
            if (p := xcn(rep, ctx, Location("OBX", obx.sequence, 16, i))) is not None:
                performers.append(p)
    if nf > 25 and f[25] and (md := xcn(obx.rep(25), ctx, obx.loc(25))) is not None:
        performers.append(md)
    for prt in notes:
        # IG OBSERVATION.PRT: IF PRT-5 VALUED → PractitionerRole → Observation.performer (Sluice: the Practitioner)
        if prt.name == "PRT" and prt.rep(5) and (who := xcn(prt.rep(5), ctx, prt.loc(5))) is not None:
            performers.append(who)
    org = _performing_organization(obx, ctx) if nf > 23 and f[23] else None
    if org is None and nf > 15 and f[15]:  # IG: OBX-15 producer's ID, when OBX-23 does not name the lab
        org = _producer_organization(obx, ctx)
    if org is not None:
        performers.append(org)
    if performers:
        res["performer"] = performers
    # value
    units = obx.rep(6)
    u: JSON | None = None  # unit(units), computed once for the value and the reference range
    valued = False
    data_lost = False  # lenient: an ED whose data was not valid in its encoding (result_attachment)
    if vtype == "ED":
        # only for an ED outside any OBR (inside one it goes to DiagnosticReport.presentedForm)
        reps = [r for r in obx.reps(5) if r]
        atts = [a for rep in reps if (a := result_attachment(rep, obx, ctx)) is not None]
        res.setdefault("extension", []).extend({"url": R5_OBS_ATTACHMENT, "valueAttachment": a} for a in atts)
        data_lost = bool(atts) and not any("data" in a for a in atts)
    elif vtype in _TEXT_TYPES:
        text = _text_value(obx.reps(5))
        if text:
            res["valueString"] = text
            valued = True
    elif vtype == "RP":
        # IG OBX[Observation]: RP → the R5 Observation.valueAttachment extension (R4 has no valueAttachment)
        atts = [a for r in obx.reps(5) if (a := rp_attachment(r, obx, ctx)) is not None]
        if atts:
            res.setdefault("extension", []).extend(
                {"url": R5_OBS_ATTACHMENT, "valueAttachment": a} for a in atts
            )
            valued = True
    elif nf > 5 and f[5]:
        reps = [r for r in obx.reps(5) if r]
        if len(reps) == 1:
            rep = reps[0]
            if vtype == "NM":
                # value_of's NM branch, with the units computed once
                raw = rep.text.strip()
                u = unit(units, ctx.settings)
                got = _numeric(raw, units, obx.loc(5), u)
                if got is None:  # not a number as sent: value_of's NM branch decides (components, text)
                    got = value_of(vtype, rep, units, obx, ctx)
            else:
                got = value_of(vtype, rep, units, obx, ctx)
            if got is not None:
                res[got[0]] = got[1]
                valued = True
        elif len(reps) > 1:
            comps = []
            for rep in reps:
                if (got := value_of(vtype, rep, units, obx, ctx)) is not None:
                    comps.append({"code": code, got[0]: got[1]})
            if comps:
                res["component"] = comps
                valued = True
    if valued and nf > 6 and f[6] and vtype in _UNITS_IN_TEXT:
        _units_in_text(res, u if u is not None else unit(units, ctx.settings), ctx)
    if not valued:
        absent = {"X": "not-performed", "N": "not-asked"}.get(status_code) or ("error" if data_lost else None)
        if absent:
            res["dataAbsentReason"] = {"coding": [{"system": DATA_ABSENT, "code": absent}]}
    if nf > 8 and f[8]:
        interp_key = ("OBX-8", dkey, f[8], "")
        kept = kept_piece(ctx, interp_key)
        if kept is not None:
            interp: list[JSON] = kept[0]
        else:
            mark = piece_mark(ctx)
            interp = interpretation(obx, ctx)
            keep_piece(ctx, interp_key, interp, mark)
        if interp:
            res["interpretation"] = interp
    if notes and (note := annotation(notes, ctx)) is not None:
        res["note"] = [note]
    if nf > 17 and f[17] and obx.rep(17) and (method := cwe(obx.rep(17), ctx, obx.loc(17))):
        res["method"] = method
    if nf > 20 and f[20] and obx.rep(20) and (site := cwe(obx.rep(20), ctx, obx.loc(20))):
        res["bodySite"] = site
    if nf > 7 and f[7]:
        # a function of OBX-7, the value type (numeric bounds or text only) and the units (OBX-6)
        rr_key = ("OBX-7", dkey, f[7], vtype + "|" + (f[6] if nf > 6 else ""))
        kept = kept_piece(ctx, rr_key)
        if kept is not None:
            rr: list[JSON] = kept[0]
        else:
            mark = piece_mark(ctx)
            rr = reference_range(obx, vtype, ctx, u)
            keep_piece(ctx, rr_key, rr, mark)
        if rr:
            res["referenceRange"] = rr
    if nf > 19 and f[19] and obx.get(19).strip() and (analysed := dtm_at(obx.get(19), settings, obx, 19)):
        res.setdefault("extension", []).append({"url": ANALYSIS_DATE_TIME, "valueDateTime": analysed})
    if nf > 21 and f[21] and (inst := ei(obx.rep(21), ctx, obx.loc(21))) is not None:
        res["identifier"] = [typed(inst, "FILL", "Filler Identifier")]
    # identity: filler order + OBX-3 code + OBX-4 sub-id (a repeat of the same pair in one group is numbered)
    first = (code.get("coding") or [{}])[0]
    code_key = f"{first.get('system', '')}|{first.get('code', '')}" if first else f"|{code.get('text', '')}"
    base = f"{key_prefix}|{code_key}|{obx.get(4).strip()}"
    n = seen.get(base, 0) + 1
    seen[base] = n
    if n > 1:
        ctx.count("obx_duplicate_key")
        base += f"#{n}"
    ref = ctx.add("Observation", res, key=base)
    ctx.guard(ctx.key_of(ref) or ref, OBSERVATION_STATUS_RANK.get(status, 0))
    return ref


def _performing_organization(obx: Segment, ctx: ConvertContext) -> JSON | None:
    """OBX-23/24 → :func:`xon_organization`, once per message for the same raw text (every result of a lab
    names the same performing organization; the same text maps to the same entry and the same reference)."""
    f = obx.fields
    key = ("OBX-23", f[23], f[24] if len(f) > 24 else "")
    memo = ctx.memo
    hit = memo.get(key)
    if hit is None:
        hit = memo[key] = (xon_organization(obx, 23, 24, ctx),)
    return dict(hit[0]) if hit[0] is not None else None


# OBX-15's coding system CLIA: the CLIA number's OID (v2.5.1 ELR guides name the lab this way)
_PRODUCER_SYSTEMS: Final = {"CLIA": "urn:oid:2.16.840.1.113883.4.7"}


def _producer_organization(obx: Segment, ctx: ConvertContext) -> JSON | None:
    """OBX-15 producer's ID (CWE id^name^system: labs before v2.5.1 name themselves here, ``01D0301471^LAB^CLIA``)
    → the performing Organization (IG OBX[Observation]: performer, CWE[Organization]: the id an identifier, the
    text its name), when OBX-23 does not name it; once per message for the same text, as OBX-23."""
    f = obx.fields
    key = ("OBX-15", f[15])
    memo = ctx.memo
    hit = memo.get(key)
    if hit is None:
        rep = obx.rep(15)
        ident, name, sysname = rep.c(1).strip(), rep.c(2).strip(), rep.c(3).strip()
        ref: JSON | None = None
        if ident or name:
            org: JSON = {"active": True}
            if name:
                org["name"] = name
            system = _PRODUCER_SYSTEMS.get(sysname.upper()) or (
                hd_system(ctx, sysname, "", "")[0] if sysname else None
            )
            if ident and system:
                org["identifier"] = [{"system": system, "value": ident}]
                added = ctx.add("Organization", org, identifier=(system, ident))
            else:
                if ident:
                    org["identifier"] = [{"value": ident}]
                facility = ctx.message.msh.get(4, 1).strip() or ctx.message.msh.get(3, 1).strip()
                added = ctx.add("Organization", org, key=f"{facility}|producer|{sysname}|{ident}|{name}")
            ref = {"reference": added, **({"display": name} if name else {})}
        hit = memo[key] = (ref,)
    return dict(hit[0]) if hit[0] is not None else None


def _report_status(obr: Segment, observations: list[JSON], ctx: ConvertContext) -> str:
    code = obr.get(25).strip().upper()
    if code in ("Y", "Z"):
        raise ConversionError(
            "OBR-25 says there is no order or no patient on record for this result (Y/Z): nothing to file",
            code="103",
            location=obr.loc(25),
        )
    if code:
        status = table(ctx, OBR_STATUS, code, obr.loc(25), "0123")
        if status:
            return status
    statuses = [o.get("status", "unknown") for o in observations]
    if not statuses:
        return "registered"
    if "corrected" in statuses:
        return "corrected"
    if all(s in ("final", "amended", "corrected", "cancelled", "entered-in-error") for s in statuses):
        return "final"
    if any(s in ("preliminary", "final", "amended") for s in statuses):
        return "preliminary"
    if all(s == "registered" for s in statuses):
        return "registered"
    return "unknown"


# ORC-5 order status (table 0038, IG OrderStatus) and ORC-1 order control (table 0119, IG
# OrderControlCode[ServiceRequest.status]) → ServiceRequest.status
ORDER_STATUS: Final[dict[str, str]] = {
    "CA": "revoked",
    "CM": "completed",
    "DC": "revoked",
    "ER": "entered-in-error",
    "HD": "on-hold",
    "IP": "active",
    "RP": "revoked",
    "SC": "active",
}
ORDER_CONTROL_STATUS: Final[dict[str, str]] = {
    "AF": "active",
    "CA": "active",
    "CR": "revoked",
    "DC": "revoked",
    "DF": "revoked",
    "DR": "revoked",
    "FU": "completed",
    "HD": "active",
    "HR": "on-hold",
    "NW": "active",
    "OC": "revoked",
    "OD": "revoked",
    "OH": "on-hold",
    "OK": "active",
    "PR": "active",
    "PY": "active",
    "RL": "active",
    "RO": "active",
    "RQ": "active",
}


def service_request(
    order: _Order,
    placer: JSON | None,
    filler: JSON | None,
    code: JSON,
    ctx: ConvertContext,
    enc: str | None,
    *,
    requisition: tuple[JSON, str] | None = None,
    used: set[str] | None = None,
) -> str | None:
    """ORC/OBR → ServiceRequest (IG ORU_R01: the order the results are ``basedOn``), keyed by the placer
    order number (OBR-2, else ORC-2; else the filler number); a second order detail under a number an earlier
    OBR of the message used (``used``) by number + code, as ORM keys it.  Written as a conditional *create*:
    the ordering system owns the order, a result message only makes sure it exists."""
    obr, orc = order.obr, order.orc
    assert obr is not None
    key_ident = placer or filler
    if key_ident is None and requisition is None:
        return None
    res: JSON = {}
    idents = _placer_filler(placer, filler)
    # OBR-53 alternate placer order number (else ORC-33) → a PLAC-typed identifier
    alt_seg, alt_f = (obr, 53) if obr.get(53).strip() else (orc, 33) if orc is not None else (None, 0)
    alt = cx(alt_seg.rep(alt_f), ctx, alt_seg.loc(alt_f)) if alt_seg is not None else None
    if alt is not None and not any(
        alt["value"] == i["value"] and alt.get("system") == i.get("system") for i in idents
    ):
        idents.append(typed(alt, "PLAC", "Placer Identifier"))
    res["identifier"] = idents
    # status: ORC-5 (IG OrderStatus), IF ORC-5 NOT VALUED ORC-1 (IG OrderControlCode[ServiceRequest.status])
    status = "unknown"
    control = orc.get(1).strip().upper() if orc is not None else ""
    if orc is not None:
        status = (
            ORDER_STATUS.get(orc.get(5).strip().upper()) or ORDER_CONTROL_STATUS.get(control) or "unknown"
        )
    res["status"] = status
    # intent: IG OBR-11 "G" → reflex-order; anything else "order" (the IG's "#add-on#" for "A" is no code)
    res["intent"] = "reflex-order" if obr.get(11).strip().upper() == "G" else "order"
    if "coding" in code or "text" in code:  # not the data-absent code of an OBR without OBR-4 (0..1 here)
        res["code"] = code
    if ctx.patient_ref:
        res["subject"] = _ref(ctx.patient_ref)
    if enc:
        res["encounter"] = _ref(enc)
    if orc is not None and (req := group_numbers(orc.rep(4), ctx, orc.loc(4))):
        res["requisition"] = typed(req[0], "PGN", "Placer Group Number")
    if details := [c for f in (46, 47) for r in obr.reps(f) if (c := cwe(r, ctx, obr.loc(f))) is not None]:
        res["orderDetail"] = details
    # priority and occurrence: TQ1 (IG TQ1[ServiceRequest]), else ORC-7 / OBR-27 (TQ), OBR-5, OBR-6
    occurrence(res, order.tq1, orc, obr, ctx)
    if reasons := [c for r in obr.reps(31) if (c := cwe(r, ctx, obr.loc(31), field="OBR-31")) is not None]:
        res["reasonCode"] = reasons
    if orc is not None and orc.rep(29) and (otype := order_type(orc.rep(29), ctx, orc.loc(29))):
        res["locationCode"] = [otype]
    if obr.rep(29):
        # IG OBR[ServiceRequest]: OBR-29 parent → basedOn the parent order (made sure to exist, as ORM does)
        from transforms import orm

        if (parent := orm.parent_order(obr, ctx)) is not None:
            res["basedOn"] = [_ref(parent)]
    requester = None
    if orc is not None and orc.rep(12):
        requester = xcn(orc.rep(12), ctx, orc.loc(12))
    if requester is None and obr.rep(16):
        requester = xcn(obr.rep(16), ctx, obr.loc(16))
    if requester is not None:
        res["requester"] = requester
    # IG ORC-9 → authoredOn only IF ORC-1 IS "NW" (in a result message ORC-9 is the transaction time)
    if (
        control == "NW"
        and (when := orc.get(9).strip() if orc is not None else "")
        and (authored := dtm(when, ctx.settings, orc.loc(9) if orc is not None else None))
    ):
        res["authoredOn"] = authored
    if key_ident is None:
        assert requisition is not None  # keyed by requisition + code, as the order message keys it
        return ctx.add("ServiceRequest", res, key=requisition[1], create_only=True)
    system = key_ident.get("system")
    facility = ctx.message.msh.get(4, 1).strip() or ctx.message.msh.get(3, 1).strip()
    if used is not None:
        order_key = f"{system or 'facility:' + facility}|{key_ident['value']}"
        if "order|" + order_key in used:
            first = ((res.get("code") or {}).get("coding") or [{}])[0]
            code_key = f"{first.get('system', '')}|{first.get('code', '')}"
            return ctx.add("ServiceRequest", res, key=f"{order_key}|{code_key}", create_only=True)
        used.add("order|" + order_key)
    if system:
        return ctx.add("ServiceRequest", res, identifier=(system, key_ident["value"]), create_only=True)
    return ctx.add("ServiceRequest", res, key=f"{facility}|order|{key_ident['value']}", create_only=True)


# IG OBR[DiagnosticReport]: OBR-34 technician / OBR-35 transcriptionist → performer with the
# event-performerFunction extension (v3-ParticipationType SPRF / TRANS)
_PERFORMER_FUNCTION: Final = "http://hl7.org/fhir/StructureDefinition/event-performerFunction"
_V3_PARTICIPATION: Final = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
_TECHNICIAN: Final[JSON] = {
    "url": _PERFORMER_FUNCTION,
    "valueCodeableConcept": {
        "coding": [{"system": _V3_PARTICIPATION, "code": "SPRF", "display": "secondary performer"}]
    },
}
_TRANSCRIPTIONIST: Final[JSON] = {
    "url": _PERFORMER_FUNCTION,
    "valueCodeableConcept": {
        "coding": [{"system": _V3_PARTICIPATION, "code": "TRANS", "display": "Transcriber"}]
    },
}


def report(order: _Order, ctx: ConvertContext, enc: str | None = None, used: set[str] | None = None) -> str:
    """One ORDER_OBSERVATION group → DiagnosticReport + Observations; returns the report's reference.

    ``used`` (ORU): the report and order keys earlier OBRs of the message took; an OBR whose order number one
    of them already used is keyed by number + OBR-4 code (``report_duplicate_number``), as ORM keys a second
    order detail, instead of being merged into the first report."""
    obr = order.obr
    assert obr is not None
    placer, filler = order_numbers(order.orc, order.obr, ctx)
    key_ident = filler or placer
    by_requisition = None
    key_system = None
    if key_ident is not None:
        facility = ctx.message.msh.get(4, 1).strip() or ctx.message.msh.get(3, 1).strip()
        key_system = key_ident.get("system")
        key_prefix = f"{key_system or 'facility:' + facility}|{key_ident['value']}"
        if used is not None:
            if "report|" + key_prefix in used:
                service = obr.rep(4)
                # one warning per shared number (a newborn screen sends 18 panels under one), each one counted
                if "warned|" + key_prefix in used:
                    ctx.count("report_duplicate_number")
                else:
                    used.add("warned|" + key_prefix)
                    ctx.warn(
                        "report_duplicate_number",
                        obr.loc(3 if filler is not None else 2),
                        "another OBR of this message has the same order number: this report, its observations and "
                        "those of every later OBR with this number are keyed by order number + OBR-4 code instead "
                        "of being merged into the first one",
                    )
                # the whole OBR-4 CWE: its code may be the alternate one (``^^^SUSC^Panel^L``)
                key_prefix = f"{key_prefix}|OBR-4:{service.raw.strip()}"
                key_system = None  # written by its Sluice key, not the shared number
            else:
                used.add("report|" + key_prefix)
    else:
        # last resort (lenient): the requisition ORC-4 + the order's code (docs/mapping.md)
        by_requisition = requisition_key(order.orc, obr, ctx)
        if by_requisition is None and (message_key := _message_report_key(obr, ctx)) is not None:
            key_prefix = message_key
        elif by_requisition is None:
            raise ConversionError(
                "OBR has neither a filler (OBR-3) nor a placer (OBR-2) order number"
                + (" nor a placer group number (ORC-4)" if ctx.settings.strictness == "lenient" else "")
                + ": the report cannot be identified; send OBR-3",
                code="101",
                location=obr.loc(3),
            )
        else:
            key_prefix = by_requisition[1]
    obr_status_code = obr.get(25).strip().upper()
    seen: dict[str, int] = {}
    results: list[str] = []
    forms: list[JSON] = []
    narrative: list[str] = []  # TX/FT/ST OBX without OBX-3: the report's text, not observations
    for obx, notes in order.observations:
        vtype = obx.get(2).strip().upper()
        if vtype in _TEXT_TYPES and not obx.rep(3):
            if (text := _text_value(obx.reps(5))) is not None:
                if not narrative:
                    ctx.warn(
                        "obx_text_without_code_to_conclusion",
                        obx.loc(3),
                        "OBX-3 is empty on a text OBX: its text goes to DiagnosticReport.conclusion",
                    )
                narrative.append(text)
            if notes:
                order.notes.extend(notes)
            continue
        if vtype == "ED":
            for rep in obx.reps(5):
                if (att := result_attachment(rep, obx, ctx)) is not None:
                    forms.append(att)
            if notes:
                ctx.count("ed_note_on_report")
                order.notes.extend(notes)
            continue
        ref = observation(
            obx,
            notes,
            ctx,
            key_prefix=key_prefix,
            obr=obr,
            obr_status_code=obr_status_code,
            seen=seen,
            enc=enc,
        )
        if ref is not None:
            results.append(ref)
    obs_resources = [r for ref in results if (r := ctx.find(ref)) is not None]
    status = _report_status(obr, obs_resources, ctx)
    res: JSON = {}
    idents = _placer_filler(placer, filler)
    if order.orc is not None:
        # IG ORC[DiagnosticReport]: ORC-4 placer group number → identifier[3]/[4]
        for grp in group_numbers(order.orc.rep(4), ctx, order.orc.loc(4)):
            idents.append(typed(grp, "PGN", "Placer Group Number"))
    res["identifier"] = idents
    res["status"] = status
    section = obr.get(24).strip()
    if section:
        res["category"] = [coded_table(section, "0074")]
    code = cwe(obr.rep(4), ctx, obr.loc(4), field="OBR-4")
    if code is None:
        code = _absent_report_code(obr, ctx)
    res["code"] = code
    if (
        order_ref := service_request(
            order, placer, filler, dict(code), ctx, enc, requisition=by_requisition, used=used
        )
    ) is not None:
        res["basedOn"] = [_ref(order_ref)]
    if ctx.patient_ref:
        res["subject"] = _ref(ctx.patient_ref)
    if enc:
        res["encounter"] = _ref(enc)
    start = dtm_at(obr.get(7), ctx.settings, obr, 7)
    end = dtm_at(obr.get(8), ctx.settings, obr, 8)
    if start and end and ends_before_start(start, end):
        # FHIR per-1: a period cannot end before it starts; the collection's start (OBR-7) is kept
        ctx.warn(
            "report_end_before_start",
            obr.loc(8),
            "the observation end (OBR-8) is before its start (OBR-7): effectiveDateTime is OBR-7, OBR-8 dropped",
        )
        res["effectiveDateTime"] = start
    elif start and end:
        res["effectivePeriod"] = {"start": start, "end": end}
    elif start or end:
        res["effectiveDateTime"] = start or end
    if obr.get(22).strip() and (issued := dtm_at(obr.get(22), ctx.settings, obr, 22, kind="instant")):
        res["issued"] = issued
    performers: list[JSON] = []
    for f, function in ((34, _TECHNICIAN), (35, _TRANSCRIPTIONIST)):
        for i, rep in enumerate(obr.reps(f), start=1):
            if (p := ndl_practitioner(rep, ctx, Location("OBR", obr.sequence, f, i))) is not None:
                p["extension"] = [function]
                performers.append(p)
    if performers:
        res["performer"] = performers
    interpreters = [
        p
        for i, rep in enumerate(obr.reps(32), start=1)
        if (p := ndl_practitioner(rep, ctx, Location("OBR", obr.sequence, 32, i))) is not None
    ]
    if interpreters:
        res["resultsInterpreter"] = interpreters
    if results:
        res["result"] = [_ref(r) for r in results]
    if narrative and (conclusion := clean_text(ctx, "\n".join(narrative)).strip()):
        res["conclusion"] = conclusion
    if forms:
        res["presentedForm"] = forms
    if order.notes and (note := annotation(order.notes, ctx)) is not None:
        res["extension"] = [{"url": R5_DR_NOTE, "valueAnnotation": note}]
    if specimens := _specimens(order, ctx, order_ref):
        res["specimen"] = specimens
        for result_ref in results:
            obs = ctx.find(result_ref)
            if obs is not None:
                obs.setdefault("specimen", specimens[0])
    if key_system and key_ident is not None:
        ref = ctx.add("DiagnosticReport", res, identifier=(key_system, key_ident["value"]))
    else:
        ref = ctx.add("DiagnosticReport", res, key=key_prefix)
    if results and (first := ctx.find(ref)) is not None and first is not res:
        # merged into an earlier OBR's report (same key): its results join that report's, not left in none
        listed = first.setdefault("result", [])
        listed.extend(r for r in res["result"] if r not in listed)
    ctx.guard(_rank_key(ctx, ref), DIAGNOSTIC_REPORT_STATUS_RANK.get(status, 0))
    return ref


def _absent_report_code(obr: Segment, ctx: ConvertContext) -> JSON:
    """An OBR without OBR-4 (a monitor's vital signs, an EMR's form results: the results carry the codes) under
    ``strictness: lenient``: DiagnosticReport.code (1..1) is the data-absent-reason extension ``unknown``, with
    the located warning ``report_code_missing`` at OBR-4, and the ServiceRequest gets no code.  ``strict``:
    AE 101 at OBR-4, as before."""
    if ctx.settings.strictness != "lenient":
        raise ConversionError(
            "OBR-4 universal service identifier is missing", code="101", location=obr.loc(4)
        )
    ctx.warn(
        "report_code_missing",
        obr.loc(4),
        "OBR-4 (universal service identifier) is empty: the DiagnosticReport's code is data-absent (unknown) "
        "and its results keep their own codes; ask the sender to fill OBR-4",
    )
    return {"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "unknown"}]}


def _message_report_key(obr: Segment, ctx: ConvertContext) -> str | None:
    """The last resort of a lenient channel for a report with no order number at all (OBR-2/3, ORC-2/3 and
    ORC-4 empty: an EMR's form observations, a device's unsolicited results): the sender (MSH-3, MSH-4),
    this message's control id (MSH-10) and the OBR's set id and code, with the located warning
    ``report_keyed_by_message`` at OBR-3.  A resend of the message meets the same report; a correction in
    another message cannot (docs/mapping.md).  None under ``strictness: strict`` (rejected as before)."""
    if ctx.settings.strictness != "lenient":
        return None
    msh = ctx.message.msh
    code = obr.rep(4)
    ctx.warn(
        "report_keyed_by_message",
        obr.loc(3),
        "the report has neither a filler (OBR-3) nor a placer (OBR-2, ORC-2) order number nor a placer group "
        "number (ORC-4): it is keyed by this message's control id (MSH-10), so a correction in a later "
        "message cannot update it; ask the sender for OBR-3",
    )
    return (
        f"message|{msh.get(3, 1).strip()}|{msh.get(4, 1).strip()}|{ctx.message.control_id}"
        f"|OBR-1:{obr.get(1).strip()}|OBR-4:{code.c(3).strip().upper()}|{code.c(1).strip()}"
    )


def _specimens(order: _Order, ctx: ConvertContext, order_ref: str | None) -> list[JSON]:
    """The group's SPMs → Specimens (IG SPM[Specimen], :func:`transforms.orm.specimen`), then the IG's
    OBR[Specimen] (OBR-7/8/9/10/14/15, when the OBR says something about a specimen), keyed by the order like
    the order message's, so the order and its result write the same Specimen."""
    from transforms import orm

    patient_key = ctx.key_of(ctx.patient_ref or "") or ""
    order_key = ctx.key_of(order_ref) if order_ref is not None else None
    out = [
        {"reference": orm.specimen(spm, ctx, order_key, order_ref, patient_key)} for spm in order.specimens
    ]
    obr = order.obr
    if obr is None or order_ref is None or order_key is None or not order.obr_specimen:
        return out
    # IG ORU_R01: OBR → Specimen[1] (OBR[Specimen]) beside the SPMs' Specimen[n]
    ref = orm.obr_specimen(obr, ctx, order_key, order_ref)
    if ref is not None:
        out.append({"reference": ref})
    return out


def convert(msg: Message, ctx: ConvertContext) -> None:
    """ORU^R01 → entries in ``ctx``."""
    pid, orders, patient_obs = _groups(msg)
    if pid is None:
        raise ConversionError(
            "ORU message has no PID segment: results need a patient", code="100", location=Location("PID", 1)
        )
    patient_ref = patient(pid, ctx)
    if len(pid.fields) > 21 and pid.fields[21]:
        from transforms import adt

        adt.mother(pid, ctx, patient_ref, ctx.key_of(patient_ref) or patient_ref)  # PID-21 (IG PID[Patient])
    enc = encounter(msg, ctx)
    if not orders and not patient_obs:
        raise ConversionError("ORU message has no OBR segment", code="100", location=Location("OBR", 1))
    if patient_obs:
        seen: dict[str, int] = {}
        key_prefix = f"{ctx.key_of(ctx.patient_ref or '') or ''}|patient-observation"
        for obx, notes in patient_obs:
            if obx.get(2).strip().upper() == "ED":
                ctx.count("ed_without_report")
            observation(
                obx, notes, ctx, key_prefix=key_prefix, obr=None, obr_status_code="", seen=seen, enc=enc
            )
    used: set[str] = set()
    for order in orders:
        report(order, ctx, enc, used)


__all__ = [
    "DIAGNOSTIC_REPORT_STATUS_RANK",
    "OBR_STATUS",
    "OBX_STATUS",
    "attachment",
    "convert",
    "minimal_patient",
    "observation_rank",
    "patient",
]
