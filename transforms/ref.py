"""REF^I12 / I13 / I14 (patient referral, modify, cancel) → ServiceRequest (referral) (+ Practitioner, Condition,
Observation, Patient, Encounter).

The IG has no REF message map; the referral follows the same ServiceRequest shape as orders (IG
ORC[ServiceRequest]) with RF1 in ORC's place: RF1-6 originating referral identifier → identifier (PLAC) and
the key, RF1-11 external referral identifiers → identifier (FILL), RF1-1 referral status (table 0283) →
status, RF1-2 priority (table 0280) → priority, RF1-3 referral type (table 0281) → code, RF1-10 reason
(table 0336) → reasonCode, RF1-7 effective / RF1-8 expiration → occurrencePeriod and authoredOn; category
SNOMED 3457005 "Patient referral".  PRD with role RP (referring provider) → requester, RT (referred-to
provider) → performer (Practitioner from PRD-2/3/5/7).  DG1 → Condition ``reasonReference``, OBR/OBX →
Observations ``supportingInfo``, NTE → note.

Lifecycle: I13 (modify) and I14 (cancel) carry the same RF1-6, so they update the *same* ServiceRequest;
I14 → revoked.  Guards as for orders (:data:`transforms.orm.SERVICE_REQUEST_STATUS_RANK`).
"""

from __future__ import annotations

from typing import Any, Final

from engine.errors import ConversionError, Location
from engine.hl7 import Message, Segment
from transforms.bundle import ConvertContext, supported_trigger
from transforms.datatypes import (
    NPI_SYSTEM,
    cwe,
    dtm_at,
    ei,
    table,
    xad,
    xpn,
    xtn,
)
from transforms.orders import typed

JSON = dict[str, Any]

TRIGGERS: Final = frozenset({"I12", "I13", "I14"})

# RF1-1 referral status (table 0283) → ServiceRequest.status
REFERRAL_STATUS: Final[dict[str, str]] = {"A": "active", "P": "active", "R": "revoked", "E": "revoked"}
# RF1-2 referral priority (table 0280) → ServiceRequest.priority
REFERRAL_PRIORITY: Final[dict[str, str]] = {"S": "stat", "A": "asap", "R": "routine"}
SNOMED: Final = "http://snomed.info/sct"
REFERRAL_CATEGORY: Final[JSON] = {
    "coding": [{"system": SNOMED, "code": "3457005", "display": "Patient referral"}]
}


def provider(prd: Segment, ctx: ConvertContext) -> JSON | None:
    """PRD → a Practitioner reference.  Key: PRD-7 provider identifier (type NPI → us-npi, else scoped by
    the sending facility), else the name (scoped by the sending facility); None without either."""
    res: JSON = {"resourceType": "Practitioner"}
    name = xpn(prd.rep(2), ctx.settings) if prd.rep(2) else None
    if name is not None:
        res["name"] = [name]
    addrs = [a for r in prd.reps(3) if (a := xad(r, ctx.settings)) is not None]
    if addrs:
        res["address"] = addrs
    phones = [t for r in prd.reps(5) if (t := xtn(r)) is not None]
    if phones:
        res["telecom"] = phones
    ident_value = prd.get(7, 1).strip()
    ident_type = prd.get(7, 2).strip().upper()
    facility = ctx.message.msh.get(4, 1).strip() or ctx.message.msh.get(3, 1).strip()
    display = None
    if name is not None:
        display = " ".join([*name.get("given", []), name.get("family", "")]).strip() or None
    if ident_value and ident_type == "NPI":
        ref = ctx.add("Practitioner", res, identifier=(NPI_SYSTEM, ident_value))
    elif ident_value:
        res["identifier"] = [{"value": ident_value}]
        ref = ctx.add("Practitioner", res, key=f"{facility}|practitioner|{ident_type}|{ident_value}")
    elif name is not None:
        ref = ctx.add(
            "Practitioner", res, key=f"{facility}|practitioner-name|{name.get('family', '')}|{display or ''}"
        )
    else:
        return None
    out: JSON = {"reference": ref}
    if display:
        out["display"] = display
    return out


def _groups(msg: Message) -> tuple[list[tuple[Segment, list[Segment]]], list[Segment]]:
    """(OBX groups with their NTEs, the referral's own NTEs)."""
    obx: list[tuple[Segment, list[Segment]]] = []
    notes: list[Segment] = []
    target: list[Segment] | None = None
    for seg in msg.segments:
        name = seg.name
        if name == "OBX":
            group: tuple[Segment, list[Segment]] = (seg, [])
            obx.append(group)
            target = group[1]
        elif name == "NTE":
            (target if target is not None else notes).append(seg)
        else:
            target = None
    return obx, notes


