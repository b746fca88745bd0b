"""ORM^O01, OML^O21 / O33, OMG^O19 (orders) → ServiceRequest (+ Specimen, Condition, Observation, Patient, Encounter).

Per the IG's ORM_O01 and OML_O21 message maps (OMG_O19 has the OML shape without specimens before v2.7):
PID → Patient (a conditional create, like ORU/SIU: the ADT feed owns it), NK1 → RelatedPerson, PV1 →
Encounter, AL1 → AllergyIntolerance; each ORDER group (ORC, TQ1, OBR, NTE, DG1, OBX/NTE, SPM) → one
ServiceRequest (IG ORC[ServiceRequest] + OBR[ServiceRequest] + TQ1[ServiceRequest]), its DG1 → Condition
``reasonReference``, its OBX → Observation ``supportingInfo``, its SPM → Specimen (``specimen``, and
``Specimen.request`` back).

Identity and lifecycle (docs/mapping.md): the ServiceRequest is keyed on the placer order number (OBR-2,
else ORC-2; else the filler number OBR-3 / ORC-3), the same key ORU's ``basedOn`` ServiceRequest uses, so
results attach to the order.  Every order message is a conditional *update* of that one resource: ORC-1
NW → active, CA/OC/DC/OD/CR/DR → revoked, HD/OH/HR → on-hold, XO/XX/SC → the status ORC-5 gives,
CM → completed.  Guards rank active/on-hold 1, completed/revoked 2, entered-in-error 3: a late resend of
a new order after its cancellation goes to review instead of resurrecting it.
"""

from __future__ import annotations

from typing import Any, Final

from engine import redact
from engine.errors import ConversionError, Location, MessageRejected
from engine.hl7 import Message, Rep, Segment, escape
from transforms.bundle import ConvertContext
from transforms.datatypes import (
    V2_TABLE,
    cwe,
    cx,
    dtm_at,
    ei,
    ends_before_start,
    nm,
    plain_text,
    table,
    unit,
    xcn,
)
from transforms.orders import group_numbers, occurrence, order_numbers, order_type, requisition_key, typed

JSON = dict[str, Any]

TRIGGERS: Final[dict[str, frozenset[str]]] = {
    "ORM": frozenset({"O01"}),
    "OML": frozenset({"O21", "O33"}),
    "OMG": frozenset({"O19"}),
}

# ORC-1 order control (table 0119).  The codes that *are* the event decide the status whatever ORC-5 says
# (a cancel is a cancel); the others give it only when ORC-5 is empty.
CONTROL_EVENT_STATUS: Final[dict[str, str]] = {
    "CA": "revoked",
    "OC": "revoked",
    "CR": "revoked",
    "DC": "revoked",
    "OD": "revoked",
    "DR": "revoked",
    "DF": "revoked",
    "HD": "on-hold",
    "OH": "on-hold",
    "HR": "on-hold",
    "CM": "completed",
    "FU": "completed",
}
CONTROL_STATUS: Final[dict[str, str]] = {
    "NW": "active",
    "OK": "active",
    "AF": "active",
    "RL": "active",
    "OR": "active",
    "OE": "active",
    "RO": "active",
    "RQ": "active",
    "RP": "active",
    "RU": "active",
    "PR": "active",
    "PY": "active",
    "SN": "active",
    "NA": "active",
    "XO": "active",
    "XX": "active",
    "XR": "active",
    "SC": "active",
    "SR": "active",
    "SS": "active",
    "RE": "active",
    "CH": "active",
    "PA": "active",
    "LI": "active",
    "UN": "active",
    "UA": "revoked",
    "UC": "active",
    "UD": "active",
    "UF": "active",
    "UH": "active",
    "UM": "active",
    "UR": "on-hold",
    "UX": "active",
    "DE": "active",
    "RR": "active",
    "RF": "active",
    "OF": "active",
    "OP": "active",
    "CN": "active",
    "CP": "active",
    "MC": "active",
}
# ORC-5 order status (table 0038, IG OrderStatus)
ORDER_STATUS: Final[dict[str, str]] = {
    "A": "active",
    "CA": "revoked",
    "CM": "completed",
    "DC": "revoked",
    "ER": "entered-in-error",
    "HD": "on-hold",
    "IP": "active",
    "RP": "revoked",
    "SC": "active",
}
SERVICE_REQUEST_STATUS_RANK: Final[dict[str, int]] = {
    "draft": 1,
    "active": 1,
    "on-hold": 1,
    "completed": 2,
    "revoked": 2,
    "entered-in-error": 3,
}
# table 0493 specimen condition is coded as sent; SPM-20 availability (Y/N) → Specimen.status
SPECIMEN_AVAILABLE: Final[dict[str, str]] = {"Y": "available", "N": "unavailable"}

