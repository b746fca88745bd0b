"""ADT events beyond admit / transfer / discharge: identity (merge, move, change, link), bed status, and
adverse reactions (IAM).

Why a module of its own: these events re-key or re-link records that other messages created, so each
one states exactly which resource it writes and by which identifier (docs/mapping.md, "ADT identity
events").  :func:`transforms.adt.convert` hands them over by trigger (:data:`TRIGGERS`).

* Patient merges A18 / A30 / A34 / A39 / A40: every PID + MRG group as A40 (:func:`transforms.adt.merge`).
* Account merges A35 / A41 (A36 = A34 + A35): the account of PID-18 (Account, active) and the prior
  account of MRG-3 (Account, inactive), joined by a Linkage (source: the surviving account).
* Visit merge A42: the prior visit (MRG-5) → Encounter ``entered-in-error`` ``partOf`` the surviving one.
* Moves A44 (account MRG-3 → the PID patient) and A45 (visit PV1-19 → the PID patient).
* Identifier changes A46 / A47 (patient: MRG-1 → PID-3), A49 (account: MRG-3 → PID-18), A50 (visit:
  MRG-5 → PV1-19): the resource found by the *old* identifier is updated to carry the new one (the old
  one stays with use ``old``): the same resource, its history and references kept.  A48 / A51
  (alternate patient / visit id) are plain updates: the alternate ids are not keys.
* Links A24 / A37: two patients ``seealso`` each other (A24); A37 writes both without the link.
* A17 swap: each PID / PV1 group is an ordinary update (the PV1s carry the swapped beds).
* A20 bed status: NPU-1 bed → Location with NPU-2 (table 0116) as ``operationalStatus``.
* IAM (A60, any ADT) → AllergyIntolerance keyed by IAM-7, IAM-6 ``D`` → entered-in-error.

A43 (move patient information by identifier list) is AR 201: which record keeps which identifiers is
site-specific and half-applying it would split a chart.
"""

from __future__ import annotations

from typing import Final

from engine import redact
from engine.errors import ConversionError, Location, MessageRejected
from engine.hl7 import Message, Segment
from transforms import datatypes as dt
from transforms.bundle import ConvertContext, conditional_url, det_uuid
from transforms.datatypes import JSON

PATIENT_MERGES: Final = frozenset({"A18", "A30", "A34", "A36", "A39", "A40"})
ACCOUNT_MERGES: Final = frozenset({"A35", "A36", "A41"})
PATIENT_CHANGES: Final = frozenset({"A46", "A47"})
LINKS: Final = frozenset({"A24", "A37"})
# per PID group: Patient (+ Encounter) as an ordinary update
PLAIN: Final = frozenset({"A17", "A45", "A48", "A51"})
TRIGGERS: Final = (
    PATIENT_MERGES
    | ACCOUNT_MERGES
    | PATIENT_CHANGES
    | LINKS
    | PLAIN
    | frozenset({"A20", "A42", "A44", "A49", "A50"})
)
REJECTED: Final = frozenset({"A43"})

BED_STATUS: Final = {
    "C": "Closed",
    "H": "Housekeeping",
    "I": "Isolated",
    "K": "Contaminated",
    "O": "Occupied",
    "U": "Unoccupied",
}
ACCOUNT_TYPE: Final = dt.V2_TABLE + "0203"
LINKAGE_TAG: Final = "urn:sluice:linkage"

# IAM-9 sensitivity (table 0436) → AllergyIntolerance.type
ALLERGY_TYPE: Final = {
    "AL": "allergy",
    "AD": "intolerance",
    "IN": "intolerance",
    "SE": "intolerance",
    "CT": "allergy",
}
# IAM-17 clinical status (table 0438) → verificationStatus
ALLERGY_VERIFICATION: Final = {
    "C": "confirmed",
    "I": "confirmed",
    "E": "entered-in-error",
    "D": "refuted",
    "P": "unconfirmed",
    "S": "unconfirmed",
    "U": "unconfirmed",
}
ALLERGY_CLINICAL: Final = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
ALLERGY_VERIFICATION_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"