def convert(msg: Message, ctx: ConvertContext) -> None:
    """REF^I12 / I13 / I14 → entries in ``ctx``."""
    from transforms import adt, orm, oru

    trigger = supported_trigger(msg, TRIGGERS)
    rf1 = msg.first("RF1")
    if rf1 is None:
        raise ConversionError(
            "REF message has no RF1 (referral information) segment", code="100", location=Location("RF1", 1)
        )
    pid = msg.first("PID")
    if pid is None:
        raise ConversionError(
            "REF message has no PID segment: a referral needs a patient",
            code="100",
            location=Location("PID", 1),
        )
    origin = ei(rf1.rep(6), ctx, rf1.loc(6))
    external = [
        x
        for i, r in enumerate(rf1.reps(11), start=1)
        if (x := ei(r, ctx, Location("RF1", rf1.sequence, 11, i)))
    ]
    key_ident = origin or (external[0] if external else None)
    if key_ident is None:
        raise ConversionError(
            "RF1-6 originating referral identifier is missing (and no RF1-11 external referral identifier): "
            "the referral cannot be identified; send RF1-6",
            code="101",
            location=rf1.loc(6),
        )
    patient_ref = oru.patient(pid, ctx)
    patient_key = ctx.key_of(patient_ref) or patient_ref
    enc = oru.encounter(msg, ctx)
    settings = ctx.settings
    res: JSON = {"resourceType": "ServiceRequest"}
    idents: list[JSON] = []
    if origin is not None:
        idents.append(typed(origin, "PLAC", "Placer Identifier"))
    idents.extend(typed(x, "FILL", "Filler Identifier") for x in external)
    res["identifier"] = idents
    if trigger == "I14":
        status = "revoked"
    else:
        status = table(ctx, REFERRAL_STATUS, rf1.get(1).strip(), rf1.loc(1), "0283") or (
            "unknown" if rf1.get(1).strip() else "active"
        )
    res["status"] = status
    res["intent"] = "order"
    res["category"] = [REFERRAL_CATEGORY]
    if rf1.get(2).strip() and (prio := table(ctx, REFERRAL_PRIORITY, rf1.get(2).strip(), rf1.loc(2), "0280")):
        res["priority"] = prio
    if rf1.rep(3) and (code := cwe(rf1.rep(3), ctx, rf1.loc(3), field="RF1-3")) is not None:
        res["code"] = code
    res["subject"] = {"reference": patient_ref}
    if enc:
        res["encounter"] = {"reference": enc}
    start = dtm_at(rf1.get(7).strip(), settings, rf1, 7) if rf1.get(7).strip() else None
    end = dtm_at(rf1.get(8).strip(), settings, rf1, 8) if rf1.get(8).strip() else None
    if end:
        res["occurrencePeriod"] = {"start": start, "end": end} if start else {"end": end}
    if start:
        res["authoredOn"] = start
    performers: list[JSON] = []
    for prd in msg.all("PRD"):
        role = prd.get(1).strip().upper()
        if role not in ("RP", "RT"):
            continue
        who = provider(prd, ctx)
        if who is None:
            continue
        if role == "RP" and "requester" not in res:
            res["requester"] = who
        elif role == "RT":
            performers.append(who)
    if performers:
        res["performer"] = performers
    reasons = [
        c
        for i, r in enumerate(rf1.reps(10), start=1)
        if (c := cwe(r, ctx, Location("RF1", rf1.sequence, 10, i)))
    ]
    if reasons:
        res["reasonCode"] = reasons
    conditions = [
        {"reference": cond}
        for dg1 in msg.all("DG1")
        if (cond := adt.condition(dg1, ctx, patient_ref, patient_key, enc))
    ]
    if conditions:
        res["reasonReference"] = conditions
    for al1 in msg.all("AL1"):
        adt.allergy(al1, ctx, patient_ref, patient_key)
    obx, notes = _groups(msg)
    if notes and (note := oru.annotation(notes, ctx)) is not None:
        res["note"] = [note]
    system = key_ident.get("system")
    facility = ctx.message.msh.get(4, 1).strip() or ctx.message.msh.get(3, 1).strip()
    if system:
        ref = ctx.add("ServiceRequest", res, identifier=(system, key_ident["value"]))
    else:
        ref = ctx.add("ServiceRequest", res, key=f"{facility}|referral|{key_ident['value']}")
    key = ctx.key_of(ref) or ref
    ctx.guard(key, orm.SERVICE_REQUEST_STATUS_RANK.get(status, 0))
    if obx:
        supporting = [
            {"reference": o} for o in orm.observations(obx, ctx, f"{key}|observation", msg.first("OBR"), enc)
        ]
        if supporting:
            res["supportingInfo"] = supporting


__all__ = ["REFERRAL_PRIORITY", "REFERRAL_STATUS", "TRIGGERS", "convert", "provider"]