_DETAIL: Final = frozenset({"OBR", "RQD", "RQ1", "RXO", "ODS", "ODT"})
_IGNORED_IN_ORDER: Final = frozenset(
    {"PRT", "CTD", "FT1", "CTI", "BLG", "TCD", "SGH", "SGT", "SAC", "INV", "TQ2"}
)


class Order:
    """One ORDER group: its ORC, timing, order detail (OBR), notes, diagnoses, observations, specimens."""

    __slots__ = ("dg1", "notes", "obr", "obx", "orc", "prt", "specimens", "tq1")

    def __init__(self, orc: Segment | None) -> None:
        self.orc = orc
        self.obr: Segment | None = None
        self.tq1: Segment | None = None
        self.notes: list[Segment] = []
        self.dg1: list[Segment] = []
        self.prt: list[Segment] = []  # PRT of the order / observation request (not of an OBX)
        # (OBX, its NTEs)
        self.obx: list[tuple[Segment, list[Segment]]] = []
        # (SPM, its specimen OBX with their NTEs)
        self.specimens: list[tuple[Segment, list[tuple[Segment, list[Segment]]]]] = []


def groups(msg: Message) -> tuple[Segment | None, list[Order]]:
    """(first PID, ORDER groups) in message order.  An OBR with no ORC before it (v2.3-era senders, or a
    second OBR under one ORC) starts its own group, which keeps the ORC before it for the order control."""
    pid: Segment | None = None
    orders: list[Order] = []
    current: Order | None = None
    notes: list[Segment] | None = None  # where an NTE goes
    in_specimen = False
    for seg in msg.segments:
        name = seg.name
        if name == "PID":
            if pid is None:
                pid = seg
            notes = None
        elif name == "ORC":
            current = Order(seg)
            orders.append(current)
            notes = current.notes
            in_specimen = False
        elif current is None:
            if name == "OBR":
                current = Order(None)
                orders.append(current)
                current.obr = seg
                notes = current.notes
            else:
                notes = None
        elif name in _DETAIL:
            if name == "OBR":
                if current.obr is not None:
                    current = Order(current.orc)
                    orders.append(current)
                current.obr = seg
            notes = current.notes
            in_specimen = False
        elif name == "TQ1":
            if current.tq1 is None:
                current.tq1 = seg
        elif name == "DG1":
            current.dg1.append(seg)
            notes = None
        elif name == "SPM":
            current.specimens.append((seg, []))
            in_specimen = True
            notes = None
        elif name == "OBX":
            group: tuple[Segment, list[Segment]] = (seg, [])
            if in_specimen:
                current.specimens[-1][1].append(group)
            else:
                current.obx.append(group)
            notes = group[1]
        elif name == "NTE":
            if notes is not None:
                notes.append(seg)
        elif name == "PRT":
            if not current.obx and not current.specimens:
                current.prt.append(seg)
        elif name not in _IGNORED_IN_ORDER:
            notes = None
    return pid, orders


# ---------------------------------------------------------------------------
# ServiceRequest
# ---------------------------------------------------------------------------
def status_of(orc: Segment | None, ctx: ConvertContext) -> str:
    """ServiceRequest.status from ORC-1 (the event codes), else ORC-5 (table 0038), else ORC-1."""
    if orc is None:
        return "active"
    control = orc.get(1).strip().upper()
    if control in CONTROL_EVENT_STATUS:
        return CONTROL_EVENT_STATUS[control]
    if orc.get(5).strip():
        hit = table(ctx, ORDER_STATUS, orc.get(5), orc.loc(5), "0038")
        if hit:
            return hit
    if control == "SC":
        ctx.warn(
            "order_status_change_without_status",
            orc.loc(5),
            "ORC-1 is SC (status changed) but ORC-5 has no known order status: the ServiceRequest stays active",
        )
        return "active"
    if not control:
        return "active"
    return table(ctx, CONTROL_STATUS, control, orc.loc(1), "0119") or "unknown"


