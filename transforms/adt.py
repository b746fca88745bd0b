"""ADT → FHIR: Patient, Encounter, RelatedPerson, AllergyIntolerance, Condition, Coverage,
Practitioner, Location (HL7 V2-to-FHIR IG segment maps; choices where it is silent in docs/mapping.md).

Supported triggers: A01-A16, A25-A28, A31, A40, A60.  Identity-changing events that need a
human-reviewed workflow (A29 delete, A41 account merge, A45 move visit, A47 identifier change, ...)
are AR 201 so they are never half-applied.
"""

from __future__ import annotations

from urllib.parse import quote

from engine.errors import ConversionError, Location, MessageRejected
from engine.hl7 import Message, Rep, Segment
from transforms import datatypes as dt
from transforms.bundle import ConvertContext, conditional_url
from transforms.datatypes import JSON
from transforms.settings import DERIVED_SYSTEM_PREFIX

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"

PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
# IG PV2[Encounter]: PV2-8 / PV2-9 (the IG's PV2-9 URL has a stray "v\"; this is the published one)
PLANNED_START = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Encounter.plannedStartDate"
PLANNED_END = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Encounter.plannedEndDate"

# Trigger → Encounter.status (IG Event[EncounterStatus]); None = derived from the PV1 data.
ENCOUNTER_STATUS: dict[str, str | None] = {
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
    "A25": "in-progress",
    "A26": "in-progress",
    "A27": "cancelled",
    "A28": None,
    "A31": None,
    "A60": None,
}
MERGE_TRIGGERS = ("A40",)
SUPPORTED = frozenset(ENCOUNTER_STATUS) | frozenset(MERGE_TRIGGERS)

