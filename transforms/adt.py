"""ADT → FHIR: Patient, Encounter, RelatedPerson, AllergyIntolerance, Condition, Coverage,
Practitioner, Location (HL7 V2-to-FHIR IG segment maps; choices where it is silent in docs/mapping.md).

Supported triggers: A01-A18, A20-A42, A44-A51, A60; the identity events (merges, moves, identifier
changes, links, A17 swap, A20 bed status) are in :mod:`transforms.adt_events`; A29 (delete person) is
converted here like the other ADT_A21-structure events, its Patient marked inactive.  A43 (move by
identifier list) is AR 201.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import quote

from engine import redact
from engine.errors import ConversionError, Location, MessageRejected
from engine.hl7 import Message, Rep, Segment
from transforms import adt_events
from transforms import datatypes as dt
from transforms.bundle import ConvertContext, conditional_url
from transforms.datatypes import JSON
from transforms.settings import DERIVED_SYSTEM_PREFIX

ACT_CODE: Final = "http://terminology.hl7.org/CodeSystem/v3-ActCode"

PARTICIPATION: Final = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
# IG PV2[Encounter]: PV2-8 / PV2-9 (the IG's PV2-9 URL has a stray "v\"; this is the published one)
PLANNED_START: Final = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Encounter.plannedStartDate"
PLANNED_END: Final = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Encounter.plannedEndDate"

# Trigger → Encounter.status (IG Event[EncounterStatus]); None = derived from the PV1 data.
ENCOUNTER_STATUS: Final[dict[str, str | None]] = {
    "A01": "in-progress",
    "A02": "in-progress",
    "A03": "finished",
    "A04": "in-progress",  # IG says planned; a registered (arrived) outpatient is in progress (docs)
    "A05": "planned",
    "A06": "in-progress",
    "A07": "in-progress",
    "A08": None,
    "A09": "in-progress",
    "A10": "in-progress",
    "A11": "cancelled",
    "A12": "in-progress",
    "A13": "in-progress",
    "A14": "planned",
    "A15": "in-progress",
    "A16": "in-progress",
    "A21": "onleave",
    "A22": "in-progress",
    "A23": "entered-in-error",
    "A25": "in-progress",
    "A26": "in-progress",
    "A27": "cancelled",
    "A28": None,
    "A29": None,  # delete person information: ADT_A21 structure, the segments of the IG's ADT_A09 map
    "A31": None,
    "A32": "in-progress",
    "A33": "in-progress",
    "A38": "cancelled",
    "A60": None,
}
MERGE_TRIGGERS: Final = ("A40",)
SUPPORTED: Final = frozenset(ENCOUNTER_STATUS) | frozenset(MERGE_TRIGGERS) | adt_events.TRIGGERS

PATIENT_CLASS: Final = {
    "E": (ACT_CODE, "EMER", "emergency"),
    "I": (ACT_CODE, "IMP", "inpatient encounter"),
    "O": (ACT_CODE, "AMB", "ambulatory"),
    "P": (ACT_CODE, "PRENC", "pre-admission"),
    "R": (dt.V2_TABLE + "0004", "R", "Recurring patient"),
    "B": (dt.V2_TABLE + "0004", "B", "Obstetrics"),
    "C": (dt.V2_TABLE + "0004", "C", "Commercial Account"),
    "N": (dt.V2_TABLE + "0004", "N", "Not Applicable"),
    "U": (dt.V2_TABLE + "0004", "U", "Unknown"),
}
CLASS_UNKNOWN: Final = {
    "system": dt.NULL_FLAVOR,
    "code": "UNK",
    "display": "unknown",
}

MARITAL: Final = {
    "A": "A",
    "D": "D",
    "I": "I",
    "L": "L",
    "M": "M",
    "C": "C",
    "P": "P",
    "T": "T",
    "U": "U",
    "S": "S",
    "W": "W",
    "N": "A",
    "B": "U",
    "E": "L",
    "G": "T",
    "O": "UNK",
    "R": "T",
}
MARITAL_DISPLAY: Final = {
    "A": "Annulled",
    "D": "Divorced",
    "I": "Interlocutory",
    "L": "Legally Separated",
    "M": "Married",
    "C": "Common Law",
    "P": "Polygamous",
    "T": "Domestic partner",
    "U": "unmarried",
    "S": "Never Married",
    "W": "Widowed",
    "UNK": "unknown",
}
ALLERGY_CATEGORY: Final = {
    "DA": "medication",
    "MC": "medication",
    "FA": "food",
    "EA": "environment",
    "AA": "environment",
    "PA": "environment",
    "LA": "environment",
    "MA": None,
}
ALLERGY_CRITICALITY: Final = {"SV": "high", "MO": "low", "MI": "low", "U": "unable-to-assess"}
REACTION_SEVERITY: Final = {"SV": "severe", "MO": "moderate", "MI": "mild"}
DIAGNOSIS_VERIFICATION: Final = {"A": "provisional", "W": "provisional", "F": "confirmed", "P": "provisional"}
SUBSCRIBER_RELATIONSHIP: Final = {
    "SEL": "self",
    "SPO": "spouse",
    "CHD": "child",
    "PAR": "parent",
    "FTH": "parent",
    "MTH": "parent",
    "DOM": "common",
    "EME": "other",
    "OTH": "other",
    "01": "spouse",
    "18": "self",
    "19": "child",
}
EMERGENCY_CONTACT_ROLES: Final = ("EMR", "E", "F", "I", "S")
ROLE_CODE: Final = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
# IG ConceptMap Relationship (table 0063 → v3-RoleCode, or v2-0131 for the contact roles)
RELATIONSHIP: Final[dict[str, tuple[str, str, str]]] = {
    "SEL": (ROLE_CODE, "ONESELF", "self"),
    "SPO": (ROLE_CODE, "SPS", "spouse"),
    "DOM": (ROLE_CODE, "SIGOTHR", "significant other"),
    "CHD": (ROLE_CODE, "CHILD", "child"),
    "GCH": (ROLE_CODE, "GRNDCHILD", "grandchild"),
    "NCH": (ROLE_CODE, "NCHILD", "natural child"),
    "SCH": (ROLE_CODE, "STPCHLD", "step child"),
    "FCH": (ROLE_CODE, "CHLDFOST", "foster child"),
    "DEP": (ROLE_CODE, "DEP", "Handicapped dependent"),
    "WRD": (ROLE_CODE, "WRD", "Ward of court"),
    "PAR": (ROLE_CODE, "PRN", "parent"),
    "MTH": (ROLE_CODE, "MTH", "mother"),
    "FTH": (ROLE_CODE, "FTH", "father"),
    "CGV": (ROLE_CODE, "CGV", "Care giver"),
    "GRD": (ROLE_CODE, "GRD", "Guardian"),
    "GRP": (ROLE_CODE, "GRPRN", "grandparent"),
    "EXF": (ROLE_CODE, "EXT", "extended family member"),
    "SIB": (ROLE_CODE, "SIB", "sibling"),
    "BRO": (ROLE_CODE, "BRO", "brother"),
    "SIS": (ROLE_CODE, "SIS", "sister"),
    "FND": (ROLE_CODE, "FRND", "unrelated friend"),
    "OAD": (ROLE_CODE, "OAD", "Other adult"),
    "EME": (ROLE_CODE, "EME", "Employee"),
    "EMR": (dt.V2_TABLE + "0131", "E", "Employer"),
    "ASC": (ROLE_CODE, "ASC", "Associate"),
    "EMC": (dt.V2_TABLE + "0131", "C", "Emergency Contact"),
    "OWN": (ROLE_CODE, "OWN", "Owner"),
    "TRA": (ROLE_CODE, "TRA", "Trainer"),
    "MGR": (ROLE_CODE, "MGR", "Manager"),
    "NON": (ROLE_CODE, "NON", "None"),
    "UNK": (dt.V2_TABLE + "0131", "U", "Unknown"),
    "OTH": (dt.V2_TABLE + "0131", "O", "Other"),
}
# IG ConceptMap ContactRole (table 0131, identity)
CONTACT_ROLE: Final = {
    "E": "Employer",
    "C": "Emergency Contact",
    "F": "Federal Agency",
    "I": "Insurance Company",
    "N": "Next-of-Kin",
    "S": "State Agency",
    "O": "Other",
    "U": "Unknown",
}
# PV2-25 visit priority (table 0217) → v3-ActPriority
VISIT_PRIORITY: Final = {"1": ("EM", "emergency"), "2": ("UR", "urgent"), "3": ("EL", "elective")}
ACT_PRIORITY: Final = "http://terminology.hl7.org/CodeSystem/v3-ActPriority"
# DG1-6 diagnosis type (table 0052) → Encounter.diagnosis.use (diagnosis-role)
DIAGNOSIS_ROLE: Final = {"A": ("AD", "Admission diagnosis"), "F": ("DD", "Discharge diagnosis")}
DIAGNOSIS_ROLE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/diagnosis-role"
# IN1-15 plan types that are v3-ActCode insurance policy codes (a CWE without a coding system)
ACT_CODE_PLAN_TYPES: Final = frozenset(
    {
        "HMO",
        "PPO",
        "POS",
        "EHCPOL",
        "HSAPOL",
        "AUTOPOL",
        "COL",
        "UNINSMOT",
        "PUBLICPOL",
        "DENTPRG",
        "DISEASEPRG",
        "CANPRG",
        "ENDRENAL",
        "HIVAIDS",
        "MANDPOL",
        "MENTPRG",
        "SAFNET",
        "SUBPRG",
        "SUBSIDIZ",
        "SUBSIDMC",
        "SUBSUPP",
        "WCBPOL",
        "INSPOL",
        "DENTAL",
        "DISEASE",
        "DRUGPOL",
        "HIP",
        "LTC",
        "MCPOL",
        "MENTPOL",
        "SUBSIDFFS",
        "VISPOL",
        "WORKCOMP",
        "MEDICARE",
        "MEDICAID",
        "CHAR",
    }
)
MEDICARE_SYSTEM: Final = "http://hl7.org/fhir/sid/us-medicare"
MEDICAID_SYSTEM: Final = "http://hl7.org/fhir/sid/us-medicaid"


# ---------------------------------------------------------------------------
def convert(msg: Message, ctx: ConvertContext) -> None:
    """Add the ADT message's resources to ``ctx``."""
    trigger = msg.trigger
    if not trigger:
        evn = msg.first("EVN")
        trigger = evn.get(1).strip().upper() if evn is not None else ""
    if trigger in adt_events.REJECTED:
        raise adt_events.rejected(trigger)
    if trigger in adt_events.TRIGGERS:
        adt_events.convert(msg, ctx, trigger)
        return
    if trigger not in SUPPORTED:
        raise MessageRejected(
            f"ADT trigger {redact.trigger(trigger) if trigger else '(empty)'} is not supported by the FHIR conversion",
            code="201",
            location=Location("MSH", 1, 9, None, 2),
        )
    pid = msg.first("PID")
    if pid is None:
        raise ConversionError("ADT message has no PID segment", code="100", location=Location("PID", 1))
    patient_ref, patient_key = patient(pid, msg, ctx)
    if trigger == "A29" and (person := ctx.find(patient_ref)) is not None:
        person["active"] = False  # the person's record is deleted at the sender: kept, marked inactive
    enc_ref = encounter(msg, ctx, trigger, patient_ref, patient_key)
    if len(pid.fields) > 18 and pid.fields[18]:
        adt_events.account(pid, ctx, patient_ref)  # IG PID[Account]
    mother(pid, ctx, patient_ref, patient_key)
    roles(msg, ctx, patient_ref, enc_ref)
    observations(msg, ctx, patient_key, enc_ref)
    for nk1 in msg.all("NK1"):
        related_person(nk1, ctx, patient_ref, patient_key)
    for al1 in msg.all("AL1"):
        allergy(al1, ctx, patient_ref, patient_key)
    if msg.all("IAM"):
        adt_events.allergies(msg, ctx, patient_ref, patient_key)
    conditions: list[tuple[str, Segment]] = []
    for dg1 in msg.all("DG1"):
        ref = condition(dg1, ctx, patient_ref, patient_key, enc_ref)
        if ref:
            conditions.append((ref, dg1))
    if msg.all("PR1"):
        from transforms import dft

        for pr1 in msg.all("PR1"):
            # IG ADT_A01 PROCEDURE: PR1[Procedure]; an ADT does not say whether a listed procedure was done
            # (a pre-admit lists planned ones): the IG's "if not clear, use unknown"
            dft.procedure(pr1, ctx, patient_key, enc_ref, "unknown")
    if conditions:  # a message without DG1 pays no call
        encounter_diagnoses(enc_ref, conditions, ctx)
    if not msg.all("IN1"):
        return
    in1_in2: list[list[Segment]] = []  # INSURANCE groups: IN1 and the IN2 right after it
    for seg in msg.segments:
        if seg.name == "IN1":
            in1_in2.append([seg])
        elif seg.name == "IN2" and in1_in2 and len(in1_in2[-1]) == 1:
            in1_in2[-1].append(seg)
    for group in in1_in2:
        coverage(group[0], ctx, patient_ref, patient_key, group[1] if len(group) > 1 else None)