def service_request(
    order: Order,
    ctx: ConvertContext,
    enc: str | None,
    used: set[str] | None = None,
    *,
    create_only: bool = False,
) -> tuple[str, str]:
    """One ORDER group → the ServiceRequest; returns (reference, resource key).  Raises a located
    ``ConversionError`` when the order has no placer or filler number (the key)."""
    orc, obr = order.orc, order.obr
    settings = ctx.settings
    placer, filler = order_numbers(orc, obr, ctx)
    key_ident = placer or filler
    by_requisition = None
    if key_ident is None:
        # last resort (lenient): the requisition ORC-4 + the order's code (docs/mapping.md)
        by_requisition = requisition_key(orc, obr, ctx)
        if by_requisition is None:
            where = orc if orc is not None else obr
            assert where is not None
            raise ConversionError(
                f"{where.name} has neither a placer (ORC-2/OBR-2) nor a filler (ORC-3/OBR-3) order number"
                + (" nor a placer group number (ORC-4)" if ctx.settings.strictness == "lenient" else "")
                + ": the order cannot be identified; send ORC-2",
                code="101",
                location=where.loc(2),
            )
    res: JSON = {"resourceType": "ServiceRequest"}
    idents: list[JSON] = []
    if placer is not None:
        idents.append(typed(placer, "PLAC", "Placer Identifier"))
    if filler is not None:
        idents.append(typed(filler, "FILL", "Filler Identifier"))
    for seg, f in ((obr, 53), (orc, 33)):
        if seg is not None and seg.get(f).strip():
            alt = ei(seg.rep(f), ctx, seg.loc(f))
            if alt is not None and not any(alt["value"] == i["value"] for i in idents):
                idents.append(typed(alt, "PLAC", "Placer Identifier"))
            break
    res["identifier"] = idents
    status = status_of(orc, ctx)
    res["status"] = status
    res["intent"] = "reflex-order" if obr is not None and obr.get(11).strip().upper() == "G" else "order"
    if by_requisition is not None:
        res["requisition"] = typed(by_requisition[0], "PGN", "Placer Group Number")
    elif orc is not None and orc.rep(4) and (grp := group_numbers(orc.rep(4), ctx, orc.loc(4))):
        res["requisition"] = typed(grp[0], "PGN", "Placer Group Number")
    if obr is not None and (code := cwe(obr.rep(4), ctx, obr.loc(4), field="OBR-4")) is not None:
        res["code"] = code
    elif obr is None:
        ctx.warn(
            "order_without_detail",
            orc.loc(1) if orc is not None else None,
            "the order has no OBR (order detail): the ServiceRequest is written without a code; an update "
            "replaces the whole ServiceRequest, so send the OBR with every order control message",
        )
    if obr is not None and (
        details := [c for f in (46, 47) for r in obr.reps(f) if (c := cwe(r, ctx, obr.loc(f)))]
    ):
        res["orderDetail"] = details
    if ctx.patient_ref:
        res["subject"] = {"reference": ctx.patient_ref}
    if enc:
        res["encounter"] = {"reference": enc}
    occurrence(res, order.tq1, orc, obr, ctx)
    # IG ORC-9 → authoredOn; only for a new order (in a cancel or change ORC-9 is when that happened)
    control = orc.get(1).strip().upper() if orc is not None else ""
    if (
        orc is not None
        and control in ("NW", "")
        and orc.get(9).strip()
        and (authored := dtm_at(orc.get(9).strip(), settings, orc, 9))
    ):
        res["authoredOn"] = authored
    requester = None
    if orc is not None and orc.rep(12):
        requester = xcn(orc.rep(12), ctx, orc.loc(12))
    if requester is None and obr is not None and obr.rep(16):
        requester = xcn(obr.rep(16), ctx, obr.loc(16))
    if requester is None:
        # IG OML_O21 ORDER.PRT / OBSERVATION_REQUEST.PRT: PRT-4 OP (table 0443 ordering provider) → the requester
        for prt in order.prt:
            role = prt.rep(4)
            if (
                role.c(1).strip().upper() == "OP"
                and role.c(3).strip().upper() in ("", "HL70443")
                and prt.rep(5)
            ):
                requester = xcn(prt.rep(5), ctx, prt.loc(5))
                if requester is not None:
                    break
    if requester is None and orc is not None and orc.rep(21):
        from transforms import oru

        requester = oru.xon_organization(orc, 21, 22, ctx)
    if requester is not None:
        res["requester"] = requester
    if obr is not None and (reasons := [c for r in obr.reps(31) if (c := cwe(r, ctx, obr.loc(31)))]):
        res["reasonCode"] = reasons
    if orc is not None and orc.rep(29) and (otype := order_type(orc.rep(29), ctx, orc.loc(29))):
        res["locationCode"] = [otype]
    if obr is not None and obr.rep(29) and (parent := parent_order(obr, ctx)) is not None:
        res["basedOn"] = [{"reference": parent}]
    if order.notes:
        from transforms import oru

        if (note := oru.annotation(order.notes, ctx)) is not None:
            res["note"] = [note]
    if by_requisition is not None:
        ref = ctx.add("ServiceRequest", res, key=by_requisition[1], create_only=create_only)
        key = ctx.key_of(ref) or ref
        if not create_only:
            ctx.guard(key, SERVICE_REQUEST_STATUS_RANK.get(status, 0))
        return ref, key
    assert key_ident is not None
    system = key_ident.get("system")
    facility = ctx.message.msh.get(4, 1).strip() or ctx.message.msh.get(3, 1).strip()
    order_key = f"{system or 'facility:' + facility}|{key_ident['value']}"
    if used is not None and order_key in used:
        # a second order detail (OBR) under the same order number: its own ServiceRequest, keyed apart
        first = ((res.get("code") or {}).get("coding") or [{}])[0]
        code_key = f"{first.get('system', '')}|{first.get('code', '')}"
        where = obr if obr is not None else orc
        ctx.warn(
            "order_duplicate_number",
            where.loc(2) if where is not None else None,
            "another order group of this message has the same order number: this order detail is keyed by "
            "order number + OBR-4 code instead",
        )
        ref = ctx.add("ServiceRequest", res, key=f"{order_key}|{code_key}", create_only=create_only)
    elif system:
        ref = ctx.add("ServiceRequest", res, identifier=(system, key_ident["value"]), create_only=create_only)
    else:
        ref = ctx.add(
            "ServiceRequest", res, key=f"{facility}|order|{key_ident['value']}", create_only=create_only
        )
    if used is not None:
        used.add(order_key)
    key = ctx.key_of(ref) or ref
    if not create_only:
        ctx.guard(key, SERVICE_REQUEST_STATUS_RANK.get(status, 0))
    return ref, key