PATIENT_CLASS = {
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
CLASS_UNKNOWN = {"system": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor", "code": "UNK", "display": "unknown"}

MARITAL = {
    "A": "A", "D": "D", "I": "I", "L": "L", "M": "M", "C": "C", "P": "P", "T": "T", "U": "U", "S": "S", "W": "W",
    "N": "A", "B": "U", "E": "L", "G": "T", "O": "UNK", "R": "T",
}
MARITAL_DISPLAY = {
    "A": "Annulled", "D": "Divorced", "I": "Interlocutory", "L": "Legally Separated", "M": "Married",
    "C": "Common Law", "P": "Polygamous", "T": "Domestic partner", "U": "unmarried", "S": "Never Married",
    "W": "Widowed", "UNK": "unknown",
}
ALLERGY_CATEGORY = {
    "DA": "medication", "MC": "medication", "FA": "food", "EA": "environment", "AA": "environment",
    "PA": "environment", "LA": "environment", "MA": None,
}
ALLERGY_CRITICALITY = {"SV": "high", "MO": "low", "MI": "low", "U": "unable-to-assess"}
REACTION_SEVERITY = {"SV": "severe", "MO": "moderate", "MI": "mild"}
DIAGNOSIS_VERIFICATION = {"A": "provisional", "W": "provisional", "F": "confirmed", "P": "provisional"}
SUBSCRIBER_RELATIONSHIP = {
    "SEL": "self", "SPO": "spouse", "CHD": "child", "PAR": "parent", "FTH": "parent", "MTH": "parent",
    "DOM": "common", "EME": "other", "OTH": "other", "01": "spouse", "18": "self", "19": "child",
}
EMERGENCY_CONTACT_ROLES = ("EMR", "E", "F", "I", "S")
ROLE_CODE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
# IG ConceptMap Relationship (table 0063 → v3-RoleCode, or v2-0131 for the contact roles)
RELATIONSHIP: dict[str, tuple[str, str, str]] = {
    "SEL": (ROLE_CODE, "ONESELF", "self"), "SPO": (ROLE_CODE, "SPS", "spouse"),
    "DOM": (ROLE_CODE, "SIGOTHR", "significant other"), "CHD": (ROLE_CODE, "CHILD", "child"),
    "GCH": (ROLE_CODE, "GRNDCHILD", "grandchild"), "NCH": (ROLE_CODE, "NCHILD", "natural child"),
    "SCH": (ROLE_CODE, "STPCHLD", "step child"), "FCH": (ROLE_CODE, "CHLDFOST", "foster child"),
    "DEP": (ROLE_CODE, "DEP", "Handicapped dependent"), "WRD": (ROLE_CODE, "WRD", "Ward of court"),
    "PAR": (ROLE_CODE, "PRN", "parent"), "MTH": (ROLE_CODE, "MTH", "mother"), "FTH": (ROLE_CODE, "FTH", "father"),
    "CGV": (ROLE_CODE, "CGV", "Care giver"), "GRD": (ROLE_CODE, "GRD", "Guardian"),
    "GRP": (ROLE_CODE, "GRPRN", "grandparent"), "EXF": (ROLE_CODE, "EXT", "extended family member"),
    "SIB": (ROLE_CODE, "SIB", "sibling"), "BRO": (ROLE_CODE, "BRO", "brother"), "SIS": (ROLE_CODE, "SIS", "sister"),
    "FND": (ROLE_CODE, "FRND", "unrelated friend"), "OAD": (ROLE_CODE, "OAD", "Other adult"),
    "EME": (ROLE_CODE, "EME", "Employee"), "EMR": (dt.V2_TABLE + "0131", "E", "Employer"),
    "ASC": (ROLE_CODE, "ASC", "Associate"), "EMC": (dt.V2_TABLE + "0131", "C", "Emergency Contact"),
    "OWN": (ROLE_CODE, "OWN", "Owner"), "TRA": (ROLE_CODE, "TRA", "Trainer"), "MGR": (ROLE_CODE, "MGR", "Manager"),
    "NON": (ROLE_CODE, "NON", "None"), "UNK": (dt.V2_TABLE + "0131", "U", "Unknown"),
    "OTH": (dt.V2_TABLE + "0131", "O", "Other"),
}
# IG ConceptMap ContactRole (table 0131, identity)
CONTACT_ROLE = {
    "E": "Employer", "C": "Emergency Contact", "F": "Federal Agency", "I": "Insurance Company",
    "N": "Next-of-Kin", "S": "State Agency", "O": "Other", "U": "Unknown",
}
# PV2-25 visit priority (table 0217) → v3-ActPriority
VISIT_PRIORITY = {"1": ("EM", "emergency"), "2": ("UR", "urgent"), "3": ("EL", "elective")}
ACT_PRIORITY = "http://terminology.hl7.org/CodeSystem/v3-ActPriority"
# DG1-6 diagnosis type (table 0052) → Encounter.diagnosis.use (diagnosis-role)
DIAGNOSIS_ROLE = {"A": ("AD", "Admission diagnosis"), "F": ("DD", "Discharge diagnosis")}
DIAGNOSIS_ROLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/diagnosis-role"
# IN1-15 plan types that are v3-ActCode insurance policy codes (a CWE without a coding system)
ACT_CODE_PLAN_TYPES = frozenset({
    "HMO", "PPO", "POS", "EHCPOL", "HSAPOL", "AUTOPOL", "COL", "UNINSMOT", "PUBLICPOL", "DENTPRG", "DISEASEPRG",
    "CANPRG", "ENDRENAL", "HIVAIDS", "MANDPOL", "MENTPRG", "SAFNET", "SUBPRG", "SUBSIDIZ", "SUBSIDMC", "SUBSUPP",
    "WCBPOL", "INSPOL", "DENTAL", "DISEASE", "DRUGPOL", "HIP", "LTC", "MCPOL", "MENTPOL", "SUBSIDFFS", "VISPOL",
    "WORKCOMP", "MEDICARE", "MEDICAID", "CHAR",
})
MEDICARE_SYSTEM = "http://hl7.org/fhir/sid/us-medicare"
MEDICAID_SYSTEM = "http://hl7.org/fhir/sid/us-medicaid"


# ---------------------------------------------------------------------------
def convert(msg: Message, ctx: ConvertContext) -> None:
    """Add the ADT message's resources to ``ctx``."""
    trigger = msg.trigger
    if not trigger:
        evn = msg.first("EVN")
        trigger = evn.get(1).strip().upper() if evn is not None else ""
    if trigger not in SUPPORTED:
        raise MessageRejected(
            f"ADT trigger {trigger or '(empty)'!r} is not supported by the FHIR conversion",
            code="201",
            location=Location("MSH", 1, 9, None, 2),
        )
    pid = msg.first("PID")
    if pid is None:
        raise ConversionError("ADT message has no PID segment", code="100", location=Location("PID", 1))
    patient_ref, patient_key = patient(pid, msg, ctx)
    if trigger in MERGE_TRIGGERS:
        merge(msg, ctx, patient_ref, patient_key)
        return
    enc_ref = encounter(msg, ctx, trigger, patient_ref, patient_key)
    mother(pid, ctx, patient_ref, patient_key)
    roles(msg, ctx, patient_ref, enc_ref)
    observations(msg, ctx, patient_key, enc_ref)
    for nk1 in msg.all("NK1"):
        related_person(nk1, ctx, patient_ref, patient_key)
    for al1 in msg.all("AL1"):
        allergy(al1, ctx, patient_ref, patient_key)
    conditions: list[tuple[str, Segment]] = []
    for dg1 in msg.all("DG1"):
        ref = condition(dg1, ctx, patient_ref, patient_key, enc_ref)
        if ref:
            conditions.append((ref, dg1))
    if enc_ref and conditions:
        enc = ctx.find(enc_ref)
        if enc is not None:
            diags = []
            for ref, dg1 in conditions:
                d: JSON = {"condition": {"reference": ref}}
                if role := DIAGNOSIS_ROLE.get(dg1.get(6).strip().upper()):
                    d["use"] = {"coding": [{"system": DIAGNOSIS_ROLE_SYSTEM, "code": role[0], "display": role[1]}]}
                rank = dg1.get(15).strip()
                if rank.isdigit() and int(rank) > 0:
                    d["rank"] = int(rank)
                diags.append(d)
            enc["diagnosis"] = diags
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
_RANK = {"mapped": 0, "oid": 1, "uuid": 1, "uri": 1, "derived": 2}


def key_identifier(seg: Segment, field: int, ctx: ConvertContext) -> tuple[str, str, Rep]:
    """The match rule: the patient key among the CX repetitions of ``seg``-``field``.

    Prefer an authority listed in ``identifier_systems``, then one with an ISO OID / UUID / URI,
    then a derived system (``derive_unknown_systems``); first repetition wins within a rank.
    SSN-type identifiers (CX-5 = SS) are never keys.  If none has a system: the channel's
    ``default_identifier_system`` for the first repetition, else AE 204 (AE 101 if the field is empty).
    """
    reps = [r for r in seg.reps(field) if r.cs(5)[0].strip()]
    if not reps:
        ctx.count("identifier_match_failure")
        raise ConversionError(f"{seg.name}-{field} (patient identifier) is empty", code="101", location=seg.loc(field))
    best: tuple[int, int, str, Rep] | None = None
    for i, r in enumerate(reps):
        if r.cs(5)[4].strip().upper() == "SS":
            continue
        system, how = dt.hd_system(ctx, *r.hd(4))
        if system is None:
            continue
        cand = (_RANK.get(how, 3), i, system, r)
        if best is None or cand[:2] < best[:2]:
            best = cand
    if best is not None:
        if best[0] == 2:
            ctx.count("identifier_system_derived")
        return best[2], best[3].c(1).strip(), best[3]
    default = ctx.settings.default_identifier_system
    usable = [r for r in reps if r.c(5).strip().upper() != "SS"]
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
        f"{seg.name}-{field}: no patient identifier has an assigning authority (CX-4) with a known system",
        code="204",
        location=seg.loc(field),
    )


def patient(pid: Segment, msg: Message, ctx: ConvertContext, *, create_only: bool = False) -> tuple[str, str]:
    """PID (+PD1, NK1 contacts) → Patient.  Returns (reference, resource key).

    ADT writes it as a conditional update (the ADT feed is the authority); ORU and SIU pass
    ``create_only=True`` (conditional create: never overwrite the richer ADT Patient).

    Hot path: raw fields are tested before any datatype call, so empty fields cost one index."""
    s = ctx.settings
    system, value, key_rep = key_identifier(pid, 3, ctx)
    f = pid.fields
    nf = len(f)
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
            if r is key_rep or (field == 3 and r.raw == key_raw):
                ident["system"] = system
            sv = (ident.get("system"), ident["value"])
            if sv not in seen:
                seen.add(sv)
                idents.append(ident)
    if nf > 19 and (ssn := pid.get(19).strip()):
        idents.append({"type": dt.identifier_type("SS"), "system": dt.SSN_SYSTEM, "value": ssn})
    if nf > 20 and f[20]:
        dln = pid.rep(20)
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
    if nf > 8 and f[8] and (gender := dt.table(ctx, dt.ADMINISTRATIVE_SEX, pid.get(8), pid.loc(8), "0001")):
        res["gender"] = gender
    dob = pid.get(7).strip() if nf > 7 and f[7] else ""
    if dob:
        res["birthDate"] = dt.dtm_at(dob, s, pid, 7, kind="date")
        if len(dob) > 8 and dob[8:10].isdigit():
            birth_time = dt.dtm_at(dob, s, pid, 7)
            res["_birthDate"] = {
                "extension": [
                    {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime", "valueDateTime": birth_time}
                ]
            }
    if nf > 29:
        death_dt = pid.get(29).strip()
        death_ind = pid.get(30).strip().upper()
        if death_dt:
            res["deceasedDateTime"] = dt.dtm_at(death_dt, s, pid, 29)
        elif death_ind in ("Y", "N"):
            res["deceasedBoolean"] = death_ind == "Y"
    if nf > 11 and f[11]:
        addresses = dt.xads(pid, 11, s)
        county = pid.get(12).strip()
        if county and len(addresses) == 1 and "district" not in addresses[0]:
            addresses[0]["district"] = county
        if addresses:
            res["address"] = addresses
    if nf > 16 and f[16]:
        marital = pid.rep(16)
        if marital:
            code = marital.c(1).strip().upper()
            mapped = MARITAL.get(code)
            if mapped:
                coding = {"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": mapped,
                          "display": MARITAL_DISPLAY[mapped]}
                if mapped == "UNK":
                    coding["system"] = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"
                res["maritalStatus"] = {"coding": [coding]}
                if text := marital.c(2).strip():
                    res["maritalStatus"]["text"] = text
            elif cc := dt.cwe(marital, ctx, pid.loc(16)):
                res["maritalStatus"] = cc
    if nf > 24:
        mbi = pid.get(24).strip().upper()
        order = pid.get(25).strip()
        if order.isdigit() and mbi != "N":
            res["multipleBirthInteger"] = int(order)
        elif mbi in ("Y", "N"):
            res["multipleBirthBoolean"] = mbi == "Y"
    if nf > 15 and f[15]:
        lang = pid.rep(15)
        if lang and (cc := dt.language(lang, ctx, pid.loc(15))):
            res["communication"] = [{"language": cc, "preferred": True}]
    if nf > 6 and f[6]:
        mmn = pid.rep(6)
        if mmn and (family := mmn.c(1, 1).strip()):
            res["extension"] = [
                {"url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName", "valueString": family}
            ]
    pd1 = msg.first("PD1")
    if pd1 is not None:
        gps = [gp for r in pd1.reps(4) if (gp := dt.xcn(r, ctx, pd1.loc(4)))]
        if gps:
            res["generalPractitioner"] = gps
    contacts = [c for nk1 in msg.all("NK1") if (c := patient_contact(nk1, ctx))]
    if contacts:
        res["contact"] = contacts
    ref = ctx.add("Patient", res, identifier=(system, value), create_only=create_only)
    ctx.patient_ref = ref
    return ref, conditional_url("Patient", system, value)


def _xtns(seg: Segment, f: list[str], nf: int, field: int, default_use: str | None = None) -> list[JSON]:
    """XTN repetitions of ``field``; [] without a call into the parser when the raw field is empty."""
    if field < nf and f[field]:
        return dt.xtns(seg, field, default_use)
    return []


class _NK1:
    """What Patient.contact and the RelatedPerson of one NK1 both map (computed once per NK1 and message).

    The pieces may end up in both resources: the Bundle is read-only once built.  ``events``: what
    computing them counted, counted again for the second user (as when each mapped the NK1 itself)."""

    __slots__ = ("addresses", "events", "first_address", "gender", "name", "period", "rels", "telecom")

    def __init__(self, nk1: Segment, ctx: ConvertContext):
        s = ctx.settings
        f = nk1.fields
        nf = len(f)
        counted = ctx.events
        before = dict(counted)
        self.rels = nk1_relationships(nk1, ctx)
        self.name = dt.xpn(nk1.rep(2), s) if nf > 2 and f[2] else None
        self.telecom = {n: _xtns(nk1, f, nf, n, use) for n, use in _NK1_TELECOM}
        per_rep = [dt.xad(r, s) for r in nk1.reps(4)] if nf > 4 and f[4] else []
        self.first_address = per_rep[0] if per_rep else None
        self.addresses = [a for a in per_rep if a is not None]
        self.gender = (dt.table(ctx, dt.ADMINISTRATIVE_SEX, nk1.get(15), nk1.loc(15), "0001")
                       if nf > 15 and f[15] else None)
        self.period = (dt.period_at(nk1.get(8), nk1.get(9), s, nk1, 8, 9)
                       if nf > 8 and (f[8] or (nf > 9 and f[9])) else None)
        self.events = [(k, n - before.get(k, 0)) for k, n in counted.items() if n != before.get(k, 0)]


_NK1_TELECOM = ((5, "home"), (6, "work"), (31, None), (40, None), (41, None))


def _nk1(nk1: Segment, ctx: ConvertContext) -> tuple[_NK1, bool]:
    """The shared NK1 pieces, and whether they were computed before in this message."""
    key = ("NK1", id(nk1))
    hit: _NK1 | None = ctx.memo.get(key)
    if hit is not None:
        return hit, True
    hit = ctx.memo[key] = _NK1(nk1, ctx)
    return hit, False


def patient_contact(nk1: Segment, ctx: ConvertContext) -> JSON | None:
    """NK1 → Patient.contact (every NK1; the IG also makes a RelatedPerson for non-emergency roles)."""
    parts, again = _nk1(nk1, ctx)
    if again:
        for event, times in parts.events:
            ctx.count(event, times)
    f = nk1.fields
    nf = len(f)
    c: JSON = {}
    if parts.rels:
        c["relationship"] = list(parts.rels)
    if parts.name:
        c["name"] = parts.name
    tel = parts.telecom
    telecom = tel[5] + tel[6] + tel[40] + tel[41]
    if telecom:
        c["telecom"] = telecom
    if parts.first_address:
        c["address"] = parts.first_address
    if parts.gender:
        c["gender"] = parts.gender
    if parts.period:
        c["period"] = parts.period
    if nf > 13 and (org_name := nk1.get(13).strip()):
        c["organization"] = {"display": org_name}
    if not ("name" in c or "telecom" in c or "address" in c or "organization" in c):
        return None
    return c


def _mapped_coding(code: str, display: str, sysname: str, table_map: dict[str, tuple[str, str, str]],
                   default_system: str) -> JSON | None:
    code = dt.fhir_code(code)
    if not code:
        return None
    hit = table_map.get(code.upper())
    if hit is not None and sysname.strip().upper() in ("", "HL70063", "HL70131", "HL7-0063", "HL7-0131", "ACR"):
        return {"system": hit[0], "code": hit[1], "display": hit[2]}
    c: JSON = {"system": dt.code_system(sysname) or default_system, "code": code}
    if display.strip():
        c["display"] = display.strip()
    return c


def nk1_relationships(nk1: Segment, ctx: ConvertContext) -> list[JSON]:
    """NK1-3 (relationship, IG ConceptMap Relationship: 0063 → v3-RoleCode / v2-0131) and NK1-7 (contact
    role, table 0131) → CodeableConcepts.  Both triplets of each CWE are mapped."""
    out: list[JSON] = []
    rel = nk1.rep(3)
    if rel:
        codings = [c for c in (
            _mapped_coding(rel.c(1), rel.c(2), rel.c(3), RELATIONSHIP, dt.V2_TABLE + "0063"),
            _mapped_coding(rel.c(4), rel.c(5), rel.c(6), RELATIONSHIP, dt.V2_TABLE + "0063"),
        ) if c is not None]
        if codings:
            cc: JSON = {"coding": codings}
            if (text := rel.c(2).strip()) and text != codings[0].get("display"):
                cc["text"] = text  # the sender's own wording, kept next to the mapped code
            out.append(cc)
    role = nk1.rep(7)
    if role:
        code = dt.fhir_code(role.c(1))
        if code.upper() in CONTACT_ROLE:
            out.append({"coding": [{"system": dt.V2_TABLE + "0131", "code": code.upper(),
                                    "display": CONTACT_ROLE[code.upper()]}]})
        elif (hit := RELATIONSHIP.get(code.upper())) is not None and hit[0] == dt.V2_TABLE + "0131":
            # a table-0063 contact code sent in NK1-7 (EMC, EMR, UNK, OTH): the Relationship map's 0131 code
            out.append({"coding": [{"system": hit[0], "code": hit[1], "display": hit[2]}]})
        elif role_cc := dt.cwe(role, ctx, nk1.loc(7)):
            for coding in role_cc.get("coding", ()):
                coding.setdefault("system", dt.V2_TABLE + "0131")
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


def encounter(msg: Message, ctx: ConvertContext, trigger: str, patient_ref: str, patient_key: str, *,
              create_only: bool = False) -> str | None:
    """PV1/PV2 → Encounter keyed by PV1-19 (visit number).  No visit number and no admit time → no
    Encounter (counted ``encounter_without_key``): an unkeyed Encounter would duplicate on every update."""
    pv1 = msg.first("PV1")
    if pv1 is None:
        return None
    s = ctx.settings
    f = pv1.fields
    nf = len(f)
    visit = pv1.rep(19)
    visit_no = visit.c(1).strip()
    admit = pv1.get(44).strip()
    res: JSON = {"resourceType": "Encounter"}
    status = ENCOUNTER_STATUS.get(trigger) or _derived_status(pv1)
    res["status"] = status
    cls = pv1.get(2).strip().upper()
    if cls:
        hit = PATIENT_CLASS.get(cls)
        if hit is None:
            dt.table(ctx, {}, cls, pv1.loc(2), "0004")
            res["class"] = dict(CLASS_UNKNOWN)
        else:
            res["class"] = {"system": hit[0], "code": hit[1], "display": hit[2]}
    else:
        res["class"] = dict(CLASS_UNKNOWN)
    if nf > 4 and (adm_type := pv1.get(4).strip()):
        res["type"] = [dt.coded_table(adm_type, "0007")]
    if nf > 10 and (service := pv1.get(10).strip()):
        res["serviceType"] = dt.coded_table(service, "0069")
    res["subject"] = {"reference": patient_ref}
    participants: list[JSON] = []
    pv2 = msg.first("PV2")
    sources: list[tuple[Segment, int, str, str]] = [
        (pv1, 7, "ATND", "attender"), (pv1, 8, "REF", "referrer"), (pv1, 9, "CON", "consultant"),
        (pv1, 17, "ADM", "admitter"), (pv1, 52, "PART", "Participation"),
    ]
    if pv2 is not None:
        sources.append((pv2, 13, "REF", "referrer"))  # PV2-13 referral source
    for seg, field, code, display in sources:
        sf = seg.fields
        if field >= len(sf) or not sf[field]:
            continue
        for r in seg.reps(field):
            who = dt.xcn(r, ctx)
            if who:
                participants.append({
                    "type": [{"coding": [{"system": PARTICIPATION, "code": code, "display": display}]}],
                    "individual": who,
                })
    if participants:
        res["participant"] = participants
    if admit or (nf > 45 and f[45]):
        p = dt.period_at(admit, pv1.get(45), s, pv1, 44, 45)
        if p:
            res["period"] = p
    locations: list[JSON] = []
    loc_status_current = "completed" if status in ("finished", "cancelled") else (
        "planned" if status == "planned" else "active")
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
    if nf > 5 and f[5] and (pre := dt.cx(pv1.rep(5), ctx, pv1.loc(5))):
        hosp["preAdmissionIdentifier"] = pre
    if nf > 13:
        if src := pv1.get(14).strip():
            hosp["admitSource"] = dt.coded_table(src, "0023")
        if readm := pv1.get(13).strip():
            hosp["reAdmission"] = dt.coded_table(readm, "0092")
        if arr := pv1.get(15).strip():
            hosp["specialArrangement"] = [dt.coded_table(arr, "0009")]
    if nf > 36:
        if disp := pv1.get(36).strip():
            hosp["dischargeDisposition"] = dt.coded_table(disp, "0112")
        if diet := pv1.get(38).strip():
            hosp["dietPreference"] = [{"coding": [{"code": diet}]}]
    if hosp:
        res["hospitalization"] = hosp
    if pv2 is not None:
        reasons = dt.cwes(pv2, 3, ctx)
        if reasons:
            res["reasonCode"] = reasons
        pf = pv2.fields
        npf = len(pf)
        exp_admit = pv2.get(8).strip() if npf > 8 and pf[8] else ""
        exp_disch = pv2.get(9).strip() if npf > 9 and pf[9] else ""
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
        prio = pv2.rep(25)
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
    alternates = [i for r in pv1.reps(50) if (i := dt.cx(r, ctx, pv1.loc(50)))] if nf > 50 and f[50] else []
    if visit_no:
        ident = dt.cx(visit, ctx, pv1.loc(19)) or {"value": visit_no}
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
    if any(pv1.get(n).strip() for n in (3, 7, 44)) or trigger not in ("A28", "A31", "A08", "A60"):
        ctx.count("encounter_without_key")
    return None


# ---------------------------------------------------------------------------
# ROL, OBX
# ---------------------------------------------------------------------------
def mother(pid: Segment, ctx: ConvertContext, patient_ref: str, patient_key: str) -> str | None:
    """PID-21 mother's identifier → RelatedPerson (IG CX[RelatedPerson-Mother]: relationship MTH)."""
    idents = [i for r in pid.reps(21) if (i := dt.cx(r, ctx, pid.loc(21)))]
    if not idents:
        return None
    res: JSON = {
        "active": True, "patient": {"reference": patient_ref}, "identifier": idents,
        "relationship": [{"coding": [{"system": ROLE_CODE, "code": "MTH", "display": "mother"}]}],
    }
    if (mmn := pid.rep(6)) and (name := dt.xpn(mmn, ctx.settings)):
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
        who = dt.xcn(seg.rep(4), ctx, seg.loc(4))
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
            if cc := dt.cwe(role, ctx, seg.loc(3)):
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
        oru.observation(obx, notes.get(id(obx), []), ctx, key_prefix=f"{patient_key}|adt-observation", obr=None,
                        obr_status_code="", seen=seen, enc=enc_ref)


# ---------------------------------------------------------------------------
# NK1, AL1, DG1, IN1
# ---------------------------------------------------------------------------
def related_person(nk1: Segment, ctx: ConvertContext, patient_ref: str, patient_key: str) -> str | None:
    """NK1 → RelatedPerson (IG: only when NK1-3 is not an emergency-contact role)."""
    rel = nk1.rep(3)
    if rel.c(1).strip().upper() in EMERGENCY_CONTACT_ROLES:
        return None
    s = ctx.settings
    f = nk1.fields
    nf = len(f)
    if not (nf > 2 and f[2]):
        return None  # no name (dt.xpn of an empty repetition)
    parts, again = _nk1(nk1, ctx)
    name = parts.name
    if name is None:
        return None
    res: JSON = {"resourceType": "RelatedPerson", "active": True, "patient": {"reference": patient_ref}}
    idents = [i for n in (12, 33) if n < nf and f[n] for r in nk1.reps(n) if (i := dt.cx(r, ctx, nk1.loc(n)))]
    if ssn := nk1.get(37).strip():
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
    names = [name, *(n for r in nk1.reps(2)[1:] if (n := dt.xpn(r, s)))]
    if nf > 30 and f[30]:
        names += dt.xpns(nk1, 30, s)
    res["name"] = names
    tel = parts.telecom
    telecom = tel[5] + tel[6] + tel[31] + tel[40] + tel[41]
    if telecom:
        res["telecom"] = telecom
    addresses = list(parts.addresses)
    if nf > 32 and f[32]:
        addresses += dt.xads(nk1, 32, s)
    if addresses:
        res["address"] = addresses
    if parts.gender:
        res["gender"] = parts.gender
    if nf > 16 and (bd := nk1.get(16).strip()):
        res["birthDate"] = dt.dtm_at(bd, s, nk1, 16, kind="date")
    if parts.period:
        res["period"] = parts.period
    if nf > 20 and f[20] and (lang := dt.language(nk1.rep(20), ctx, nk1.loc(20))):
        res["communication"] = [{"language": lang}]
    key = "|".join((patient_key, "NK1", name.get("family", ""), " ".join(name.get("given", [])), rel.c(1).strip()))
    return ctx.add("RelatedPerson", res, key=key)


def allergy(al1: Segment, ctx: ConvertContext, patient_ref: str, patient_key: str) -> str | None:
    """AL1 → AllergyIntolerance keyed by patient + allergen code (set ids are not stable)."""
    code = dt.cwe(al1.rep(3), ctx, al1.loc(3), field="AL1-3")
    if code is None:
        return None
    res: JSON = {
        "resourceType": "AllergyIntolerance",
        "clinicalStatus": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active",
        }]},
    }
    atype = al1.get(2).strip().upper()
    if atype:
        cat = ALLERGY_CATEGORY.get(atype)
        if cat:
            res["category"] = [cat]
        elif atype not in ALLERGY_CATEGORY:
            dt.table(ctx, {}, atype, al1.loc(2), "0127")
    res["code"] = code
    res["patient"] = {"reference": patient_ref}
    sev = al1.get(4).strip().upper()
    if crit := ALLERGY_CRITICALITY.get(sev):
        res["criticality"] = crit
    reactions = [t for r in al1.reps(5) if (t := r.text.strip())]
    if reactions:
        reaction: JSON = {"manifestation": [{"text": t} for t in reactions]}
        if rsev := REACTION_SEVERITY.get(sev):
            reaction["severity"] = rsev
        res["reaction"] = [reaction]
    if onset := al1.get(6).strip():
        res["onsetDateTime"] = dt.dtm_at(onset, ctx.settings, al1, 6)
    c0 = code.get("coding", [{}])[0]
    key = "|".join((patient_key, "AL1", c0.get("system", ""), c0.get("code", "") or code.get("text", "")))
    return ctx.add("AllergyIntolerance", res, key=key)