# ---------------------------------------------------------------------------
# Patient identity
# ---------------------------------------------------------------------------
_RANK: Final = {"mapped": 0, "oid": 1, "uuid": 1, "uri": 1, "derived": 2}


def key_identifier(seg: Segment, field: int, ctx: ConvertContext) -> tuple[str, str, Rep]:
    """The match rule: the patient key among the CX repetitions of ``seg``-``field``.

    Prefer an authority listed in ``identifier_systems``, then one with an ISO OID / UUID / URI,
    then a derived system (``derive_unknown_systems``); first repetition wins within a rank.
    SSN-type identifiers (CX-5 = SS) are never keys.  If none has a system: the channel's
    ``default_identifier_system`` for the first repetition, else AE 204 (AE 101 if the field is empty).
    """
    # (repetition, its components 1-5) of every repetition with an id (CX-1); components read once
    reps = [(r, c) for r in seg.reps(field) if (c := r.cs(5))[0].strip()]
    if not reps:
        ctx.count("identifier_match_failure")
        raise ConversionError(
            f"{seg.name}-{field} (patient identifier) is empty", code="101", location=seg.loc(field)
        )
    best: tuple[int, int, str, Rep] | None = None
    usable: list[Rep] = []
    for i, (r, c) in enumerate(reps):
        if c[4] and c[4].strip().upper() == "SS":
            continue
        usable.append(r)
        ns, uid, utype = r.hd(4)  # (not *r.hd(4): a star call is a generic call in the compiled build)
        system, how = dt.hd_system(ctx, ns, uid, utype)
        if system is None:
            continue
        rank = _RANK.get(how, 3)
        if best is None or (rank, i) < best[:2]:
            best = (rank, i, system, r)
    if best is not None:
        if best[0] == 2:
            ctx.count("identifier_system_derived")
        return best[2], best[3].c(1).strip(), best[3]
    default = ctx.settings.default_identifier_system
    if default and usable:
        ctx.count("identifier_system_default")
        return default, usable[0].c(1).strip(), usable[0]
    if ctx.settings.derive_unknown_systems and usable:
        # No authority at all: the identifier was assigned by the sender (MSH-4, else MSH-3).
        msh = ctx.message.msh
        sender = msh.get(4, 1).strip() or msh.get(4, 2).strip() or msh.get(3, 1).strip()
        if sender:
            ctx.count("identifier_system_derived_from_sender")
            return DERIVED_SYSTEM_PREFIX + quote(sender, safe="-._~:"), usable[0].c(1).strip(), usable[0]
    ctx.count("identifier_match_failure")
    raise ConversionError(
        f"{seg.name}-{field}: no patient identifier has an assigning authority (CX-4) with a known system; "
        "map the sender's authority to its system under the hl7-to-fhir step's identifier_systems (or set "
        "derive_unknown_systems: true), sluice reload, then replay the message (docs/mapping.md#patient-match-rule)",
        code="204",
        location=seg.loc(field),
    )


def _has_identifier(seg: Segment, field: int) -> bool:
    """Does ``seg``-``field`` hold a CX with an id (CX-1)?"""
    f = seg.fields
    if field >= len(f) or not f[field]:
        return False
    return any(r.c(1).strip() for r in seg.reps(field))