def parent_order(obr: Segment, ctx: ConvertContext) -> str | None:
    """OBR-29 parent order (EIP: placer id&ns&uid&type ^ filler id&ns&uid&type) → the parent ServiceRequest
    (IG OBR-29 → basedOn), keyed like any order (placer, else filler) and written as a conditional *create*:
    the parent's own order message owns its content; here it is only made sure to exist."""
    loc = obr.loc(29)
    placer = _eip_part(obr.rep(29), 1, ctx, loc)
    filler = _eip_part(obr.rep(29), 2, ctx, loc)
    key_ident = placer or filler
    if key_ident is None:
        return None
    idents: list[JSON] = []
    if placer is not None:
        idents.append(typed(placer, "PLAC", "Placer Identifier"))
    if filler is not None:
        idents.append(typed(filler, "FILL", "Filler Identifier"))
    res: JSON = {
        "resourceType": "ServiceRequest",
        "identifier": idents,
        "status": "unknown",
        "intent": "order",
    }
    if ctx.patient_ref:
        res["subject"] = {"reference": ctx.patient_ref}
    system = key_ident.get("system")
    if system:
        return ctx.add("ServiceRequest", res, identifier=(system, key_ident["value"]), create_only=True)
    facility = ctx.message.msh.get(4, 1).strip() or ctx.message.msh.get(3, 1).strip()
    return ctx.add("ServiceRequest", res, key=f"{facility}|order|{key_ident['value']}", create_only=True)


# ---------------------------------------------------------------------------
# Specimen
# ---------------------------------------------------------------------------
def _eip_part(rep: Rep, comp: int, ctx: ConvertContext, loc: Location) -> JSON | None:
    """One EI of an EIP (``id&namespace&uid&type`` in component ``comp``) → Identifier."""
    subs = rep.subs(comp)
    if not subs or not subs[0].strip():
        return None
    d = ctx.message.delimiters
    return ei(Rep(d.component.join(escape(x, d) for x in subs[:4]), d), ctx, loc)


def coded(
    rep: Rep, ctx: ConvertContext, loc: Location, table_no: str, field: str | None = None
) -> JSON | None:
    """CWE of a field bound to an HL7 table → CodeableConcept; a code sent without its coding system
    (CWE-3 / CWE-6 empty) is from the field's table, so it gets that table's system."""
    cc = cwe(rep, ctx, loc, field=field)
    if cc is None or "coding" not in cc:
        return cc
    system = V2_TABLE + table_no
    out: list[JSON] = []
    for i, coding in enumerate(cc["coding"]):
        sent = rep.c(3 if i == 0 else 6).strip()
        if "system" not in coding and not sent:
            coding = {"system": system, **coding}
        out.append(coding)
    cc["coding"] = out
    return cc