def groups(msg: Message) -> list[Message]:
    """One message per PID: the header segments (MSH, SFT, EVN ...) and the PID with what follows it up to
    the next PID.  Segments keep their sequence numbers, so locations still name the whole message."""
    head: list[Segment] = []
    out: list[list[Segment]] = []
    for seg in msg.segments:
        if seg.name == "PID":
            out.append([*head, seg])
        elif out:
            out[-1].append(seg)
        else:
            head.append(seg)
    return [Message(msg.text, msg.delimiters, segs) for segs in out]


def convert(msg: Message, ctx: ConvertContext, trigger: str) -> None:
    """The event ``trigger`` (one of :data:`TRIGGERS`) of ``msg`` into ``ctx``."""
    from transforms import adt

    if trigger == "A20":
        bed_status(msg, ctx)
        return
    parts = groups(msg)
    if not parts:
        raise ConversionError("ADT message has no PID segment", code="100", location=Location("PID", 1))
    if trigger in LINKS:
        link(parts, ctx, trigger)
        return
    merging = trigger in PATIENT_MERGES and any(p.first("MRG") is not None for p in parts)
    for part in parts:
        pid = part.first("PID")
        assert pid is not None
        ref, key = adt.patient(pid, part, ctx)
        if merging and part.first("MRG") is None:
            # ADT_A39 repeats {PID, MRG}: a PID without its MRG is written as an update, not merged
            ctx.warn(
                "merge_group_without_mrg",
                pid.loc(),
                "this PID has no MRG after it: the patient is updated, nothing is merged into it",
            )
        elif trigger in PATIENT_MERGES:
            adt.merge(part, ctx, ref, key)
        if trigger in ACCOUNT_MERGES:
            account_merge(part, pid, ctx, ref)
        if trigger in PATIENT_CHANGES:
            change_patient(part, ctx, ref, key)
        elif trigger == "A42":
            merge_visit(part, ctx, ref, key)
        elif trigger == "A44":
            move_account(part, pid, ctx, ref)
        elif trigger == "A49":
            change_account(part, pid, ctx, ref)
        elif trigger == "A50":
            change_visit(part, ctx, ref, key)
        elif trigger in PLAIN:
            adt.encounter(part, ctx, trigger, ref, key)


def _mrg(msg: Message, trigger_name: str) -> Segment:
    mrg = msg.first("MRG")
    if mrg is None:
        pid = msg.first("PID")
        raise ConversionError(
            f"{trigger_name} without an MRG segment after its PID: send MRG with the prior identifier",
            code="100",
            location=Location("MRG", pid.sequence + 1 if pid is not None else 1),
        )
    return mrg


def _require(ctx: ConvertContext, key: str) -> None:
    if ctx.settings.unknown_prior_patient == "error":
        ctx.require(key)
    else:
        ctx.count("prior_record_unverified")


# ---------------------------------------------------------------------------
# Accounts (IG PID[Account], MRG[Account])
# ---------------------------------------------------------------------------
def _account_identifier(seg: Segment, field: int, ctx: ConvertContext) -> JSON | None:
    ident = dt.cx(dt.rep_of(seg, field, ctx), ctx, seg.loc(field))
    if ident is not None and "type" not in ident:
        ident["type"] = dt.identifier_type("AN")
    return ident


def _add_account(ctx: ConvertContext, res: JSON, ident: JSON) -> str:
    if "system" in ident:
        return ctx.add("Account", res, identifier=(ident["system"], ident["value"]))
    facility = ctx.message.msh.get(4, 1).strip() or ctx.message.msh.get(3, 1).strip()
    return ctx.add("Account", res, key=f"{facility}|account|{ident['value']}")