def patient(pid: Segment, msg: Message, ctx: ConvertContext, *, create_only: bool = False) -> tuple[str, str]:
    """PID (+PD1, NK1 contacts) → Patient.  Returns (reference, resource key).

    The key is PID-3 (:func:`key_identifier`); a PID-3 without an identifier falls back to PID-2, then
    PID-4 (v2.3 senders), with a located warning.

    ADT writes it as a conditional update (the ADT feed is the authority); ORU and SIU pass
    ``create_only=True`` (conditional create: never overwrite the richer ADT Patient).

    Hot path: raw fields are tested before any datatype call, so empty fields cost one index."""
    s = ctx.settings
    f = pid.fields
    nf = len(f)
    key_field = 3
    if not _has_identifier(pid, 3):
        # v2.3-era senders: the patient's identifier only in PID-2 (external id) or PID-4 (alternate id)
        for alt in (2, 4):
            if _has_identifier(pid, alt):
                key_field = alt
                ctx.warn(
                    "patient_key_from_pid_2" if alt == 2 else "patient_key_from_pid_4",
                    pid.loc(alt),
                    f"PID-3 is empty: the patient is matched on PID-{alt} (a pre-v2.5 identifier field)",
                )
                break
    system, value, key_rep = key_identifier(pid, key_field, ctx)
    res: JSON = {"resourceType": "Patient", "active": True}
    idents: list[JSON] = []
    seen: set[tuple[str | None, str]] = set()
    key_raw = key_rep.raw
    for field in (3, 2, 4):
        if field >= nf or not f[field]:
            continue
        for r in pid.reps(field):
            ident = dt.cx(r, ctx)  # (cx's location only names a bad CX-7/8 period, which it drops)
            if ident is None:
                continue
            if r is key_rep or (field == key_field and r.raw == key_raw):
                ident["system"] = system
            sv = (ident.get("system"), ident["value"])
            if sv not in seen:
                seen.add(sv)
                idents.append(ident)
    if nf > 19 and f[19] and (ssn := dt.value(pid, 19, ctx).strip()):
        idents.append({"type": dt.identifier_type("SS"), "system": dt.SSN_SYSTEM, "value": ssn})
    if nf > 20 and f[20]:
        dln = dt.rep_of(pid, 20, ctx)
        if dl_no := dln.c(1).strip():
            dl: JSON = {"type": dt.identifier_type("DL"), "value": dl_no}
            if exp := dln.c(3).strip():
                try:
                    if end := dt.dtm(exp, s, pid.loc(20, 3), kind="date"):
                        dl["period"] = {"end": end}
                except ConversionError:
                    ctx.count("bad_identifier_period")
            idents.append(dl)
    res["identifier"] = idents
    names = dt.xpns(pid, 5, s) if nf > 5 and f[5] else []
    if nf > 9 and f[9]:
        names += dt.xpns(pid, 9, s)
    if names:
        res["name"] = names
    telecom: list[JSON] = []
    if nf > 13 and f[13]:
        telecom += dt.xtns(pid, 13, "home")
    if nf > 14 and f[14]:
        telecom += dt.xtns(pid, 14, "work")
    if nf > 40 and f[40]:
        telecom += dt.xtns(pid, 40)
    if telecom:
        res["telecom"] = telecom
    if nf > 8 and f[8] and (gender := dt.table_at(ctx, dt.ADMINISTRATIVE_SEX, pid, 8, "0001")):
        res["gender"] = gender
    dob = dt.value(pid, 7, ctx).strip() if nf > 7 and f[7] else ""
    if dob:
        res["birthDate"] = dt.dtm_at(dob, s, pid, 7, kind="date")
        if len(dob) > 8 and dob[8:10].isdigit():
            birth_time = dt.dtm_at(dob, s, pid, 7)
            res["_birthDate"] = {
                "extension": [
                    {
                        "url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                        "valueDateTime": birth_time,
                    }
                ]
            }
    if nf > 29:
        death_dt = dt.value(pid, 29, ctx).strip() if f[29] else ""
        death_ind = dt.value(pid, 30, ctx).strip().upper() if nf > 30 and f[30] else ""
        if death_dt:
            res["deceasedDateTime"] = dt.dtm_at(death_dt, s, pid, 29)
        elif death_ind in ("Y", "N"):
            res["deceasedBoolean"] = death_ind == "Y"
    if nf > 11 and f[11]:
        addresses = dt.xads(pid, 11, s)
        county = dt.value(pid, 12, ctx).strip() if nf > 12 and f[12] else ""
        if county and len(addresses) == 1 and "district" not in addresses[0]:
            addresses[0]["district"] = county
        if addresses:
            res["address"] = addresses
    if nf > 16 and f[16]:
        marital = dt.rep_of(pid, 16, ctx)
        if marital:
            mc = marital.cs(2)
            mapped = MARITAL.get(mc[0].strip().upper())
            if mapped:
                coding = {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
                    "code": mapped,
                    "display": MARITAL_DISPLAY[mapped],
                }
                if mapped == "UNK":
                    coding["system"] = dt.NULL_FLAVOR
                res["maritalStatus"] = {"coding": [coding]}
                if text := mc[1].strip():
                    res["maritalStatus"]["text"] = text
            elif cc := dt.cwe(marital, ctx, seg=pid, at=16):
                res["maritalStatus"] = cc
    if nf > 24:
        mbi = dt.value(pid, 24, ctx).strip().upper() if f[24] else ""
        order = dt.value(pid, 25, ctx).strip() if nf > 25 and f[25] else ""
        if (birth_order := dt.unsigned_int(order)) is not None and mbi != "N":
            res["multipleBirthInteger"] = birth_order
        elif mbi in ("Y", "N"):
            res["multipleBirthBoolean"] = mbi == "Y"
    if nf > 15 and f[15]:
        # a function of PID-15's text (and the delimiters): kept per channel, shared (datatypes.kept_piece)
        lang_key = ("PID-15", ctx.delim_key, f[15], "")
        kept = dt.kept_piece(ctx, lang_key)
        if kept is not None:
            lang_cc: JSON | None = kept[0]
        else:
            mark = dt.piece_mark(ctx)
            lang = dt.rep_of(pid, 15, ctx)
            lang_cc = dt.language(lang, ctx) if lang else None
            dt.keep_piece(ctx, lang_key, lang_cc, mark)
        if lang_cc:
            res["communication"] = [{"language": lang_cc, "preferred": True}]
    # PID-6.1.1 (a blank first repetition has no family name either)
    if nf > 6 and f[6] and (family := dt.value(pid, 6, ctx).strip()):
        res["extension"] = [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName",
                "valueString": family,
            }
        ]
    # PID-10 race and PID-22 ethnic group (below) → the US Core extensions (US realm: us_core_race_ethnicity)
    if nf > 10 and f[10] and s.us_core_race_ethnicity and (race := _race_ethnicity(pid, 10, ctx)):
        res.setdefault("extension", []).append(race)
    # IG PID[Patient]: PID-17 religion and PID-23 birth place → the core patient-religion / patient-birthPlace
    # extensions (an ST birth place sent with components is their text, never the HL7 encoding)
    if nf > 17 and f[17] and (religion := _religion(dt.rep_of(pid, 17, ctx), pid, ctx)):
        res.setdefault("extension", []).append({"url": _RELIGION, "valueCodeableConcept": religion})
    if nf > 22 and f[22] and s.us_core_race_ethnicity and (ethnicity := _race_ethnicity(pid, 22, ctx)):
        res.setdefault("extension", []).append(ethnicity)
    if nf > 23 and f[23] and (place := dt.plain_text(dt.rep_of(pid, 23, ctx), ctx.delimiters)):
        res.setdefault("extension", []).append({"url": _BIRTH_PLACE, "valueAddress": {"text": place}})
    pd1 = msg.first("PD1")
    if pd1 is not None and len(pd1.fields) > 4 and pd1.fields[4]:
        gps = [gp for r in pd1.reps(4) if (gp := dt.xcn(r, ctx))]
        if gps:
            res["generalPractitioner"] = gps
    contacts = [c for nk1 in msg.all("NK1") if (c := patient_contact(nk1, ctx))]
    if contacts:
        res["contact"] = contacts
    ref = ctx.add("Patient", res, identifier=(system, value), create_only=create_only)
    ctx.patient_ref = ref
    return ref, conditional_url("Patient", system, value)


_NO_JSON: Final[list[JSON]] = []  # shared empty result: only ever concatenated, never mutated
_RELIGION: Final = "http://hl7.org/fhir/StructureDefinition/patient-religion"
_TABLE_CODE: Final = re.compile(r"[A-Z]{3}")


def _religion(rep: Rep, pid: Segment, ctx: ConvertContext) -> JSON | None:
    """PID-17 → CodeableConcept: a table 0006 code sent without its coding system (``CHR``, ``AME``) gets
    v2-0006; anything else (a coded value with its system, a text such as ``Christian``) as any CWE."""
    code = rep.c(1).strip()
    if code and _TABLE_CODE.fullmatch(code) and not rep.c(3).strip() and not rep.c(4).strip():
        cc = dt.coded_table(code, "0006")
        if text := rep.c(2).strip():
            cc["text"] = text
        return cc
    return dt.cwe(rep, ctx, seg=pid, at=17)


_BIRTH_PLACE: Final = "http://hl7.org/fhir/StructureDefinition/patient-birthPlace"

# PID-10 / PID-22 → US Core (3.1.1 and later) race and ethnicity: the IG's PID[Patient] map says to use the
# realm's extension.  Codes are those of the CDC Race & Ethnicity code system (HL7 table 0005 has used them
# since v2.4); table 0189 letters and the letters of older 0005 feeds are mapped onto them.
US_CORE_RACE: Final = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
US_CORE_ETHNICITY: Final = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"
CDC_RACE_ETHNICITY: Final = "urn:oid:2.16.840.1.113883.6.238"
# the OMB categories (US Core ombCategory) with their CDC displays
OMB_RACE: Final = {
    "1002-5": "American Indian or Alaska Native",
    "2028-9": "Asian",
    "2054-5": "Black or African American",
    "2076-8": "Native Hawaiian or Other Pacific Islander",
    "2106-3": "White",
}
OMB_ETHNICITY: Final = {"2135-2": "Hispanic or Latino", "2186-5": "Not Hispanic or Latino"}
# v3-NullFlavor codes US Core allows as a race ombCategory (not as an ethnicity one before US Core 5: there
# they become the text alone)
RACE_NULL_FLAVORS: Final = {"UNK": "unknown", "ASKU": "asked but unknown"}
# table 0189 and the letters of pre-v2.4 table 0005 feeds → a CDC code or a null flavor
RACE_LETTERS: Final = {"W": "2106-3", "B": "2054-5", "A": "2028-9", "I": "1002-5", "O": "2131-1", "U": "UNK"}
ETHNICITY_LETTERS: Final = {"H": "2135-2", "N": "2186-5", "U": "UNK"}
OTHER_RACE: Final = "2131-1"  # a detailed race (US Core 3.1.1), the only one Sluice knows the display of
# coding-system names (CWE-3/6, upper-cased) whose codes are read as CDC codes, table letters or null flavors;
# names starting with HL7 (HL70005, HL70189, a truncated HL7000) too
_RACE_SYSTEMS: Final = frozenset(
    {"", "CDCREC", "CDC", CDC_RACE_ETHNICITY[8:], CDC_RACE_ETHNICITY.upper(), "NULLFL"}
)


def _cdc_number(code: str) -> int:
    """The number of a CDC Race & Ethnicity code (``NNNN-C``, C its mod-10 check digit as LOINC's), else -1."""
    if (
        len(code) != 6
        or code[4] != "-"
        or not code.isascii()
        or not code[:4].isdigit()
        or not code[5].isdigit()
    ):
        return -1
    total = 0
    for i in range(4):
        d = ord(code[3 - i]) - 48
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return int(code[:4]) if (10 - total % 10) % 10 == ord(code[5]) - 48 else -1


def _race_code(code: str, sysname: str, race: bool) -> tuple[str, str, str] | None:
    """One CWE triplet's code → ``(kind, code, display)``: kind ``omb`` (an OMB category), ``detailed`` (another
    CDC race or ethnicity code; display unknown: "") or ``null`` (a null flavor); None when it is none of them.
    Race codes of the CDC code system are 1002-2131 and 2500, ethnicity codes 2135-2186."""
    system = sysname.strip().upper()
    if system not in _RACE_SYSTEMS and not system.startswith("HL7"):
        return None
    code = code.strip().upper()
    if system != "NULLFL" and (letter := (RACE_LETTERS if race else ETHNICITY_LETTERS).get(code)) is not None:
        code = letter
    if code in RACE_NULL_FLAVORS:
        return ("null", code, RACE_NULL_FLAVORS[code])
    omb = OMB_RACE if race else OMB_ETHNICITY
    if code in omb:
        return ("omb", code, omb[code])
    n = _cdc_number(code)
    if (1002 <= n <= 2131 or n == 2500) if race else 2135 <= n <= 2186:
        return ("detailed", code, "Other Race" if code == OTHER_RACE else "")
    return None