def _add_specimen(ctx: ConvertContext, res: JSON, key_ident: JSON, *, create_only: bool = False) -> str:
    system = key_ident.get("system")
    if system:
        return ctx.add("Specimen", res, identifier=(system, key_ident["value"]), create_only=create_only)
    facility = ctx.message.msh.get(4, 1).strip() or ctx.message.msh.get(3, 1).strip()
    return ctx.add("Specimen", res, key=f"{facility}|specimen|{key_ident['value']}", create_only=create_only)


def _parent_specimen(rep: Rep, ctx: ConvertContext, loc: Location) -> str | None:
    """SPM-3 parent (EIP) → the parent Specimen, keyed like any specimen and written as a conditional
    *create* (its own SPM owns its content); here it is only made sure to exist."""
    placer = _eip_part(rep, 1, ctx, loc)
    filler = _eip_part(rep, 2, ctx, loc)
    key_ident = filler or placer
    if key_ident is None:
        return None
    idents: list[JSON] = []
    if placer is not None:
        idents.append(typed(placer, "PLAC", "Placer Identifier"))
    if filler is not None:
        idents.append(typed(filler, "FILL", "Filler Identifier"))
    res: JSON = {"resourceType": "Specimen", "identifier": idents}
    if ctx.patient_ref:
        res["subject"] = {"reference": ctx.patient_ref}
    return _add_specimen(ctx, res, key_ident, create_only=True)


def specimen(
    spm: Segment, ctx: ConvertContext, order_key: str | None, request: str | None, patient_key: str
) -> str:
    """SPM → Specimen (IG SPM[Specimen]); returns its reference.

    Key: the filler's specimen id (SPM-2.2), else the placer's (SPM-2.1), else the accession id (SPM-30);
    without any, the order (or patient) + SPM-1 set id, counted ``specimen_fallback_key``."""
    settings = ctx.settings
    res: JSON = {"resourceType": "Specimen"}
    loc2 = spm.loc(2)
    placer = _eip_part(spm.rep(2), 1, ctx, loc2)
    filler = _eip_part(spm.rep(2), 2, ctx, loc2)
    idents: list[JSON] = []
    if placer is not None:
        idents.append(typed(placer, "PLAC", "Placer Identifier"))
    if filler is not None:
        idents.append(typed(filler, "FILL", "Filler Identifier"))
    for i, rep in enumerate(spm.reps(31), start=1):  # SPM-31 other specimen id: CX (v2.7+)
        if (other := cx(rep, ctx, Location("SPM", spm.sequence, 31, i))) is not None:
            idents.append(other)
    if spm.rep(32) and (ship := ei(spm.rep(32), ctx, spm.loc(32))) is not None:
        idents.append(typed(ship, "SHIP", "Shipment ID"))
    if idents:
        res["identifier"] = idents
    accession = cx(spm.rep(30), ctx, spm.loc(30)) if spm.rep(30) else None  # SPM-30 accession id: CX
    if accession is not None:
        res["accessionIdentifier"] = accession
    avail = spm.get(20).strip().upper()
    if avail and (st := table(ctx, SPECIMEN_AVAILABLE, avail, spm.loc(20), "0136")):
        res["status"] = st
    if spm.rep(4) and (stype := coded(spm.rep(4), ctx, spm.loc(4), "0487", "SPM-4")) is not None:
        res["type"] = stype
    if ctx.patient_ref:
        res["subject"] = {"reference": ctx.patient_ref}
    if spm.get(18).strip() and (received := dtm_at(spm.get(18).strip(), settings, spm, 18)):
        res["receivedTime"] = received
    parents = [
        {"reference": ref}
        for i, rep in enumerate(spm.reps(3), start=1)
        if (ref := _parent_specimen(rep, ctx, Location("SPM", spm.sequence, 3, i))) is not None
    ]
    if parents:
        res["parent"] = parents
    if request:
        res["request"] = [{"reference": request}]
    collection = _collection(
        ctx, spm, spm.rep(17).c(1, 1).strip(), 17, spm.rep(17).c(2, 1).strip(), 17, spm.rep(12), 12
    )
    if spm.rep(7) and (method := coded(spm.rep(7), ctx, spm.loc(7), "0488")) is not None:
        collection["method"] = method
    if spm.rep(8) and (site := cwe(spm.rep(8), ctx, spm.loc(8))) is not None:
        collection["bodySite"] = site
    if collection:
        res["collection"] = collection
    container: JSON = {}
    if spm.rep(27) and (ctype := cwe(spm.rep(27), ctx, spm.loc(27))) is not None:
        container["type"] = ctype
    if spm.rep(6) and (additive := coded(spm.rep(6), ctx, spm.loc(6), "0371")) is not None:
        container["additiveCodeableConcept"] = additive
    if container:
        res["container"] = [container]
    if conditions := [
        c
        for i, r in enumerate(spm.reps(24), 1)
        if (c := coded(r, ctx, Location("SPM", spm.sequence, 24, i), "0493"))
    ]:
        res["condition"] = conditions
    # SPM-14 is ST, but senders put a CWE there (``RA^RIGHT ARM``): its components as text, not the encoding
    d = ctx.message.delimiters
    texts = [t for r in spm.reps(14) if (t := plain_text(r, d))]
    if texts:
        from transforms.datatypes import clean_text

        res["note"] = [{"text": clean_text(ctx, "\n".join(texts))}]
    key_ident = filler or placer or accession
    if filler is not None and placer is not None:
        # two SPMs of one message with the same filler id but different placer ids are two specimens
        seen_key = ("specimen-filler", filler.get("system", ""), filler["value"])
        seen = ctx.memo.get(seen_key)
        if seen is None:
            ctx.memo[seen_key] = placer["value"]
        elif seen != placer["value"]:
            ctx.warn(
                "specimen_duplicate_id",
                spm.loc(2),
                "another SPM of this message has the same filler specimen id (SPM-2.2) with another placer id: "
                "this specimen is keyed by its placer id (SPM-2.1) instead",
            )
            key_ident = placer
    if key_ident is not None:
        return _add_specimen(ctx, res, key_ident)
    ctx.count("specimen_fallback_key")
    return ctx.add("Specimen", res, key=f"{order_key or patient_key}|specimen|{spm.get(1).strip()}")