def condition(
    dg1: Segment, ctx: ConvertContext, patient_ref: str, patient_key: str, enc_ref: str | None
) -> str | None:
    """DG1 → Condition (encounter-diagnosis).  Key: DG1-20 identifier, else encounter (or patient) + code."""
    s = ctx.settings
    code = dt.cwe(dg1.rep(3), ctx, dg1.loc(3), field="DG1-3")
    desc = dg1.get(4).strip()
    if code is None and desc:
        code = {"text": desc}
    elif code is not None and desc and "text" not in code:
        code["text"] = desc
    if code is None:
        return None
    res: JSON = {
        "resourceType": "Condition",
        "category": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "encounter-diagnosis",
            "display": "Encounter Diagnosis",
        }]}],
    }
    dtype = dg1.get(6).strip().upper()
    ver = "entered-in-error" if dg1.get(21).strip().upper() == "D" else DIAGNOSIS_VERIFICATION.get(dtype, "")
    if ver:
        res["verificationStatus"] = {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": ver,
        }]}
    res["code"] = code
    res["subject"] = {"reference": patient_ref}
    if enc_ref:
        res["encounter"] = {"reference": enc_ref}
    if onset := dg1.get(5).strip():
        res["onsetDateTime"] = dt.dtm_at(onset, s, dg1, 5)
    if rec := dg1.get(19).strip():
        res["recordedDate"] = dt.dtm_at(rec, s, dg1, 19)
    f = dg1.fields
    nf = len(f)
    # raw-field checks first: an empty field costs one index, not a Rep and a datatype call
    asserter = dt.xcn(dg1.rep(16), ctx, dg1.loc(16)) if nf > 16 and f[16] else None
    if asserter and "reference" in asserter:
        res["asserter"] = asserter
    ident = dt.ei(dg1.rep(20), ctx, dg1.loc(20)) if nf > 20 and f[20] else None
    if ident and "system" in ident:
        res["identifier"] = [ident]
        return ctx.add("Condition", res, identifier=(ident["system"], ident["value"]))
    if ident:
        res["identifier"] = [ident]
    enc_key = ctx.key_of(enc_ref) if enc_ref else None
    c0 = code.get("coding", [{}])[0]
    key = "|".join((enc_key or patient_key, "DG1", c0.get("system", ""), c0.get("code", "") or code.get("text", "")))
    return ctx.add("Condition", res, key=key)