def _race_ethnicity(pid: Segment, field: int, ctx: ConvertContext) -> JSON | None:
    """PID-10 (race) or PID-22 (ethnic group) → the US Core race or ethnicity extension; None without a value.

    A function of the field's text (and the delimiters), so kept per channel and shared by later bundles
    (:func:`datatypes.kept_piece`): a feed sends the same few values all day."""
    key = ("PID-10" if field == 10 else "PID-22", ctx.delim_key, pid.fields[field], "")
    kept = dt.kept_piece(ctx, key)
    if kept is not None:
        ext: JSON | None = kept[0]
        return ext
    mark = dt.piece_mark(ctx)
    ext = _us_core_race_ethnicity(pid.reps(field), field == 10, ctx)
    dt.keep_piece(ctx, key, ext, mark)
    return ext


def _us_core_race_ethnicity(reps: list[Rep], race: bool, ctx: ConvertContext) -> JSON | None:
    """The repetitions of PID-10 (``race``) or PID-22 → the US Core extension: each repetition's code (its
    identifier triplet, else its alternate one) as an ``ombCategory`` or a ``detailed`` coding, and one
    ``text`` (required): each repetition's text (CWE-9, CWE-2, CWE-5, else the code's display, else the code),
    joined with ``+`` as Microsoft's converter does.  Race takes up to the five OMB categories (a null flavor
    only without one), ethnicity the first.  A value that is no known code keeps its text alone, counted
    ``race_code_unmapped`` / ``ethnicity_code_unmapped``; an ethnicity sent as unknown (0189 ``U``) has its
    text alone (US Core 3.1.1 has no null flavor for it)."""
    omb: list[JSON] = []
    nulls: list[JSON] = []
    detailed: list[JSON] = []
    texts: list[str] = []
    seen: set[str] = set()
    for rep in reps:
        c = rep.cs(9)
        found = _race_code(c[0], c[2], race) if c[0].strip() else None
        sender_text = c[1].strip()
        if found is None and c[3].strip():
            found = _race_code(c[3], c[5], race)
            sender_text = c[4].strip() or sender_text
        if found is None:
            ctx.count("race_code_unmapped" if race else "ethnicity_code_unmapped")
            text = c[8].strip() or c[1].strip() or c[4].strip() or c[0].strip() or c[3].strip()
        else:
            kind, code, display = found
            text = c[8].strip() or c[1].strip() or c[4].strip() or display or code
            if code not in seen:
                seen.add(code)
                if kind == "null":
                    if race:
                        nulls.append({"system": dt.NULL_FLAVOR, "code": code, "display": display})
                elif kind == "omb":
                    omb.append({"system": CDC_RACE_ETHNICITY, "code": code, "display": display})
                elif display or sender_text:
                    detailed.append(
                        {"system": CDC_RACE_ETHNICITY, "code": code, "display": display or sender_text}
                    )
                else:
                    detailed.append({"system": CDC_RACE_ETHNICITY, "code": code})
        if text and text not in texts:
            texts.append(text)
    if not texts:
        return None
    if not race:
        omb = omb[:1]
    elif not omb:
        omb = nulls[:1]
    subs: list[JSON] = [{"url": "ombCategory", "valueCoding": coding} for coding in omb]
    subs += [{"url": "detailed", "valueCoding": coding} for coding in detailed]
    subs.append({"url": "text", "valueString": "+".join(texts)})
    return {"url": US_CORE_RACE if race else US_CORE_ETHNICITY, "extension": subs}


class _NK1:
    """What Patient.contact and the RelatedPerson of one NK1 both map (computed once per NK1 and message).

    The pieces may end up in both resources: the Bundle is read-only once built.  ``events``: what
    computing them counted, counted again for the second user (as when each mapped the NK1 itself).
    Telecom: NK1-5 and -6 (``tel_head``), NK1-31 (RelatedPerson only), NK1-40 and -41 (``tel_tail``)."""

    __slots__ = (
        "addresses",
        "events",
        "first_address",
        "gender",
        "name",
        "period",
        "rels",
        "tel31",
        "tel_head",
        "tel_tail",
    )

    def __init__(
        self,
        rels: list[JSON],
        name: JSON | None,
        tel_head: list[JSON],
        tel31: list[JSON],
        tel_tail: list[JSON],
        first_address: JSON | None,
        addresses: list[JSON],
        gender: str | None,
        period: JSON | None,
        events: list[tuple[str, int]],
    ):
        self.rels = rels
        self.name = name
        self.tel_head = tel_head
        self.tel31 = tel31
        self.tel_tail = tel_tail
        self.first_address = first_address
        self.addresses = addresses
        self.gender = gender
        self.period = period
        self.events = events

    def kept(self) -> tuple[Any, ...]:
        """The pieces copied into a plain tuple (what the channel keeps: picklable like the settings)."""
        return (
            dt.copy_json(self.rels),
            dt.copy_json(self.name),
            dt.copy_json(self.tel_head),
            dt.copy_json(self.tel31),
            dt.copy_json(self.tel_tail),
            dt.copy_json(self.first_address),
            dt.copy_json(self.addresses),
            self.gender,
            dt.copy_json(self.period),
            list(self.events),
            # the first address is the first of ``addresses`` when it was not empty: kept so
            self.first_address is not None
            and bool(self.addresses)
            and self.addresses[0] is self.first_address,
        )


def _nk1_from_kept(k: tuple[Any, ...]) -> _NK1:
    addresses: list[JSON] = dt.copy_json(k[6])
    first: JSON | None = addresses[0] if k[10] else dt.copy_json(k[5])
    return _NK1(
        dt.copy_json(k[0]),
        dt.copy_json(k[1]),
        dt.copy_json(k[2]),
        dt.copy_json(k[3]),
        dt.copy_json(k[4]),
        first,
        addresses,
        k[7],
        dt.copy_json(k[8]),
        k[9],
    )


def _nk1_parts(nk1: Segment, ctx: ConvertContext) -> _NK1:
    s = ctx.settings
    f = nk1.fields
    nf = len(f)
    counted = ctx.events
    before = dict(counted)
    rels = nk1_relationships(nk1, ctx)
    name = dt.xpn(dt.rep_of(nk1, 2, ctx), s) if nf > 2 and f[2] else None
    # raw-field checks first: an empty field costs one index, not a parser call
    head = dt.xtns(nk1, 5, "home") if nf > 5 and f[5] else _NO_JSON
    if nf > 6 and f[6]:
        head = head + dt.xtns(nk1, 6, "work")
    tel31 = dt.xtns(nk1, 31) if nf > 31 and f[31] else _NO_JSON
    tail = dt.xtns(nk1, 40) if nf > 40 and f[40] else _NO_JSON
    if nf > 41 and f[41]:
        tail = tail + dt.xtns(nk1, 41)
    per_rep = [dt.xad(r, s) for r in nk1.reps(4)] if nf > 4 and f[4] else _NO_JSON
    first_address = per_rep[0] if per_rep else None
    addresses = [a for a in per_rep if a is not None] if per_rep else _NO_JSON
    gender = dt.table_at(ctx, dt.ADMINISTRATIVE_SEX, nk1, 15, "0001") if nf > 15 and f[15] else None
    period = (
        dt.period_at(dt.value(nk1, 8, ctx), dt.value(nk1, 9, ctx), s, nk1, 8, 9)
        if nf > 8 and (f[8] or (nf > 9 and f[9]))
        else None
    )
    events = [(k, n - before.get(k, 0)) for k, n in counted.items() if n != before.get(k, 0)]
    return _NK1(rels, name, head, tel31, tail, first_address, addresses, gender, period, events)


_NK1_SHARED_MAX: Final = 1024


def _nk1(nk1: Segment, ctx: ConvertContext) -> tuple[_NK1, bool]:
    """The shared NK1 pieces, and whether they were computed before in this message.

    They are a pure function of the NK1's text, the delimiters and the channel's settings, and a feed
    repeats its contacts' NK1 segments: the channel keeps them (``ConvertSettings.shared_memo``) and a
    later message gets a copy, with what computing them counted counted again.  Pieces whose computation
    warned or added entries are never kept (only counts are replayed)."""
    key = ("NK1", id(nk1))
    hit: _NK1 | None = ctx.memo.get(key)
    if hit is not None:
        return hit, True
    d = ctx.delimiters
    text_key = ("NK1", d.field + d.encoding_characters, d.field.join(nk1.fields))
    shared = ctx.settings.shared_memo
    kept: tuple[Any, ...] | None = shared.get(text_key)
    if kept is not None:
        hit = _nk1_from_kept(kept)
        for event, times in hit.events:
            ctx.count(event, times)
    else:
        warned, added = len(ctx.warnings), len(ctx.entries)
        hit = _nk1_parts(nk1, ctx)
        if len(ctx.warnings) == warned and len(ctx.entries) == added:
            if len(shared) >= _NK1_SHARED_MAX:
                shared.clear()
            shared[text_key] = hit.kept()  # the kept pieces never reach a Bundle
    ctx.memo[key] = hit
    return hit, False


def patient_contact(nk1: Segment, ctx: ConvertContext) -> JSON | None:
    """NK1 → Patient.contact (every NK1; the IG also makes a RelatedPerson for non-emergency roles)."""
    parts, again = _nk1(nk1, ctx)
    if again:
        for event, times in parts.events:
            ctx.count(event, times)
    c: JSON = {}
    if parts.rels:
        c["relationship"] = list(parts.rels)
    if parts.name:
        c["name"] = parts.name
    if parts.tel_head or parts.tel_tail:
        c["telecom"] = parts.tel_head + parts.tel_tail
    if parts.first_address:
        c["address"] = parts.first_address
    if parts.gender:
        c["gender"] = parts.gender
    if parts.period:
        c["period"] = parts.period
    f = nk1.fields
    if len(f) > 13 and f[13] and (org_name := dt.value(nk1, 13, ctx).strip()):
        c["organization"] = {"display": org_name}
    if not ("name" in c or "telecom" in c or "address" in c or "organization" in c):
        return None
    return c