def account(pid: Segment, ctx: ConvertContext, patient_ref: str, status: str = "active") -> str | None:
    """PID-18 patient account number → Account (IG PID[Account]: status active, subject the Patient).
    Keyed by the account number with its authority, else by sending facility + number."""
    ident = _account_identifier(pid, 18, ctx)
    if ident is None:
        return None
    res: JSON = {"resourceType": "Account", "identifier": [ident], "status": status}
    res["subject"] = [{"reference": patient_ref}]
    return _add_account(ctx, res, ident)


def _prior_account(mrg: Segment, ctx: ConvertContext, trigger_name: str) -> JSON:
    ident = _account_identifier(mrg, 3, ctx)
    if ident is None:
        raise ConversionError(
            f"{trigger_name}: MRG-3 (prior patient account number) is empty: send the account being merged, "
            "moved or changed",
            code="101",
            location=mrg.loc(3),
        )
    return ident


def _linkage(ctx: ConvertContext, source: str, alternate: str, key: str) -> None:
    """A Linkage (no identifier in R4): a conditional create on a tag holding the uuid5 of ``key``."""
    tag = det_uuid("linkage|" + key)
    res: JSON = {
        "resourceType": "Linkage",
        "meta": {"tag": [{"system": LINKAGE_TAG, "code": tag}]},
        "item": [
            {"type": "source", "resource": {"reference": source}},
            {"type": "alternate", "resource": {"reference": alternate}},
        ],
    }
    ctx.add_create("Linkage", res, if_none_exist=f"_tag={LINKAGE_TAG}|{tag}", key=key)


def account_merge(msg: Message, pid: Segment, ctx: ConvertContext, patient_ref: str) -> None:
    """A35 / A36 / A41: the prior account (MRG-3) is merged into PID-18's: the prior one is written
    ``inactive`` (the IG's MRG[Account] leaves the status to the implementer: after a merge it is no longer
    used), and a Linkage says the surviving account replaces it."""
    mrg = _mrg(msg, "account merge")
    prior = _prior_account(mrg, ctx, "account merge")
    survivor = account(pid, ctx, patient_ref)
    if survivor is None:
        raise ConversionError(
            "account merge: PID-18 (patient account number) is empty: send the surviving account",
            code="101",
            location=pid.loc(18),
        )
    old: JSON = {"resourceType": "Account", "identifier": [prior], "status": "inactive"}
    old["subject"] = [{"reference": patient_ref}]
    old_ref = _add_account(ctx, old, prior)
    if old_ref == survivor:
        raise ConversionError(
            "account merge: the prior account (MRG-3) is the surviving account (PID-18)",
            code="204",
            location=mrg.loc(3),
        )
    _require(ctx, ctx.key_of(old_ref) or old_ref)
    _linkage(ctx, survivor, old_ref, f"{ctx.key_of(survivor)}|{ctx.key_of(old_ref)}")


def move_account(msg: Message, pid: Segment, ctx: ConvertContext, patient_ref: str) -> None:
    """A44: the account MRG-3 moves to the PID patient: the Account is rewritten with the new subject."""
    mrg = _mrg(msg, "A44 move account")
    ident = _prior_account(mrg, ctx, "A44 move account")
    res: JSON = {"resourceType": "Account", "identifier": [ident], "status": "active"}
    res["subject"] = [{"reference": patient_ref}]
    ref = _add_account(ctx, res, ident)
    _require(ctx, ctx.key_of(ref) or ref)


def change_account(msg: Message, pid: Segment, ctx: ConvertContext, patient_ref: str) -> None:
    """A49: the Account known by MRG-3 gets the account number of PID-18 (the old one stays, use old)."""
    mrg = _mrg(msg, "A49 change account number")
    old = _prior_account(mrg, ctx, "A49 change account number")
    ref = account(pid, ctx, patient_ref)
    if ref is None:
        raise ConversionError(
            "A49: PID-18 (the new patient account number) is empty", code="101", location=pid.loc(18)
        )
    _retarget(ctx, ref, "Account", old, mrg, 3)


