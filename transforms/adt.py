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
                rank = dg1.get(15).strip()
                if rank.isdigit() and int(rank) > 0:
                    d["rank"] = int(rank)
                diags.append(d)
            enc["diagnosis"] = diags
    for in1 in msg.all("IN1"):
        coverage(in1, ctx, patient_ref, patient_key)


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
    reps = [r for r in seg.reps(field) if r.c(1).strip()]
    loc = seg.loc(field)
    if not reps:
        ctx.count("identifier_match_failure")
        raise ConversionError(f"{seg.name}-{field} (patient identifier) is empty", code="101", location=loc)
    best: tuple[int, int, str, Rep] | None = None
    for i, r in enumerate(reps):
        if r.c(5).strip().upper() == "SS":
            continue
        system, how = dt.hd_system(ctx, r.c(4, 1), r.c(4, 2), r.c(4, 3))
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
        location=loc,
    )


def patient(pid: Segment, msg: Message, ctx: ConvertContext) -> tuple[str, str]:
    """PID (+PD1, NK1 contacts) → Patient.  Returns (reference, resource key)."""
    s = ctx.settings
    system, value, key_rep = key_identifier(pid, 3, ctx)
    res: JSON = {"active": True}
    idents: list[JSON] = []
    for field in (3, 2, 4):
        for r in pid.reps(field):
            ident = dt.cx(r, ctx, pid.loc(field))
            if ident is None:
                continue
            if r is key_rep or (r.raw == key_rep.raw and field == 3):
                ident["system"] = system
            if not any(i.get("system") == ident.get("system") and i["value"] == ident["value"] for i in idents):
                idents.append(ident)
    if ssn := pid.get(19).strip():
        idents.append({"type": dt.identifier_type("SS"), "system": dt.SSN_SYSTEM, "value": ssn})
    res["identifier"] = idents
    names = dt.xpns(pid, 5, s) + dt.xpns(pid, 9, s)
    if names:
        res["name"] = names
    telecom = dt.xtns(pid, 13, "home") + dt.xtns(pid, 14, "work") + dt.xtns(pid, 40)
    if telecom:
        res["telecom"] = telecom
    gender = dt.table(ctx, dt.ADMINISTRATIVE_SEX, pid.get(8), pid.loc(8), "0001")
    if gender:
        res["gender"] = gender
    dob = pid.get(7).strip()
    if dob:
        res["birthDate"] = dt.dtm(dob, s, pid.loc(7), kind="date")
        if len(dob) > 8 and dob[8:10].isdigit():
            birth_time = dt.dtm(dob, s, pid.loc(7))
            res["_birthDate"] = {
                "extension": [
                    {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime", "valueDateTime": birth_time}
                ]
            }
    death_dt = pid.get(29).strip()
    death_ind = pid.get(30).strip().upper()
    if death_dt:
        res["deceasedDateTime"] = dt.dtm(death_dt, s, pid.loc(29))
    elif death_ind in ("Y", "N"):
        res["deceasedBoolean"] = death_ind == "Y"
    addresses = dt.xads(pid, 11, s)
    county = pid.get(12).strip()
    if county and len(addresses) == 1 and "district" not in addresses[0]:
        addresses[0]["district"] = county
    if addresses:
        res["address"] = addresses
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
    mbi = pid.get(24).strip().upper()
    order = pid.get(25).strip()
    if order.isdigit() and mbi != "N":
        res["multipleBirthInteger"] = int(order)
    elif mbi in ("Y", "N"):
        res["multipleBirthBoolean"] = mbi == "Y"
    lang = pid.rep(15)
    if lang and (cc := dt.cwe(lang, ctx, pid.loc(15))):
        res["communication"] = [{"language": cc, "preferred": True}]
    extensions: list[JSON] = []
    mmn = pid.rep(6)
    if mmn and (family := mmn.c(1, 1).strip()):
        extensions.append(
            {"url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName", "valueString": family}
        )
    if extensions:
        res["extension"] = extensions
    pd1 = msg.first("PD1")
    if pd1 is not None:
        gps = [gp for r in pd1.reps(4) if (gp := dt.xcn(r, ctx, pd1.loc(4)))]
        if gps:
            res["generalPractitioner"] = gps
    contacts = [c for nk1 in msg.all("NK1") if (c := patient_contact(nk1, ctx))]
    if contacts:
        res["contact"] = contacts
    ref = ctx.add("Patient", res, identifier=(system, value))
    ctx.patient_ref = ref
    return ref, conditional_url("Patient", system, value)


def patient_contact(nk1: Segment, ctx: ConvertContext) -> JSON | None:
    """NK1 → Patient.contact (every NK1; the IG also makes a RelatedPerson for non-emergency roles)."""
    s = ctx.settings
    c: JSON = {}
    rels = [cc for n in (3, 7) for r in nk1.reps(n) if (cc := dt.cwe(r, ctx, nk1.loc(n)))]
    if rels:
        c["relationship"] = rels
    if name := dt.xpn(nk1.rep(2), s):
        c["name"] = name
    telecom = dt.xtns(nk1, 5, "home") + dt.xtns(nk1, 6, "work")
    if telecom:
        c["telecom"] = telecom
    if addr := dt.xad(nk1.rep(4), s):
        c["address"] = addr
    gender = dt.table(ctx, dt.ADMINISTRATIVE_SEX, nk1.get(15), nk1.loc(15), "0001")
    if gender:
        c["gender"] = gender
    p = dt.period(nk1.get(8), nk1.get(9), s, nk1.loc(8), nk1.loc(9))
    if p:
        c["period"] = p
    if org_name := nk1.get(13).strip():
        c["organization"] = {"display": org_name}
    if not any(k in c for k in ("name", "telecom", "address", "organization")):
        return None
    return c


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


def encounter(msg: Message, ctx: ConvertContext, trigger: str, patient_ref: str, patient_key: str) -> str | None:
    """PV1/PV2 → Encounter keyed by PV1-19 (visit number).  No visit number and no admit time → no
    Encounter (counted ``encounter_without_key``): an unkeyed Encounter would duplicate on every update."""
    pv1 = msg.first("PV1")
    if pv1 is None:
        return None
    s = ctx.settings
    visit = pv1.rep(19)
    visit_no = visit.c(1).strip()
    admit = pv1.get(44).strip()
    res: JSON = {}
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
    if adm_type := pv1.get(4).strip():
        res["type"] = [dt.coded_table(adm_type, "0007")]
    if service := pv1.get(10).strip():
        res["serviceType"] = dt.coded_table(service, "0069")
    res["subject"] = {"reference": patient_ref}
    participants: list[JSON] = []
    for field, code, display in ((7, "ATND", "attender"), (8, "REF", "referrer"), (9, "CON", "consultant"),
                                 (17, "ADM", "admitter")):
        for r in pv1.reps(field):
            who = dt.xcn(r, ctx, pv1.loc(field))
            if who:
                participants.append({
                    "type": [{"coding": [{"system": PARTICIPATION, "code": code, "display": display}]}],
                    "individual": who,
                })
    if participants:
        res["participant"] = participants
    p = dt.period(admit, pv1.get(45), s, pv1.loc(44), pv1.loc(45))
    if p:
        res["period"] = p
    locations: list[JSON] = []
    loc_status_current = "completed" if status in ("finished", "cancelled") else (
        "planned" if status == "planned" else "active")
    for field, st in ((3, loc_status_current), (11, "active"), (6, "completed"), (42, "planned")):
        if trigger == "A12" and field == 6:
            continue  # A12: PV1-6 is the transfer being cancelled, PV1-3 the location restored
        ref = dt.pl(pv1.rep(field), ctx, pv1.loc(field))
        if ref:
            locations.append({"location": ref, "status": st})
    if locations:
        res["location"] = locations
    hosp: JSON = {}
    if pre := dt.cx(pv1.rep(5), ctx, pv1.loc(5)):
        hosp["preAdmissionIdentifier"] = pre
    if src := pv1.get(14).strip():
        hosp["admitSource"] = dt.coded_table(src, "0023")
    if readm := pv1.get(13).strip():
        hosp["reAdmission"] = dt.coded_table(readm, "0092")
    if arr := pv1.get(15).strip():
        hosp["specialArrangement"] = [dt.coded_table(arr, "0009")]
    if disp := pv1.get(36).strip():
        hosp["dischargeDisposition"] = dt.coded_table(disp, "0112")
    if diet := pv1.get(38).strip():
        hosp["dietPreference"] = [{"coding": [{"code": diet}]}]
    if hosp:
        res["hospitalization"] = hosp
    pv2 = msg.first("PV2")
    if pv2 is not None:
        reasons = dt.cwes(pv2, 3, ctx)
        if reasons:
            res["reasonCode"] = reasons
        if (exp_admit := pv2.get(8).strip()) and "period" not in res and status == "planned":
            res["period"] = {"start": dt.dtm(exp_admit, s, pv2.loc(8))}
    if visit_no:
        ident = dt.cx(visit, ctx, pv1.loc(19)) or {"value": visit_no}
        if "type" not in ident:
            ident["type"] = dt.identifier_type("VN")
        res["identifier"] = [ident]
        if "system" in ident:
            return ctx.add("Encounter", res, identifier=(ident["system"], visit_no))
        # A visit number without a usable authority is only unique per patient.
        return ctx.add("Encounter", res, key=f"{patient_key}|visit|{visit_no}")
    if admit:
        ctx.count("encounter_keyed_by_admit_time")
        return ctx.add("Encounter", res, key=f"{patient_key}|admit|{admit}")
    if any(pv1.get(n).strip() for n in (3, 7, 44)) or trigger not in ("A28", "A31", "A08", "A60"):
        ctx.count("encounter_without_key")
    return None


# ---------------------------------------------------------------------------
# NK1, AL1, DG1, IN1
# ---------------------------------------------------------------------------
def related_person(nk1: Segment, ctx: ConvertContext, patient_ref: str, patient_key: str) -> str | None:
    """NK1 → RelatedPerson (IG: only when NK1-3 is not an emergency-contact role)."""
    rel = nk1.rep(3)
    if rel.c(1).strip().upper() in EMERGENCY_CONTACT_ROLES:
        return None
    s = ctx.settings
    name = dt.xpn(nk1.rep(2), s)
    if name is None:
        return None
    res: JSON = {"active": True, "patient": {"reference": patient_ref}}
    idents = [i for n in (12, 33) for r in nk1.reps(n) if (i := dt.cx(r, ctx, nk1.loc(n)))]
    if ssn := nk1.get(37).strip():
        idents.append({"type": dt.identifier_type("SS"), "system": dt.SSN_SYSTEM, "value": ssn})
    if idents:
        res["identifier"] = idents
    rels = []
    if cc := dt.cwe(rel, ctx, nk1.loc(3)):
        if "coding" in cc and "system" not in cc["coding"][0]:
            cc["coding"][0]["system"] = dt.V2_TABLE + "0063"
        rels.append(cc)
    if cc := dt.cwe(nk1.rep(7), ctx, nk1.loc(7)):
        if "coding" in cc and "system" not in cc["coding"][0]:
            cc["coding"][0]["system"] = dt.V2_TABLE + "0131"
        rels.append(cc)
    if rels:
        res["relationship"] = rels
    res["name"] = [name]
    telecom = dt.xtns(nk1, 5, "home") + dt.xtns(nk1, 6, "work") + dt.xtns(nk1, 40)
    if telecom:
        res["telecom"] = telecom
    addresses = dt.xads(nk1, 4, s)
    if addresses:
        res["address"] = addresses
    gender = dt.table(ctx, dt.ADMINISTRATIVE_SEX, nk1.get(15), nk1.loc(15), "0001")
    if gender:
        res["gender"] = gender
    if bd := nk1.get(16).strip():
        res["birthDate"] = dt.dtm(bd, s, nk1.loc(16), kind="date")
    p = dt.period(nk1.get(8), nk1.get(9), s, nk1.loc(8), nk1.loc(9))
    if p:
        res["period"] = p
    if lang := dt.cwe(nk1.rep(20), ctx, nk1.loc(20)):
        res["communication"] = [{"language": lang}]
    key = "|".join((patient_key, "NK1", name.get("family", ""), " ".join(name.get("given", [])), rel.c(1).strip()))
    return ctx.add("RelatedPerson", res, key=key)


def allergy(al1: Segment, ctx: ConvertContext, patient_ref: str, patient_key: str) -> str | None:
    """AL1 → AllergyIntolerance keyed by patient + allergen code (set ids are not stable)."""
    code = dt.cwe(al1.rep(3), ctx, al1.loc(3), field="AL1-3")
    if code is None:
        return None
    res: JSON = {
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
    reactions = [r.text.strip() for r in al1.reps(5) if r.text.strip()]
    if reactions:
        reaction: JSON = {"manifestation": [{"text": t} for t in reactions]}
        if rsev := REACTION_SEVERITY.get(sev):
            reaction["severity"] = rsev
        res["reaction"] = [reaction]
    if onset := al1.get(6).strip():
        res["onsetDateTime"] = dt.dtm(onset, ctx.settings, al1.loc(6))
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
        res["onsetDateTime"] = dt.dtm(onset, s, dg1.loc(5))
    if rec := dg1.get(19).strip():
        res["recordedDate"] = dt.dtm(rec, s, dg1.loc(19))
    asserter = dt.xcn(dg1.rep(16), ctx, dg1.loc(16))
    if asserter and "reference" in asserter:
        res["asserter"] = asserter
    ident = dt.ei(dg1.rep(20), ctx, dg1.loc(20))
    if ident and "system" in ident:
        res["identifier"] = [ident]
        return ctx.add("Condition", res, identifier=(ident["system"], ident["value"]))
    if ident:
        res["identifier"] = [ident]
    enc_key = ctx.key_of(enc_ref) if enc_ref else None
    c0 = code.get("coding", [{}])[0]
    key = "|".join((enc_key or patient_key, "DG1", c0.get("system", ""), c0.get("code", "") or code.get("text", "")))
    return ctx.add("Condition", res, key=key)


def coverage(in1: Segment, ctx: ConvertContext, patient_ref: str, patient_key: str) -> str | None:
    """IN1 → Coverage (+ payor Organization).  Key: patient + company id + plan + policy number."""
    s = ctx.settings
    company_id = in1.rep(3)
    company_name = in1.get(4, 1).strip()
    plan = in1.get(2, 1).strip()
    policy = in1.get(36).strip()
    if not (company_id.c(1).strip() or company_name or plan or policy):
        return None
    payor: JSON
    org: JSON = {"active": True}
    if company_name:
        org["name"] = company_name
    if addr := dt.xad(in1.rep(5), s):
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
    res: JSON = {"status": "active"}
    if policy:
        res["identifier"] = [{"value": policy}]
        res["subscriberId"] = policy
    if ptype := dt.cwe(in1.rep(15), ctx, in1.loc(15)):
        res["type"] = ptype
    res["beneficiary"] = {"reference": patient_ref}
    rel_code = in1.get(17, 1).strip().upper()
    if rel_code:
        rel = SUBSCRIBER_RELATIONSHIP.get(rel_code)
        if rel:
            res["relationship"] = {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/subscriber-relationship", "code": rel,
            }]}
        if rel == "self":
            res["subscriber"] = {"reference": patient_ref}
    p = dt.period(in1.get(12), in1.get(13), s, in1.loc(12), in1.loc(13))
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