_ROLE_SYSTEMS: Final = frozenset(("", "HL70063", "HL70131", "HL7-0063", "HL7-0131", "ACR"))
TABLE_0063: Final = dt.V2_TABLE + "0063"
TABLE_0131: Final = dt.V2_TABLE + "0131"


def _mapped_coding(
    code: str,
    display: str,
    sysname: str,
    table_map: dict[str, tuple[str, str, str]],
    default_system: str,
    systems: Mapping[str, str],
) -> JSON | None:
    """A relationship code: the table's map for a code of the table's own systems, else a coding of its system
    (the channel's ``coding_systems`` first), else ``default_system``."""
    code = dt.fhir_code(code)
    if not code:
        return None
    hit = table_map.get(code.upper())
    if hit is not None and sysname.strip().upper() in _ROLE_SYSTEMS:
        return {"system": hit[0], "code": hit[1], "display": hit[2]}
    c: JSON = {"system": dt.code_system(sysname, systems) or default_system, "code": code}
    if display.strip():
        c["display"] = display.strip()
    return c


def nk1_relationships(nk1: Segment, ctx: ConvertContext) -> list[JSON]:
    """NK1-3 (relationship, IG ConceptMap Relationship: 0063 → v3-RoleCode / v2-0131) and NK1-7 (contact
    role, table 0131) → CodeableConcepts.  Both triplets of each CWE are mapped."""
    out: list[JSON] = []
    f = nk1.fields
    nf = len(f)
    if nf > 3 and f[3] and (rel := dt.rep_of(nk1, 3, ctx)):
        c = rel.cs(6)
        systems = ctx.coding_systems
        first = _mapped_coding(c[0], c[1], c[2], RELATIONSHIP, TABLE_0063, systems) if c[0] else None
        alt = _mapped_coding(c[3], c[4], c[5], RELATIONSHIP, TABLE_0063, systems) if c[3] else None
        codings = [x for x in (first, alt) if x is not None]
        if codings:
            cc: JSON = {"coding": codings}
            if (text := c[1].strip()) and text != codings[0].get("display"):
                cc["text"] = text  # the sender's own wording, kept next to the mapped code
            out.append(cc)
    if nf > 7 and f[7] and (role := dt.rep_of(nk1, 7, ctx)):
        code = dt.fhir_code(role.c(1)).upper()
        if code in CONTACT_ROLE:
            out.append({"coding": [{"system": TABLE_0131, "code": code, "display": CONTACT_ROLE[code]}]})
        elif (hit := RELATIONSHIP.get(code)) is not None and hit[0] == TABLE_0131:
            # a table-0063 contact code sent in NK1-7 (EMC, EMR, UNK, OTH): the Relationship map's 0131 code
            out.append({"coding": [{"system": hit[0], "code": hit[1], "display": hit[2]}]})
        elif role_cc := dt.cwe(role, ctx, seg=nk1, at=7):
            for coding in role_cc.get("coding", ()):
                coding.setdefault("system", TABLE_0131)
            out.append(role_cc)
    return out


# ---------------------------------------------------------------------------
# Encounter
# ---------------------------------------------------------------------------
def _derived_status(pv1: Segment) -> str:
    if pv1.get(45).strip():
        return "finished"
    cls = pv1.get(2).strip().upper()
    if cls == "P":
        return "planned"
    if cls == "U":
        return "unknown"
    return "in-progress"


# PV1 fields naming the encounter's participants: (field, v3-ParticipationType code, display)
_PV1_PARTICIPANTS: Final = (
    (7, "ATND", "attender"),
    (8, "REF", "referrer"),
    (9, "CON", "consultant"),
    (17, "ADM", "admitter"),
    (52, "PART", "Participation"),
)


def _participants(
    seg: Segment, field: int, code: str, display: str, ctx: ConvertContext, out: list[JSON]
) -> None:
    """Every XCN repetition of ``seg``-``field`` → an Encounter.participant of type ``code``."""
    ptype = _PARTICIPANT_TYPE.get(code)
    if ptype is None:
        ptype = [{"coding": [{"system": PARTICIPATION, "code": code, "display": display}]}]
    for r in seg.reps(field):
        who = dt.xcn(r, ctx)
        if who:
            out.append({"type": ptype, "individual": who})


# the participant types of _PV1_PARTICIPANTS, one list each, shared by every Encounter (bundles are read-only
# once made; ROL adds participants of its own, never changes a type)
_PARTICIPANT_TYPE: Final[dict[str, list[JSON]]] = {
    code: [{"coding": [{"system": PARTICIPATION, "code": code, "display": display}]}]
    for _, code, display in _PV1_PARTICIPANTS
}


def encounter(
    msg: Message,
    ctx: ConvertContext,
    trigger: str,
    patient_ref: str,
    patient_key: str,
    *,
    create_only: bool = False,
) -> str | None:
    """PV1/PV2 → Encounter keyed by PV1-19 (visit number); without one by patient + admit time (PV1-44);
    without either, in ADT, by patient + sender + MSH-10 (a located warning ``encounter_keyed_by_message``):
    every ADT with a visit in its PV1 gets its Encounter.  A placeholder PV1 of a person-only event has
    none; ORU/SIU (``create_only``) reference none without a visit number or admit time."""
    pv1 = msg.first("PV1")
    if pv1 is None:
        return None
    s = ctx.settings
    f = pv1.fields
    nf = len(f)
    # raw-field checks first: an empty field costs one index, not a parser call
    visit_no = dt.value(pv1, 19, ctx).strip() if nf > 19 and f[19] else ""
    admit = dt.value(pv1, 44, ctx).strip() if nf > 44 and f[44] else ""
    res: JSON = {"resourceType": "Encounter"}
    status = ENCOUNTER_STATUS.get(trigger) or _derived_status(pv1)
    res["status"] = status
    cls = dt.value(pv1, 2, ctx).strip().upper() if nf > 2 and f[2] else ""
    if cls:
        hit = PATIENT_CLASS.get(cls)
        if hit is None:
            dt.table(ctx, {}, cls, pv1.loc(2), "0004")
            res["class"] = dict(CLASS_UNKNOWN)
        else:
            res["class"] = {"system": hit[0], "code": hit[1], "display": hit[2]}
    else:
        res["class"] = dict(CLASS_UNKNOWN)
    if nf > 4 and f[4] and (adm_type := dt.value(pv1, 4, ctx).strip()):
        res["type"] = [dt.coded_table(adm_type, "0007")]
    if nf > 10 and f[10] and (service := dt.value(pv1, 10, ctx).strip()):
        res["serviceType"] = dt.coded_table(service, "0069")
    res["subject"] = {"reference": patient_ref}
    participants: list[JSON] = []
    pv2 = msg.first("PV2")
    for field, code, display in _PV1_PARTICIPANTS:
        if field < nf and f[field]:
            _participants(pv1, field, code, display, ctx, participants)
    if pv2 is not None and len(pv2.fields) > 13 and pv2.fields[13]:
        _participants(pv2, 13, "REF", "referrer", ctx, participants)  # PV2-13 referral source
    if participants:
        res["participant"] = participants
    if admit or (nf > 45 and f[45]):
        p = dt.period_at(admit, dt.value(pv1, 45, ctx), s, pv1, 44, 45)
        if p:
            # the admit time keys and starts the visit, so the discharge time is the one dropped
            if "end" in p:
                dt.drop_end_before_start(
                    p,
                    ctx,
                    "encounter_end_before_start",
                    pv1.loc(45),
                    "discharge date/time is before the admit date/time (PV1-44); Encounter.period.end dropped",
                )
            res["period"] = p
    locations: list[JSON] = []
    loc_status_current = (
        "completed"
        if status in ("finished", "cancelled")
        else ("planned" if status == "planned" else "active")
    )
    for field, st in ((3, loc_status_current), (11, "active"), (6, "completed"), (42, "planned")):
        if trigger == "A12" and field == 6:
            continue  # A12: PV1-6 is the transfer being cancelled, PV1-3 the location restored
        if field >= nf or not f[field]:
            continue
        ref = dt.pl(pv1.rep(field), ctx)
        if ref:
            locations.append({"location": ref, "status": st})
    if locations:
        res["location"] = locations
    hosp: JSON = {}
    if nf > 5 and f[5] and (pre := dt.cx(dt.rep_of(pv1, 5, ctx), ctx)):
        hosp["preAdmissionIdentifier"] = pre
    if nf > 13:
        if nf > 14 and f[14] and (src := dt.value(pv1, 14, ctx).strip()):
            hosp["admitSource"] = dt.coded_table(src, "0023")
        if f[13] and (readm := dt.value(pv1, 13, ctx).strip()):
            hosp["reAdmission"] = dt.coded_table(readm, "0092")
        if nf > 15 and f[15] and (arr := dt.value(pv1, 15, ctx).strip()):
            hosp["specialArrangement"] = [dt.coded_table(arr, "0009")]
    if nf > 36:
        if f[36] and (disp := dt.value(pv1, 36, ctx).strip()):
            hosp["dischargeDisposition"] = dt.coded_table(disp, "0112")
        if nf > 38 and f[38] and (diet := dt.value(pv1, 38, ctx).strip()):
            hosp["dietPreference"] = [{"coding": [{"code": diet}]}]
    if hosp:
        res["hospitalization"] = hosp
    if pv2 is not None:
        pf = pv2.fields
        npf = len(pf)
        reasons = dt.cwes(pv2, 3, ctx) if npf > 3 and pf[3] else None
        if reasons:
            res["reasonCode"] = reasons
        exp_admit = dt.value(pv2, 8, ctx).strip() if npf > 8 and pf[8] else ""
        exp_disch = dt.value(pv2, 9, ctx).strip() if npf > 9 and pf[9] else ""
        if exp_admit or exp_disch:
            # IG PV2[Encounter]: PV2-8 / PV2-9 → the R5 plannedStartDate / plannedEndDate extensions
            planned: list[JSON] = []
            if exp_admit:
                start = dt.dtm_at(exp_admit, s, pv2, 8)
                planned.append({"url": PLANNED_START, "valueDateTime": start})
                if "period" not in res and status == "planned":
                    res["period"] = {"start": start}
            if exp_disch:
                try:  # newly mapped and only a plan: a bad value is counted, never a rejected update
                    planned.append({"url": PLANNED_END, "valueDateTime": dt.dtm_at(exp_disch, s, pv2, 9)})
                except ConversionError:
                    ctx.count("bad_planned_end")
            if planned:
                res["extension"] = planned
        prio = dt.rep_of(pv2, 25, ctx) if npf > 25 and pf[25] else None
        if prio:
            codings = []
            for ci in (1, 4):
                code = prio.c(ci).strip()
                if prio_hit := VISIT_PRIORITY.get(code):
                    codings.append({"system": ACT_PRIORITY, "code": prio_hit[0], "display": prio_hit[1]})
                elif code:
                    dt.table(ctx, {}, code, pv2.loc(25), "0217")
            if codings:
                res["priority"] = {"coding": codings}
    alternates = [i for r in pv1.reps(50) if (i := dt.cx(r, ctx))] if nf > 50 and f[50] else []
    if visit_no:
        ident = dt.cx(dt.rep_of(pv1, 19, ctx), ctx) or {"value": visit_no}
        if "type" not in ident:
            ident["type"] = dt.identifier_type("VN")
        res["identifier"] = [ident, *alternates]
        if "system" in ident:
            return ctx.add("Encounter", res, identifier=(ident["system"], visit_no), create_only=create_only)
        # A visit number without a usable authority is only unique per patient.
        return ctx.add("Encounter", res, key=f"{patient_key}|visit|{visit_no}", create_only=create_only)
    if alternates:
        res["identifier"] = alternates
    if admit:
        ctx.count("encounter_keyed_by_admit_time")
        return ctx.add("Encounter", res, key=f"{patient_key}|admit|{admit}", create_only=create_only)
    if create_only:
        # ORU/SIU (conditional create; the ADT feed owns the Encounter): one unkeyed Encounter per result
        # or appointment message would only pile up stubs, so they reference none
        ctx.count("encounter_without_key")
        return None
    if not _has_visit_data(pv1, trigger):
        return None  # a placeholder PV1 (``PV1|1|N``) of a person-only event: there is no visit
    # Last resort: neither a visit number nor an admit time.  The Encounter is keyed by the patient and the
    # message (sending application, facility and MSH-10), so a resent message updates the same Encounter;
    # a later message about the same visit cannot be matched to it and makes another one (documented in
    # docs/mapping.md, warned so the sender can be asked for PV1-19).
    msh = msg.msh
    sender = f"{dt.value(msh, 3, ctx)}|{dt.value(msh, 4, ctx)}"
    ctx.warn(
        "encounter_keyed_by_message",
        pv1.loc(19),
        "no visit number (PV1-19) and no admit date/time (PV1-44): the Encounter is keyed by the patient and "
        "this message's control id (MSH-10), so later messages about the visit cannot update it",
    )
    return ctx.add(
        "Encounter", res, key=f"{patient_key}|message|{sender}|{msg.control_id}", create_only=create_only
    )