def _retarget(ctx: ConvertContext, ref: str, resource_type: str, old: JSON, seg: Segment, field: int) -> None:
    system = old.get("system")
    value = old["value"]
    if system is None:
        # without an authority the old identifier is as the facility keyed it (see _add_account)
        facility = ctx.message.msh.get(4, 1).strip() or ctx.message.msh.get(3, 1).strip()
        if resource_type == "Account":
            system, value = "urn:sluice:key", det_uuid(f"Account|{facility}|account|{old['value']}")
        else:
            raise ConversionError(
                f"{seg.name}-{field}: the prior identifier has no assigning authority, so the record it names "
                "cannot be found: send the authority (CX-4)",
                code="204",
                location=seg.loc(field),
            )
    if conditional_url(resource_type, system, value) == ctx.key_of(ref):
        raise ConversionError(
            f"{seg.name}-{field}: the prior identifier is the new one: nothing changes",
            code="204",
            location=seg.loc(field),
        )
    key = ctx.retarget(ref, resource_type, system, value)
    _require(ctx, key)


# ---------------------------------------------------------------------------
# Patients
# ---------------------------------------------------------------------------
def change_patient(msg: Message, ctx: ConvertContext, ref: str, key: str) -> None:
    """A46 / A47: the Patient known by MRG-1 gets PID-3's identifiers (MRG-1 kept, use old)."""
    from transforms import adt

    mrg = _mrg(msg, "patient identifier change")
    system, value, _rep = adt.key_identifier(mrg, 1, ctx)
    if conditional_url("Patient", system, value) == key:
        raise ConversionError(
            "patient identifier change: the prior identifier (MRG-1) is the new one (PID-3)",
            code="204",
            location=mrg.loc(1),
        )
    new_key = ctx.retarget(ref, "Patient", system, value)
    _require(ctx, new_key)


def link(parts: list[Message], ctx: ConvertContext, trigger: str) -> None:
    """A24 link / A37 unlink: the two patients (two PID groups); A24 links them ``seealso`` both ways, A37
    writes both without links (a full update removes the link)."""
    from transforms import adt

    if len(parts) != 2:
        pid = parts[-1].first("PID")
        raise ConversionError(
            f"ADT {trigger} needs exactly two PID segments (the two patients to link or unlink)",
            code="100",
            location=Location("PID", pid.sequence if pid is not None else 1),
        )
    refs: list[str] = []
    for part in parts:
        pid = part.first("PID")
        assert pid is not None
        ref, _key = adt.patient(pid, part, ctx)
        refs.append(ref)
    if refs[0] == refs[1]:
        raise ConversionError(
            f"ADT {trigger}: both PID segments name the same patient", code="204", location=Location("PID", 2)
        )
    if trigger == "A24":
        for me, other in ((refs[0], refs[1]), (refs[1], refs[0])):
            res = ctx.find(me)
            if res is not None:
                res["link"] = [{"other": {"reference": other}, "type": "seealso"}]


# ---------------------------------------------------------------------------
# Visits
# ---------------------------------------------------------------------------
def _prior_visit(msg: Message, ctx: ConvertContext, patient_key: str, name: str) -> tuple[str, str, Segment]:
    """MRG-5 prior visit number → (system, value) addressing the Encounter as adt.encounter keys it."""
    mrg = _mrg(msg, name)
    ident = dt.cx(dt.rep_of(mrg, 5, ctx), ctx, mrg.loc(5))
    if ident is None:
        raise ConversionError(
            f"{name}: MRG-5 (prior visit number) is empty: send the visit being merged or changed",
            code="101",
            location=mrg.loc(5),
        )
    if "system" in ident:
        return ident["system"], ident["value"], mrg
    return "urn:sluice:key", det_uuid(f"Encounter|{patient_key}|visit|{ident['value']}"), mrg