def obr_specimen(obr: Segment, ctx: ConvertContext, order_key: str, request: str) -> str | None:
    """IG OBR[Specimen] (ORU_R01, OML_O21; ORM where the order has no SPM): OBR-7 (OBR-8) →
    collection.collected[x], OBR-9 → collection.quantity, OBR-10 → collection.collector, OBR-14 → receivedTime,
    OBR-15 (SPS, v2.3-2.6: SPS-1 → type, SPS-2 → container.additive, SPS-3 → collection.method text, SPS-4 →
    collection.bodySite), OBR-39 → note, OBR-2 → accessionIdentifier; keyed by the order.  None when the OBR
    says nothing about a specimen (no OBR-7/9/10/14/15)."""
    settings = ctx.settings
    collection = _collection(ctx, obr, obr.get(7).strip(), 7, obr.get(8).strip(), 8, obr.rep(9), 9)
    if obr.rep(10) and (collector := xcn(obr.rep(10), ctx, obr.loc(10))) is not None:
        collection["collector"] = collector
    res: JSON = {"resourceType": "Specimen"}
    source = obr.rep(15)
    if source:
        loc = obr.loc(15)
        if source.c(1).strip() and (code := coded(_sps_cwe(source, 1, ctx), ctx, loc, "0487")) is not None:
            res["type"] = code
        if (
            source.c(2).strip()
            and (additive := coded(_sps_cwe(source, 2, ctx), ctx, loc, "0371")) is not None
        ):
            res["container"] = [{"additiveCodeableConcept": additive}]
        if method := source.c(3).strip():
            collection["method"] = {"text": method}
        if source.c(4).strip() and (site := cwe(_sps_cwe(source, 4, ctx), ctx, loc)) is not None:
            collection["bodySite"] = site
    if ctx.patient_ref:
        res["subject"] = {"reference": ctx.patient_ref}
    if obr.get(14).strip() and (received := dtm_at(obr.get(14).strip(), settings, obr, 14)):
        res["receivedTime"] = received
    res["request"] = [{"reference": request}]
    if collection:
        res["collection"] = collection
    if not collection and "type" not in res and "receivedTime" not in res and "container" not in res:
        return None
    if (accession := ei(obr.rep(2), ctx, obr.loc(2))) is not None:
        res["accessionIdentifier"] = accession  # IG OBR[Specimen]: OBR-2
    # OBR-39 collector's comment is a CWE: its text (original text CWE-9, else CWE-2, else the code), not
    # the encoded value
    if comments := [t for r in obr.reps(39) if (t := r.c(9).strip() or r.c(2).strip() or r.c(1).strip())]:
        from transforms.datatypes import clean_text

        res["note"] = [{"text": clean_text(ctx, "\n".join(comments))}]
    return ctx.add("Specimen", res, key=f"{order_key}|obr-specimen")