# Triggers about the person rather than a visit: their PV1 is often a placeholder (``PV1|1|N``)
_PERSON_TRIGGERS: Final = frozenset(("A28", "A31", "A08", "A60", "A29", "A47", "A24", "A37"))


def _has_visit_data(pv1: Segment, trigger: str) -> bool:
    """Does PV1 describe a visit?  Always for visit events; for person events (A28, A31, ...) only when a
    field past PV1-2 is valued or the patient class is not N (not applicable)."""
    if trigger not in _PERSON_TRIGGERS:
        return True
    f = pv1.fields
    if any(v.strip() for v in f[3:]):
        return True
    cls = pv1.get(2).strip().upper()
    return bool(cls) and cls != "N"


# ---------------------------------------------------------------------------
# ROL, OBX
# ---------------------------------------------------------------------------
def mother(pid: Segment, ctx: ConvertContext, patient_ref: str, patient_key: str) -> str | None:
    """PID-21 mother's identifier → RelatedPerson (IG CX[RelatedPerson-Mother]: relationship MTH)."""
    f = pid.fields
    if len(f) <= 21 or not f[21]:
        return None
    idents = [i for r in pid.reps(21) if (i := dt.cx(r, ctx))]
    if not idents:
        return None
    res: JSON = {
        "active": True,
        "patient": {"reference": patient_ref},
        "identifier": idents,
        "relationship": [{"coding": [{"system": ROLE_CODE, "code": "MTH", "display": "mother"}]}],
    }
    if (mmn := dt.rep_of(pid, 6, ctx)) and (name := dt.xpn(mmn, ctx.settings)):
        name.setdefault("use", "maiden")
        res["name"] = [name]
    first = idents[0]
    key = "|".join((patient_key, "PID-21", first.get("system", ""), first["value"]))
    return ctx.add("RelatedPerson", res, key=key)


def roles(msg: Message, ctx: ConvertContext, patient_ref: str, enc_ref: str | None) -> None:
    """ROL after PID/PD1 with role PP → Patient.generalPractitioner (IG ROL[Patient-GeneralPractitioner]);
    ROL after PV1/PV2 → Encounter.participant (IG ROL[Encounter-PractitionerRole]; the person is the
    Practitioner, the ROL-3 role is the participant type).  ROLs elsewhere (procedures, insurance) are not
    mapped."""
    if not msg.all("ROL"):
        return
    owner = ""
    patient_res = ctx.find(patient_ref)
    enc = ctx.find(enc_ref) if enc_ref else None
    for seg in msg.segments:
        name = seg.name
        if name in ("PID", "PD1", "PV1", "PV2", "NK1", "DG1", "PR1", "IN1", "GT1", "OBX", "AL1"):
            owner = name
            continue
        if name != "ROL" or owner not in ("PID", "PD1", "PV1", "PV2"):
            continue
        role = seg.rep(3)
        who = dt.xcn(seg.rep(4), ctx)
        if who is None or "reference" not in who:
            continue
        role_code = role.c(1).strip().upper()
        if owner in ("PID", "PD1"):
            if role_code == "PP" and patient_res is not None:
                gps = patient_res.setdefault("generalPractitioner", [])
                if not any(g.get("reference") == who["reference"] for g in gps):
                    gps.append(who)
        elif enc is not None:
            part: JSON = {}
            if cc := dt.cwe(role, ctx, seg=seg, at=3):
                part["type"] = [cc]
            part["individual"] = who
            try:
                if p := dt.period_at(seg.get(5), seg.get(6), ctx.settings, seg, 5, 6):
                    part["period"] = p
            except ConversionError:
                ctx.count("bad_role_period")
            parts = enc.setdefault("participant", [])
            if not any(x["individual"].get("reference") == who["reference"] for x in parts):
                parts.append(part)


def observations(msg: Message, ctx: ConvertContext, patient_key: str, enc_ref: str | None) -> None:
    """OBX in an ADT message → Observation (IG ADT_A01 OBSERVATION group), keyed by patient + OBX-3
    code + OBX-4 sub-id; the same value mapping as ORU (transforms.oru.observation)."""
    obxs = msg.all("OBX")
    if not obxs:
        return
    from transforms import oru

    notes: dict[int, list[Segment]] = {}
    current: int | None = None
    for seg in msg.segments:
        if seg.name == "OBX":
            current = id(seg)
            notes[current] = []
        elif seg.name == "NTE" and current is not None:
            notes[current].append(seg)
        else:
            current = None
    seen: dict[str, int] = {}
    for obx in obxs:
        if not obx.rep(3):
            # an ADT's OBX is supplementary: a codeless one is skipped (counted), not a reason to drop
            # the patient update
            ctx.count("obx_without_code_skipped")
            continue
        if obx.get(2).strip().upper() == "ED":
            ctx.count("ed_without_report")
        oru.observation(
            obx,
            notes.get(id(obx), []),
            ctx,
            key_prefix=f"{patient_key}|adt-observation",
            obr=None,
            obr_status_code="",
            seen=seen,
            enc=enc_ref,
        )