def _visit(msg: Message, ctx: ConvertContext, trigger: str, ref: str, key: str, name: str) -> str:
    from transforms import adt

    pv1 = msg.first("PV1")
    if pv1 is None or not pv1.get(19).strip():
        raise ConversionError(
            f"{name}: PV1-19 (the visit number) is empty: send the surviving or new visit number",
            code="101",
            location=pv1.loc(19) if pv1 is not None else Location("PV1", 1),
        )
    enc = adt.encounter(msg, ctx, trigger, ref, key)
    assert enc is not None
    return enc


def merge_visit(msg: Message, ctx: ConvertContext, ref: str, key: str) -> None:
    """A42: the prior visit (MRG-5) is merged into PV1-19's: the prior Encounter is written
    ``entered-in-error`` (a duplicate) and ``partOf`` the surviving one, which is updated from PV1."""
    survivor = _visit(msg, ctx, "A42", ref, key, "A42 merge visit")
    system, value, mrg = _prior_visit(msg, ctx, key, "A42 merge visit")
    url = conditional_url("Encounter", system, value)
    if url == ctx.key_of(survivor):
        raise ConversionError(
            "A42: the prior visit (MRG-5) is the surviving visit (PV1-19)", code="204", location=mrg.loc(5)
        )
    enc = ctx.find(survivor) or {}
    old: JSON = {"resourceType": "Encounter", "status": "entered-in-error"}
    old["class"] = enc.get("class", {})
    old["subject"] = {"reference": ref}
    old["partOf"] = {"reference": survivor}
    ident = dt.cx(dt.rep_of(mrg, 5, ctx), ctx)
    if ident is not None and "system" in ident:
        old["identifier"] = [ident]
    ctx.add("Encounter", old, identifier=(system, value))
    _require(ctx, url)


def change_visit(msg: Message, ctx: ConvertContext, ref: str, key: str) -> None:
    """A50: the Encounter known by MRG-5 gets PV1-19 (MRG-5 kept, use old)."""
    enc = _visit(msg, ctx, "A50", ref, key, "A50 change visit number")
    system, value, mrg = _prior_visit(msg, ctx, key, "A50 change visit number")
    if conditional_url("Encounter", system, value) == ctx.key_of(enc):
        raise ConversionError(
            "A50: the prior visit number (MRG-5) is the new one (PV1-19)", code="204", location=mrg.loc(5)
        )
    _require(ctx, ctx.retarget(enc, "Encounter", system, value))


# ---------------------------------------------------------------------------
# A20 bed status, IAM adverse reactions
# ---------------------------------------------------------------------------
def bed_status(msg: Message, ctx: ConvertContext) -> None:
    """A20: NPU-1 bed location → Location with NPU-2 bed status (table 0116) as operationalStatus."""
    npu = msg.first("NPU")
    if npu is None:
        raise ConversionError(
            "A20 bed status update without an NPU segment", code="100", location=Location("NPU", 1)
        )
    ref = dt.pl(dt.rep_of(npu, 1, ctx), ctx, npu.loc(1))
    if ref is None or "reference" not in ref:
        raise ConversionError("NPU-1 (bed location) is empty", code="101", location=npu.loc(1))
    loc = ctx.find(ref["reference"])
    status = dt.value(npu, 2, ctx).strip().upper()
    if loc is not None and status:
        display = BED_STATUS.get(status)
        if display is None:
            dt.table(ctx, {}, status, npu.loc(2), "0116")
            loc["operationalStatus"] = {"system": dt.V2_TABLE + "0116", "code": dt.fhir_code(status)}
        else:
            loc["operationalStatus"] = {"system": dt.V2_TABLE + "0116", "code": status, "display": display}