def _sps_cwe(source: Rep, comp: int, ctx: ConvertContext) -> Rep:
    """Component ``comp`` of an SPS (a CWE sent as subcomponents) as a Rep of its own."""
    d = ctx.message.delimiters
    return Rep(d.component.join(escape(x, d) for x in source.subs(comp)), d)


# ---------------------------------------------------------------------------
# The message
# ---------------------------------------------------------------------------
def observations(
    obxs: list[tuple[Segment, list[Segment]]],
    ctx: ConvertContext,
    key_prefix: str,
    obr: Segment | None,
    enc: str | None,
) -> list[str]:
    """OBX groups → Observations (ORU's mapping); an OBX without OBX-3 and without a value is skipped."""
    from transforms import oru

    seen: dict[str, int] = {}
    out: list[str] = []
    for obx, notes in obxs:
        if not obx.rep(3):
            ctx.count("obx_without_code_skipped")
            continue
        ref = oru.observation(
            obx, notes, ctx, key_prefix=key_prefix, obr=obr, obr_status_code="", seen=seen, enc=enc
        )
        if ref is not None:
            out.append(ref)
    return out


def order(order: Order, ctx: ConvertContext, enc: str | None, patient_key: str, used: set[str]) -> str:
    """One ORDER group → ServiceRequest + Condition/Observation/Specimen entries; returns its reference."""
    from transforms import adt

    ref, key = service_request(order, ctx, enc, used)
    sr = ctx.find(ref)
    assert sr is not None
    reasons = [
        {"reference": c}
        for dg1 in order.dg1
        if ctx.patient_ref and (c := adt.condition(dg1, ctx, ctx.patient_ref, patient_key, enc)) is not None
    ]
    if reasons:
        sr["reasonReference"] = reasons
    supporting = [
        {"reference": o} for o in observations(order.obx, ctx, f"{key}|observation", order.obr, enc)
    ]
    specimens: list[JSON] = []
    for spm, spm_obx in order.specimens:
        sref = specimen(spm, ctx, key, ref, patient_key)
        specimens.append({"reference": sref})
        for oref in observations(spm_obx, ctx, f"{ctx.key_of(sref) or sref}|observation", order.obr, enc):
            obs = ctx.find(oref)
            if obs is not None:
                obs.setdefault("specimen", {"reference": sref})
            supporting.append({"reference": oref})
    if supporting:
        sr["supportingInfo"] = supporting
    # IG OML_O21 (OMG_O19 alike): OBR[Specimen] for each order detail, beside its SPMs; ORM (its IG map has no
    # Specimen) only for an order without SPM
    if (
        order.obr is not None
        and (not order.specimens or ctx.message.message_type != "ORM")
        and (bref := obr_specimen(order.obr, ctx, key, ref))
    ):
        specimens.append({"reference": bref})
    if specimens:
        sr["specimen"] = specimens
    return ref


def specimen_groups(msg: Message) -> tuple[Segment | None, list[Order]]:
    """OML_O33 (specimen first: SPECIMEN = SPM, its OBX, SAC containers, then the ORDER groups ORC, TQ1, OBR,
    ...) → (first PID, ORDER groups) shaped as :func:`groups` makes them: each order's ``specimens`` is its
    specimen group's SPM; the SPM's own OBX go with the first order of the group only (one Observation each).
    Everything inside an order is read as :func:`groups` reads it."""
    pid = msg.first("PID")
    orders: list[Order] = []
    spm: tuple[Segment, list[tuple[Segment, list[Segment]]]] | None = None
    spm_used = False  # has an order of the current specimen group taken its OBX yet
    segments: list[Segment] = []  # the current ORDER group's segments, read by groups()

    def flush() -> None:
        nonlocal spm_used
        if not segments:
            return
        _, part = groups(Message(msg.text, msg.delimiters, list(segments)))
        for order in part:
            if spm is not None:
                order.specimens.insert(0, (spm[0], [] if spm_used else spm[1]))
                spm_used = True
        orders.extend(part)
        segments.clear()

    for seg in msg.segments:
        name = seg.name
        if name == "SPM":
            flush()
            spm, spm_used = (seg, []), False
        elif name == "OBX" and spm is not None and not segments:
            spm[1].append((seg, []))  # the specimen's own observation, before its orders
        elif name == "NTE" and spm is not None and not segments and spm[1]:
            spm[1][-1][1].append(seg)
        elif name in ("ORC", "OBR") or segments:
            if name == "ORC":
                flush()
            segments.append(seg)
    flush()
    return pid, orders