# ---------------------------------------------------------------------------
# NK1, AL1, DG1, IN1
# ---------------------------------------------------------------------------
def related_person(nk1: Segment, ctx: ConvertContext, patient_ref: str, patient_key: str) -> str | None:
    """NK1 → RelatedPerson (IG: only when NK1-3 is not an emergency-contact role)."""
    f = nk1.fields
    nf = len(f)
    rel_code = dt.value(nk1, 3, ctx).strip() if nf > 3 and f[3] else ""
    if rel_code.upper() in EMERGENCY_CONTACT_ROLES:
        return None
    if not (nf > 2 and f[2]):
        return None  # no name (dt.xpn of an empty repetition)
    s = ctx.settings
    parts, again = _nk1(nk1, ctx)
    name = parts.name
    if name is None:
        return None
    res: JSON = {"resourceType": "RelatedPerson", "active": True, "patient": {"reference": patient_ref}}
    idents = [i for n in (12, 33) if n < nf and f[n] for r in nk1.reps(n) if (i := dt.cx(r, ctx))]
    if nf > 37 and f[37] and (ssn := dt.value(nk1, 37, ctx).strip()):
        idents.append({"type": dt.identifier_type("SS"), "system": dt.SSN_SYSTEM, "value": ssn})
    if idents:
        res["identifier"] = idents
    if again:
        # what mapping the relationships, gender and period counted, counted again (as before sharing)
        for event, times in parts.events:
            ctx.count(event, times)
    if parts.rels:
        res["relationship"] = list(parts.rels)
    # IG NK1[RelatedPerson]: name[1] NK1-2, name[2] NK1-30 (contact person); telecom NK1-5/6/31/40/41;
    # address NK1-4/32
    names = [name]
    reps2 = nk1.reps(2)
    if len(reps2) > 1:
        names += [n for r in reps2[1:] if (n := dt.xpn(r, s))]
    if nf > 30 and f[30]:
        names += dt.xpns(nk1, 30, s)
    res["name"] = names
    if parts.tel_head or parts.tel31 or parts.tel_tail:
        res["telecom"] = parts.tel_head + parts.tel31 + parts.tel_tail
    addresses = parts.addresses + dt.xads(nk1, 32, s) if nf > 32 and f[32] else list(parts.addresses)
    if addresses:
        res["address"] = addresses
    if parts.gender:
        res["gender"] = parts.gender
    if nf > 16 and f[16] and (bd := dt.value(nk1, 16, ctx).strip()):
        res["birthDate"] = dt.dtm_at(bd, s, nk1, 16, kind="date")
    if parts.period:
        res["period"] = parts.period
    if nf > 20 and f[20] and (lang := dt.language(dt.rep_of(nk1, 20, ctx), ctx)):
        res["communication"] = [{"language": lang}]
    key = "|".join((patient_key, "NK1", name.get("family", ""), " ".join(name.get("given", ())), rel_code))
    return ctx.add("RelatedPerson", res, key=key)


def _texts(seg: Segment, field: int, ctx: ConvertContext) -> list[str]:
    """The non-blank repetitions of ``seg``-``field``, each unescaped as a whole and stripped."""
    d = ctx.message.delimiters
    raw = seg.fields[field]
    if d.escape and d.escape in raw:
        return [t for r in seg.reps(field) if (t := r.text.strip())]
    # nothing to unescape: the repetitions are the raw text's (what seg.reps(field) splits it into)
    return [t for x in raw.split(d.repetition) if (t := x.strip())]


def allergy(al1: Segment, ctx: ConvertContext, patient_ref: str, patient_key: str) -> str | None:
    """AL1 → AllergyIntolerance keyed by patient + allergen code (set ids are not stable)."""
    code = dt.cwe(dt.rep_of(al1, 3, ctx), ctx, field="AL1-3", seg=al1, at=3)
    if code is None:
        return None
    res: JSON = {
        "resourceType": "AllergyIntolerance",
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                    "code": "active",
                }
            ]
        },
    }
    f = al1.fields
    nf = len(f)
    # raw-field checks first: an empty field costs one index, not a parser call
    atype = dt.value(al1, 2, ctx).strip().upper() if nf > 2 and f[2] else ""
    if atype:
        cat = ALLERGY_CATEGORY.get(atype)
        if cat:
            res["category"] = [cat]
        elif atype not in ALLERGY_CATEGORY:
            dt.table(ctx, {}, atype, al1.loc(2), "0127")
    res["code"] = code
    res["patient"] = {"reference": patient_ref}
    sev = dt.value(al1, 4, ctx).strip().upper() if nf > 4 and f[4] else ""
    if crit := ALLERGY_CRITICALITY.get(sev):
        res["criticality"] = crit
    reactions = _texts(al1, 5, ctx) if nf > 5 and f[5] else None
    if reactions:
        reaction: JSON = {"manifestation": [{"text": t} for t in reactions]}
        if rsev := REACTION_SEVERITY.get(sev):
            reaction["severity"] = rsev
        res["reaction"] = [reaction]
    if nf > 6 and f[6] and (onset := dt.value(al1, 6, ctx).strip()):
        res["onsetDateTime"] = dt.dtm_at(onset, ctx.settings, al1, 6)
    c0 = code.get("coding", [{}])[0]
    key = "|".join((patient_key, "AL1", c0.get("system", ""), c0.get("code", "") or code.get("text", "")))
    return ctx.add("AllergyIntolerance", res, key=key)


def encounter_diagnoses(
    enc_ref: str | None, conditions: list[tuple[str, Segment]], ctx: ConvertContext
) -> None:
    """The Conditions of the DG1 segments → ``Encounter.diagnosis`` (IG DG1[Encounter]): use from DG1-6
    (table 0052 → diagnosis-role), rank from DG1-15."""
    if not enc_ref or not conditions:
        return
    enc = ctx.find(enc_ref)
    if enc is None:
        return
    diags = []
    for ref, dg1 in conditions:
        d: JSON = {"condition": {"reference": ref}}
        if role := DIAGNOSIS_ROLE.get(dt.value(dg1, 6, ctx).strip().upper()):
            d["use"] = {"coding": [{"system": DIAGNOSIS_ROLE_SYSTEM, "code": role[0], "display": role[1]}]}
        if (rank := dt.positive_int(dt.value(dg1, 15, ctx))) is not None:
            d["rank"] = rank
        diags.append(d)
    enc["diagnosis"] = diags


def condition(
    dg1: Segment, ctx: ConvertContext, patient_ref: str, patient_key: str, enc_ref: str | None
) -> str | None:
    """DG1 → Condition (encounter-diagnosis).  Key: DG1-20 identifier, else encounter (or patient) + code."""
    s = ctx.settings
    f = dg1.fields
    nf = len(f)
    # raw-field checks first: an empty field costs one index, not a parser call
    code = dt.cwe(dt.rep_of(dg1, 3, ctx), ctx, field="DG1-3", seg=dg1, at=3) if nf > 3 and f[3] else None
    desc = dt.value(dg1, 4, ctx).strip() if nf > 4 and f[4] else ""
    if code is None and desc:
        code = {"text": desc}
    elif code is not None and desc and "text" not in code:
        code["text"] = desc
    if code is None:
        return None
    res: JSON = {
        "resourceType": "Condition",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                        "code": "encounter-diagnosis",
                        "display": "Encounter Diagnosis",
                    }
                ]
            }
        ],
    }
    dtype = dt.value(dg1, 6, ctx).strip().upper() if nf > 6 and f[6] else ""
    deleted = nf > 21 and f[21] and dt.value(dg1, 21, ctx).strip().upper() == "D"
    ver = "entered-in-error" if deleted else DIAGNOSIS_VERIFICATION.get(dtype, "")
    if ver:
        res["verificationStatus"] = {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                    "code": ver,
                }
            ]
        }
    res["code"] = code
    res["subject"] = {"reference": patient_ref}
    if enc_ref:
        res["encounter"] = {"reference": enc_ref}
    if nf > 5 and f[5] and (onset := dt.value(dg1, 5, ctx).strip()):
        res["onsetDateTime"] = dt.dtm_at(onset, s, dg1, 5)
    if nf > 19 and f[19] and (rec := dt.value(dg1, 19, ctx).strip()):
        res["recordedDate"] = dt.dtm_at(rec, s, dg1, 19)
    asserter = dt.xcn(dt.rep_of(dg1, 16, ctx), ctx) if nf > 16 and f[16] else None
    if asserter and "reference" in asserter:
        res["asserter"] = asserter
    ident = dt.ei(dt.rep_of(dg1, 20, ctx), ctx) if nf > 20 and f[20] else None
    if ident and "system" in ident:
        res["identifier"] = [ident]
        return ctx.add("Condition", res, identifier=(ident["system"], ident["value"]))
    if ident:
        res["identifier"] = [ident]
    enc_key = ctx.key_of(enc_ref) if enc_ref else None
    c0 = code.get("coding", [{}])[0]
    key = "|".join(
        (enc_key or patient_key, "DG1", c0.get("system", ""), c0.get("code", "") or code.get("text", ""))
    )
    return ctx.add("Condition", res, key=key)


def subscriber(
    in1: Segment, ctx: ConvertContext, patient_ref: str, patient_key: str, insured_ids: list[JSON]
) -> str | None:
    """IN1-16.. (insured person, when IN1-17 is not self) → RelatedPerson (IG IN1-16 subscriber)."""
    s = ctx.settings
    name = dt.xpn(dt.rep_of(in1, 16, ctx), s)
    if name is None:
        return None
    res: JSON = {"active": True, "patient": {"reference": patient_ref}}
    if insured_ids:
        res["identifier"] = [dict(i) for i in insured_ids]
    rel = dt.rep_of(in1, 17, ctx)
    coding = _mapped_coding(
        rel.c(1), rel.c(2), rel.c(3), RELATIONSHIP, dt.V2_TABLE + "0063", ctx.coding_systems
    )
    if coding is not None:
        res["relationship"] = [{"coding": [coding]}]
    res["name"] = [name]
    if addr := dt.xads(in1, 19, s):
        res["address"] = addr
    gender = dt.table_at(ctx, dt.ADMINISTRATIVE_SEX, in1, 43, "0001")
    if gender:
        res["gender"] = gender
    if bd := dt.value(in1, 18, ctx).strip():
        res["birthDate"] = dt.dtm_at(bd, s, in1, 18, kind="date")
    key = "|".join(
        (patient_key, "IN1-16", name.get("family", ""), " ".join(name.get("given", [])), rel.c(1).strip())
    )
    ref = ctx.add("RelatedPerson", res, key=key)
    if (first := ctx.find(ref)) is not None and first is not res:
        # the same insured named by another IN1 of the message: their addresses and ids are facts too
        for field in ("address", "identifier"):
            for item in res.get(field, ()):
                if item not in (have := first.setdefault(field, [])):
                    have.append(item)
    return ref


_NO_PLAN: Final = ("", "", "")