def subscriber(in1: Segment, ctx: ConvertContext, patient_ref: str, patient_key: str,
               insured_ids: list[JSON]) -> str | None:
    """IN1-16.. (insured person, when IN1-17 is not self) → RelatedPerson (IG IN1-16 subscriber)."""
    s = ctx.settings
    name = dt.xpn(in1.rep(16), s)
    if name is None:
        return None
    res: JSON = {"active": True, "patient": {"reference": patient_ref}}
    if insured_ids:
        res["identifier"] = [dict(i) for i in insured_ids]
    rel = in1.rep(17)
    coding = _mapped_coding(rel.c(1), rel.c(2), rel.c(3), RELATIONSHIP, dt.V2_TABLE + "0063")
    if coding is not None:
        res["relationship"] = [{"coding": [coding]}]
    res["name"] = [name]
    if addr := dt.xads(in1, 19, s):
        res["address"] = addr
    gender = dt.table(ctx, dt.ADMINISTRATIVE_SEX, in1.get(43), in1.loc(43), "0001")
    if gender:
        res["gender"] = gender
    if bd := in1.get(18).strip():
        res["birthDate"] = dt.dtm_at(bd, s, in1, 18, kind="date")
    key = "|".join((patient_key, "IN1-16", name.get("family", ""), " ".join(name.get("given", [])),
                    rel.c(1).strip()))
    return ctx.add("RelatedPerson", res, key=key)