def convert(msg: Message, ctx: ConvertContext) -> None:
    """ORM^O01 / OML^O21 / OML^O33 / OMG^O19 → entries in ``ctx``."""
    from transforms import adt, oru

    mtype, trigger = msg.message_type, msg.trigger
    allowed = TRIGGERS.get(mtype, frozenset())
    if trigger not in allowed:
        raise MessageRejected(
            f"{redact.message_type(mtype)} trigger {redact.trigger(trigger) if trigger else '(empty)'} is not "
            f"supported (supported: {', '.join(sorted(allowed))})",
            code="201",
            location=Location("MSH", 1, 9, None, 2),
        )
    pid, orders = specimen_groups(msg) if (mtype, trigger) == ("OML", "O33") else groups(msg)
    if pid is None:
        raise ConversionError(
            f"{redact.message_type(mtype)} message has no PID segment: an order needs a patient",
            code="100",
            location=Location("PID", 1),
        )
    if not orders:
        raise ConversionError(
            f"{redact.message_type(mtype)} message has no ORC (common order) segment",
            code="100",
            location=Location("ORC", 1),
        )
    patient_ref = oru.patient(pid, ctx)
    patient_key = ctx.key_of(patient_ref) or patient_ref
    adt.mother(pid, ctx, patient_ref, patient_key)  # PID-21 (IG PID[Patient] → RelatedPerson-Mother)
    for nk1 in msg.all("NK1"):
        adt.related_person(nk1, ctx, patient_ref, patient_key)
    enc = oru.encounter(msg, ctx)
    for al1 in msg.all("AL1"):
        adt.allergy(al1, ctx, patient_ref, patient_key)
    insurance: list[list[Segment]] = []  # INSURANCE groups: IN1 and the IN2 right after it
    for seg in msg.segments:
        if seg.name == "IN1":
            insurance.append([seg])
        elif seg.name == "IN2" and insurance and len(insurance[-1]) == 1:
            insurance[-1].append(seg)
    for group in insurance:
        adt.coverage(group[0], ctx, patient_ref, patient_key, group[1] if len(group) > 1 else None)
    used: set[str] = set()
    for o in orders:
        order(o, ctx, enc, patient_key, used)


def _collection(
    ctx: ConvertContext,
    seg: Segment,
    start: str,
    start_f: int,
    end: str,
    end_f: int,
    amount: Rep,
    amount_f: int,
) -> JSON:
    """Specimen.collection's time (a period when both ends are given, else a dateTime) and quantity (NM^units),
    as SPM-17/SPM-12 and OBR-7/OBR-8/OBR-9 give them."""
    settings = ctx.settings
    collection: JSON = {}
    if start and (s := dtm_at(start, settings, seg, start_f)):
        e = dtm_at(end, settings, seg, end_f) if end else None
        if e and ends_before_start(s, e):
            # FHIR per-1: a period cannot end before it starts; the collection's start is kept
            ctx.warn(
                "collection_end_before_start",
                seg.loc(end_f),
                "the collection end is before its start: Specimen.collection.collectedDateTime is the start, "
                "the end dropped",
            )
            e = None
        if e:
            collection["collectedPeriod"] = {"start": s, "end": e}
        else:
            collection["collectedDateTime"] = s
    if amount and (n := nm(amount.c(1).strip(), seg.loc(amount_f))) is not None:
        qty: JSON = {"value": n}
        d = ctx.message.delimiters
        qty.update(unit(Rep(d.component.join(escape(x, d) for x in amount.subs(2)), d), settings))
        collection["quantity"] = qty
    return collection


__all__ = [
    "CONTROL_EVENT_STATUS",
    "CONTROL_STATUS",
    "ORDER_STATUS",
    "SERVICE_REQUEST_STATUS_RANK",
    "TRIGGERS",
    "Order",
    "convert",
    "groups",
    "service_request",
    "specimen",
]