_PRICE_TYPE: Final = {  # HL7 table 0205 (price type): CP-2
    "AP": "administrative price or handling fee",
    "DC": "direct unit cost",
    "IC": "indirect unit cost",
    "PF": "professional fee for performing provider",
    "TF": "technology fee for billing system",
    "TP": "total price",
    "UP": "unit price, may be based on length of procedure or service",
}


def policy_deductible(in1: Segment, ctx: ConvertContext) -> JSON | None:
    """IN1-37 policy deductible (CP: price as MO ``amount&currency`` ^ price type) → a
    Coverage.costToBeneficiary with ``valueMoney`` (the IG leaves IN1-37 unmapped; MS maps it so).  The
    deductible is not essential: an amount that is not an exact number is dropped with a located warning."""
    rep = dt.rep_of(in1, 37, ctx)
    amount = rep.c(1, 1).strip()
    if not amount:
        return None
    value = dt.nm_or_none(amount)
    if value is None:
        ctx.warn(
            "bad_policy_deductible",
            in1.loc(37, 1),  # IN1-37.1 (a shared Location: building one runs Python code)
            "the policy deductible is not an exact number: costToBeneficiary dropped",
        )
        return None
    money: JSON = {"value": value}
    if (currency := rep.c(1, 2).strip().upper()) and len(currency) == 3 and currency.isalpha():
        money["currency"] = currency
    out: JSON = {"valueMoney": money}
    if (ptype := rep.c(2).strip().upper()) in _PRICE_TYPE:
        out["type"] = {
            "coding": [{"system": dt.V2_TABLE + "0205", "code": ptype, "display": _PRICE_TYPE[ptype]}]
        }
    return out


def _payor(in1: Segment, ctx: ConvertContext, company_name: str, facility: str) -> JSON:
    """IN1-3 (company id), IN1-4 (name), IN1-5 (address) → the payor Organization entry; its Reference."""
    f = in1.fields
    nf = len(f)
    s = ctx.settings
    payor: JSON
    org: JSON = {"resourceType": "Organization", "active": True}
    if company_name:
        org["name"] = company_name
    if nf > 5 and f[5] and (addr := dt.xad(dt.rep_of(in1, 5, ctx), s)):
        org["address"] = [addr]
    org_ident = dt.cx(dt.rep_of(in1, 3, ctx), ctx) if nf > 3 and f[3] else None
    if org_ident and "system" in org_ident:
        org["identifier"] = [org_ident]
        payor = {
            "reference": ctx.add("Organization", org, identifier=(org_ident["system"], org_ident["value"]))
        }
    elif org_ident or company_name:
        if org_ident:
            org["identifier"] = [org_ident]
        okey = f"{facility}|payor|{org_ident['value'] if org_ident else ''}|{company_name}"
        payor = {"reference": ctx.add("Organization", org, key=okey)}
    else:
        payor = {"display": "unknown payor"}
    return payor


def coverage(
    in1: Segment, ctx: ConvertContext, patient_ref: str, patient_key: str, in2: Segment | None = None
) -> str | None:
    """IN1 → Coverage (+ payor Organization).  Key: patient + company id + plan + policy number."""
    s = ctx.settings
    f = in1.fields
    nf = len(f)
    # raw-field checks first: an empty field costs one index, not a parser call
    company_code = dt.value(in1, 3, ctx).strip() if nf > 3 and f[3] else ""
    company_name = dt.value(in1, 4, ctx).strip() if nf > 4 and f[4] else ""
    plan_c = in1.cs(2, 3) if nf > 2 and f[2] else _NO_PLAN  # IN1-2 health plan: id, text, coding system
    plan = plan_c[0].strip()
    policy = dt.value(in1, 36, ctx).strip() if nf > 36 and f[36] else ""
    if not (company_code or company_name or plan or policy):
        return None
    # the payor: a function of IN1-3..5, the sending facility and the settings; an insurer recurs across a
    # feed's messages, so its Organization entry is kept per channel (datatypes.kept_with_entries)
    facility = ctx.message.msh.get(4, 1).strip()
    pkey = (
        "IN1-payor",
        ctx.delim_key,
        f"{f[3] if nf > 3 else ''}{ctx.delimiters.field}{f[4] if nf > 4 else ''}"
        f"{ctx.delimiters.field}{f[5] if nf > 5 else ''}",
        facility,
    )
    kept = dt.kept_with_entries(ctx, pkey)
    if kept is not None:
        payor: JSON = dict(kept[0])
    else:
        mark = dt.piece_mark(ctx)
        rec = ctx.record()
        try:
            payor = _payor(in1, ctx, company_name, facility)
        finally:
            if rec is not None:
                ctx.stop_recording()
        if rec is not None:
            dt.keep_with_entries(ctx, pkey, payor, mark, rec)
    res: JSON = {"resourceType": "Coverage", "status": "active"}
    idents: list[JSON] = []
    # IN1-2 health plan id (CWE → Identifier, IG), IN1-36 policy number, IN1-49 insured's id,
    # IN2-6 / IN2-8 Medicare / Medicaid numbers of the same insurance group
    if plan:
        plan_ident: JSON = {"value": plan}
        if (psys := plan_c[2].strip()) and (plan_system := dt.code_system(psys, ctx.coding_systems)):
            plan_ident["system"] = plan_system
        idents.append(plan_ident)
    if policy:
        idents.append({"value": policy})
        res["subscriberId"] = policy
    insured_ids = [i for r in in1.reps(49) if (i := dt.cx(r, ctx))] if nf > 49 and f[49] else []
    idents.extend(insured_ids)
    if in2 is not None:
        f2 = in2.fields
        for field, system in ((6, MEDICARE_SYSTEM), (8, MEDICAID_SYSTEM)):
            if field < len(f2) and f2[field] and (v := in2.get(field).strip()):
                idents.append({"system": system, "value": v})
    if idents:
        res["identifier"] = idents
    if nf > 15 and f[15] and (ptype := dt.cwe(dt.rep_of(in1, 15, ctx), ctx, seg=in1, at=15)):
        for coding in ptype.get("coding", ()):
            if "system" not in coding and coding["code"].upper() in ACT_CODE_PLAN_TYPES:
                coding["system"] = ACT_CODE
        res["type"] = ptype
    res["beneficiary"] = {"reference": patient_ref}
    rel_code = dt.value(in1, 17, ctx).strip().upper() if nf > 17 and f[17] else ""
    rel = SUBSCRIBER_RELATIONSHIP.get(rel_code) if rel_code else None
    if rel:
        res["relationship"] = {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/subscriber-relationship",
                    "code": rel,
                }
            ]
        }
    if rel == "self":
        res["subscriber"] = {"reference": patient_ref}
    elif rel_code and (sub := subscriber(in1, ctx, patient_ref, patient_key, insured_ids)):
        res["subscriber"] = {"reference": sub}
    if nf > 12 and (f[12] or (nf > 13 and f[13])):
        p = dt.period_at(dt.value(in1, 12, ctx), dt.value(in1, 13, ctx), s, in1, 12, 13)
        if p:
            res["period"] = p
    if nf > 37 and f[37] and (cost := policy_deductible(in1, ctx)):
        res["costToBeneficiary"] = [cost]
    res["payor"] = [payor]
    classes: list[JSON] = []
    cls_sys = "http://terminology.hl7.org/CodeSystem/coverage-class"
    if nf > 8 and f[8] and (group := dt.value(in1, 8, ctx).strip()):
        cl: JSON = {"type": {"coding": [{"system": cls_sys, "code": "group"}]}, "value": group}
        if nf > 9 and f[9] and (gname := dt.value(in1, 9, ctx).strip()):
            cl["name"] = gname
        classes.append(cl)
    if plan:
        cl = {"type": {"coding": [{"system": cls_sys, "code": "plan"}]}, "value": plan}
        if pname := plan_c[1].strip():
            cl["name"] = pname
        classes.append(cl)
    if classes:
        res["class"] = classes
    key = "|".join((patient_key, "IN1", company_code or company_name, plan, policy))
    return ctx.add("Coverage", res, key=key)


# ---------------------------------------------------------------------------
# A40 merge
# ---------------------------------------------------------------------------
def merge(msg: Message, ctx: ConvertContext, survivor_ref: str, survivor_key: str) -> None:
    """A40: survivor (PID) gets ``link replaces``; the prior patient (MRG-1) gets ``replaced-by`` and
    ``active: false``.  The prior patient's key goes into ``requires`` so the engine answers AE 204
    when it does not exist (unless ``unknown_prior_patient: accept``)."""
    mrg = msg.first("MRG")
    if mrg is None:
        raise ConversionError(
            "patient merge without an MRG segment: send MRG-1 with the prior patient identifier",
            code="100",
            location=Location("MRG", 1),
        )
    system, value, _rep = key_identifier(mrg, 1, ctx)
    old_key = conditional_url("Patient", system, value)
    if old_key == survivor_key:
        raise ConversionError(
            "patient merge: the prior patient identifier (MRG-1) is the surviving patient's identifier",
            code="204",
            location=mrg.loc(1),
        )
    old: JSON = {"active": False}
    idents: list[JSON] = []
    for r in mrg.reps(1):
        if i := dt.cx(r, ctx):
            if r.c(1).strip() == value and "system" not in i:
                i["system"] = system
            idents.append(i)
    old["identifier"] = idents
    if name := dt.xpn(mrg.rep(7), ctx.settings):
        old["name"] = [name]
    old["link"] = [{"other": {"reference": survivor_ref}, "type": "replaced-by"}]
    old_ref = ctx.add("Patient", old, identifier=(system, value))
    survivor = ctx.find(survivor_ref)
    if survivor is not None:
        survivor.setdefault("link", []).append({"other": {"reference": old_ref}, "type": "replaces"})
    if ctx.settings.unknown_prior_patient == "error":
        ctx.require(old_key)
    else:
        ctx.count("prior_patient_unverified")