def coverage(in1: Segment, ctx: ConvertContext, patient_ref: str, patient_key: str,
             in2: Segment | None = None) -> str | None:
    """IN1 → Coverage (+ payor Organization).  Key: patient + company id + plan + policy number."""
    s = ctx.settings
    company_id = in1.rep(3)
    company_name = in1.get(4, 1).strip()
    plan = in1.get(2, 1).strip()
    policy = in1.get(36).strip()
    if not (company_id.c(1).strip() or company_name or plan or policy):
        return None
    payor: JSON
    org: JSON = {"resourceType": "Organization", "active": True}
    if company_name:
        org["name"] = company_name
    f = in1.fields
    nf = len(f)
    # raw-field checks first: an empty field costs one index, not a Rep and a datatype call
    if nf > 5 and f[5] and (addr := dt.xad(in1.rep(5), s)):
        org["address"] = [addr]
    org_ident = dt.cx(company_id, ctx, in1.loc(3))
    if org_ident and "system" in org_ident:
        org["identifier"] = [org_ident]
        payor = {"reference": ctx.add("Organization", org, identifier=(org_ident["system"], org_ident["value"]))}
    elif org_ident or company_name:
        if org_ident:
            org["identifier"] = [org_ident]
        facility = ctx.message.msh.get(4, 1).strip()
        okey = f"{facility}|payor|{org_ident['value'] if org_ident else ''}|{company_name}"
        payor = {"reference": ctx.add("Organization", org, key=okey)}
    else:
        payor = {"display": "unknown payor"}
    res: JSON = {"resourceType": "Coverage", "status": "active"}
    idents: list[JSON] = []
    # IN1-2 health plan id (CWE → Identifier, IG), IN1-36 policy number, IN1-49 insured's id,
    # IN2-6 / IN2-8 Medicare / Medicaid numbers of the same insurance group
    if plan:
        plan_ident: JSON = {"value": plan}
        if (psys := in1.get(2, 3).strip()) and (plan_system := dt.code_system(psys)):
            plan_ident["system"] = plan_system
        idents.append(plan_ident)
    if policy:
        idents.append({"value": policy})
        res["subscriberId"] = policy
    insured_ids = [i for r in in1.reps(49) if (i := dt.cx(r, ctx, in1.loc(49)))] if nf > 49 and f[49] else []
    idents.extend(insured_ids)
    if in2 is not None:
        for field, system in ((6, MEDICARE_SYSTEM), (8, MEDICAID_SYSTEM)):
            if v := in2.get(field).strip():
                idents.append({"system": system, "value": v})
    if idents:
        res["identifier"] = idents
    if nf > 15 and f[15] and (ptype := dt.cwe(in1.rep(15), ctx, in1.loc(15))):
        for coding in ptype.get("coding", ()):
            if "system" not in coding and coding["code"].upper() in ACT_CODE_PLAN_TYPES:
                coding["system"] = ACT_CODE
        res["type"] = ptype
    res["beneficiary"] = {"reference": patient_ref}
    rel_code = in1.get(17, 1).strip().upper()
    rel = SUBSCRIBER_RELATIONSHIP.get(rel_code) if rel_code else None
    if rel:
        res["relationship"] = {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/subscriber-relationship", "code": rel,
        }]}
    if rel == "self":
        res["subscriber"] = {"reference": patient_ref}
    elif rel_code and (sub := subscriber(in1, ctx, patient_ref, patient_key, insured_ids)):
        res["subscriber"] = {"reference": sub}
    if nf > 12 and (f[12] or (nf > 13 and f[13])):
        p = dt.period_at(in1.get(12), in1.get(13), s, in1, 12, 13)
        if p:
            res["period"] = p
    res["payor"] = [payor]
    classes: list[JSON] = []
    cls_sys = "http://terminology.hl7.org/CodeSystem/coverage-class"
    if group := in1.get(8).strip():
        cl: JSON = {"type": {"coding": [{"system": cls_sys, "code": "group"}]}, "value": group}
        if gname := in1.get(9, 1).strip():
            cl["name"] = gname
        classes.append(cl)
    if plan:
        cl = {"type": {"coding": [{"system": cls_sys, "code": "plan"}]}, "value": plan}
        if pname := in1.get(2, 2).strip():
            cl["name"] = pname
        classes.append(cl)
    if classes:
        res["class"] = classes
    key = "|".join((patient_key, "IN1", company_id.c(1).strip() or company_name, plan, policy))
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
        raise ConversionError("A40 merge without an MRG segment", code="100", location=Location("MRG", 1))
    system, value, _rep = key_identifier(mrg, 1, ctx)
    old_key = conditional_url("Patient", system, value)
    if old_key == survivor_key:
        raise ConversionError(
            "A40: the prior patient identifier (MRG-1) is the surviving patient's identifier",
            code="204", location=mrg.loc(1),
        )
    old: JSON = {"active": False}
    idents: list[JSON] = []
    for r in mrg.reps(1):
        if i := dt.cx(r, ctx, mrg.loc(1)):
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