def allergy(
    iam: Segment, ctx: ConvertContext, patient_ref: str, patient_key: str, notes: list[str]
) -> str | None:
    """IAM → AllergyIntolerance.  Key: IAM-7 (allergy unique identifier), else patient + allergen code (as
    AL1).  IAM-6 ``D`` (delete) or IAM-17 ``E`` → verificationStatus entered-in-error (and no
    clinicalStatus, FHIR ait-2): the same resource, never a second one."""
    from transforms import adt

    code = dt.cwe(dt.rep_of(iam, 3, ctx), ctx, field="IAM-3", seg=iam, at=3)
    if code is None:
        return None
    action = dt.value(iam, 6, ctx).strip().upper()
    ver = ALLERGY_VERIFICATION.get(dt.value(iam, 17, ctx).strip().upper(), "")
    if action == "D":
        ver = "entered-in-error"
    res: JSON = {"resourceType": "AllergyIntolerance"}
    ident = dt.ei(dt.rep_of(iam, 7, ctx), ctx, iam.loc(7))
    if ident is not None:
        res["identifier"] = [ident]
    if ver != "entered-in-error":
        res["clinicalStatus"] = {"coding": [{"system": ALLERGY_CLINICAL, "code": "active"}]}
    if ver:
        res["verificationStatus"] = {"coding": [{"system": ALLERGY_VERIFICATION_SYSTEM, "code": ver}]}
    if atype := ALLERGY_TYPE.get(dt.value(iam, 9, ctx).strip().upper()):
        res["type"] = atype
    cat_code = dt.value(iam, 2, ctx).strip().upper()
    if cat := adt.ALLERGY_CATEGORY.get(cat_code):
        res["category"] = [cat]
    elif cat_code and cat_code not in adt.ALLERGY_CATEGORY:
        dt.table(ctx, {}, cat_code, iam.loc(2), "0127")
    if crit := adt.ALLERGY_CRITICALITY.get(dt.value(iam, 4, ctx).strip().upper()):
        res["criticality"] = crit
    if iam.rep(27) and (clinician := dt.cwe(iam.rep(27), ctx, iam.loc(27))):
        # IAM-27 clinician's identified code: the same allergen as the clinician coded it
        codings = code.setdefault("coding", [])
        for extra in clinician.get("coding", ()):
            if extra not in codings:
                codings.append(extra)
    res["code"] = code
    res["patient"] = {"reference": patient_ref}
    if onset := dt.value(iam, 11, ctx).strip():
        res["onsetDateTime"] = dt.dtm_at(onset, ctx.settings, iam, 11)
    elif onset_text := dt.value(iam, 12, ctx).strip():
        res["onsetString"] = onset_text
    # IAM-24 initially recorded date/time, else IAM-13 reported date/time; IAM-23 initially recorded by
    for field in (24, 13):
        if recorded := dt.value(iam, field, ctx).strip():
            res["recordedDate"] = dt.dtm_at(recorded, ctx.settings, iam, field)
            break
    recorder = dt.xcn(iam.rep(23), ctx, iam.loc(23)) if iam.rep(23) else None
    if recorder is not None and "reference" in recorder:
        res["recorder"] = recorder
    if iam.rep(14) and (reporter := reported_by(iam, ctx, patient_ref, patient_key)):
        res["asserter"] = reporter  # IAM-14 reported by, per IAM-15 (the IG: recorder; docs/mapping.md)
    sev = adt.REACTION_SEVERITY.get(dt.value(iam, 4, ctx).strip().upper())
    reactions = [{"text": t} for r in iam.reps(5) if (t := r.text.strip())]
    if reactions:
        reaction: JSON = {"manifestation": reactions}
        if sev:
            reaction["severity"] = sev
        res["reaction"] = [reaction]
    if notes:
        res["note"] = [{"text": t} for t in notes]
    if ident is not None and "system" in ident:
        return ctx.add("AllergyIntolerance", res, identifier=(ident["system"], ident["value"]))
    c0 = code.get("coding", [{}])[0]
    key = "|".join((patient_key, "AL1", c0.get("system", ""), c0.get("code", "") or code.get("text", "")))
    return ctx.add("AllergyIntolerance", res, key=key)


def reported_by(iam: Segment, ctx: ConvertContext, patient_ref: str, patient_key: str) -> JSON | None:
    """IAM-14 reported by (XPN) → the reference for AllergyIntolerance.asserter (the IG's IAM[AllergyIntolerance]
    says recorder, which Sluice keeps for IAM-23 initially recorded by: recorder holds one; by IAM-15
    relationship to patient as the IG says): ``SEL`` → the Patient; another relationship → a RelatedPerson (name IAM-14,
    relationship IAM-15 through the IG's Relationship map) with the key an NK1's RelatedPerson has, so a reporter
    who is also an NK1 of the message is that one resource, else a conditional create (an allergy message names
    the person in passing and never rewrites them); no IAM-15 → the name alone (the IG's Practitioner.name: a
    name is no identity to match a Practitioner on)."""
    from transforms import adt

    name = dt.xpn(dt.rep_of(iam, 14, ctx), ctx.settings)
    if name is None:
        return None
    rel = dt.rep_of(iam, 15, ctx)
    c = rel.cs(3)
    code = c[0].strip().upper()
    if code == "SEL":
        return {"reference": patient_ref}
    text = " ".join([*name.get("given", ()), name.get("family", "")]).strip()
    if not code:
        return {"display": text}
    res: JSON = {"resourceType": "RelatedPerson", "active": True, "patient": {"reference": patient_ref}}
    coding = adt._mapped_coding(c[0], c[1], c[2], adt.RELATIONSHIP, adt.TABLE_0063, ctx.coding_systems)
    if coding is not None:
        res["relationship"] = [{"coding": [coding]}]
    res["name"] = [name]
    key = "|".join(
        (patient_key, "NK1", name.get("family", ""), " ".join(name.get("given", ())), c[0].strip())
    )
    return {"reference": ctx.add("RelatedPerson", res, key=key, create_only=True), "display": text}


def allergies(msg: Message, ctx: ConvertContext, patient_ref: str, patient_key: str) -> None:
    """Every IAM (with the NTE and IAR after it) → AllergyIntolerance."""
    from transforms import adt

    current: Segment | None = None
    found: list[tuple[Segment, list[str], list[JSON]]] = []
    for seg in msg.segments:
        if seg.name == "IAM":
            current = seg
            found.append((seg, [], []))
        elif current is not None and seg.name == "NTE":
            if text := " ".join(r.text.strip() for r in seg.reps(3) if r.text.strip()):
                found[-1][1].append(text)
        elif current is not None and seg.name == "IAR":
            reaction: JSON = {}
            if cc := dt.cwe(dt.rep_of(seg, 1, ctx), ctx, seg=seg, at=1):
                reaction["manifestation"] = [cc]
                if sev := adt.REACTION_SEVERITY.get(dt.value(seg, 2, ctx).strip().upper()):
                    reaction["severity"] = sev
                if text := dt.value(seg, 4, ctx).strip():
                    reaction["description"] = text
                found[-1][2].append(reaction)
        elif seg.name not in ("PRT",):
            current = None
    for iam, notes, iars in found:
        ref = allergy(iam, ctx, patient_ref, patient_key, notes)
        res = ctx.find(ref) if ref else None
        if res is not None and iars:
            res.setdefault("reaction", []).extend(iars)


def rejected(trigger: str) -> MessageRejected:
    return MessageRejected(
        f"ADT trigger {redact.trigger(trigger)} (move patient information by identifier list) is not converted: "
        "which patient keeps which identifiers is site-specific; apply it in the source system and send "
        "A40 (merge) or A47 (identifier change) instead",
        code="201",
        location=Location("MSH", 1, 9, None, 2),
    )


__all__ = ["REJECTED", "TRIGGERS", "allergies", "convert", "groups"]
