"""VXU^V04 (unsolicited vaccination record update) → Immunization (+ Patient, RelatedPerson, Observation).

Per the IG's VXU_V04 message map: PID → Patient (the ADT mapping, a conditional create like ORU/SIU),
NK1 → RelatedPerson, PV1 → Encounter, OBX before the first ORC → Observation (PERSON_OBSERVATION); each
ORDER group (ORC, TQ1/TQ2, RXA, RXR, OBX/NTE) → one Immunization (IG ORC[Immunization], RXA[Immunization],
RXR[Immunization]) and its OBX → Observations ``partOf`` it.  The OBX the CDC immunization guide defines
are folded into the Immunization as well: 64994-7 → ``programEligibility``, 30963-3 → ``fundingSource``,
69764-9 / 30956-7 / 29768-9 / 29769-7 → ``education`` (grouped by OBX-4).

Identity: the Immunization is keyed on ORC-3 (filler order number), else ORC-2 (placer), else (no
usable ORC id) on patient + RXA-5 vaccine code + RXA-3 administration date (counted
``immunization_fallback_key``).  A correction or deletion (RXA-21 ``U`` / ``D``) carries the same ids,
so it updates the *same* Immunization; RXA-21 ``D`` → ``entered-in-error`` (status rank 2, so a late
resend of the original goes to review instead of resurrecting it).  See docs/mapping.md.
"""

from __future__ import annotations

from typing import Any, Final

from engine import redact
from engine.errors import ConversionError, Location, MessageRejected
from engine.hl7 import Message, Segment
from transforms.bundle import ConvertContext
from transforms.datatypes import V2_TABLE, code_system, cwe, dt, dtm_at, ei, nm, pl, table, unit, xad, xcn

JSON = dict[str, Any]

TRIGGERS: Final = frozenset({"V04"})

# RXA-20 completion status (table 0322) → Immunization.status (IG CompletionStatus)
COMPLETION_STATUS: Final[dict[str, str]] = {
    "CP": "completed",
    "PA": "completed",
    "RE": "not-done",
    "NA": "not-done",
}

# Guard ranks: entered-in-error is final; a completed/not-done record may replace the other.
IMMUNIZATION_STATUS_RANK: Final[dict[str, int]] = {"completed": 1, "not-done": 1, "entered-in-error": 2}

PERFORMER_FUNCTION: Final = V2_TABLE + "0443"
LOINC: Final = "http://loinc.org"
ELIGIBILITY: Final = "64994-7"
FUNDING: Final = "30963-3"
# CDC IG: VIS document type, vaccine type, publication date, presentation date (grouped by OBX-4)
VIS_DOCUMENT: Final = "69764-9"
VIS_VACCINE: Final = "30956-7"
VIS_PUBLISHED: Final = "29768-9"
VIS_PRESENTED: Final = "29769-7"
_VIS_CODES: Final = frozenset({VIS_DOCUMENT, VIS_VACCINE, VIS_PUBLISHED, VIS_PRESENTED})
UNKNOWN_AMOUNT: Final = "999"  # CDC IG: RXA-6 999 = amount unknown


class _Order:
    __slots__ = ("notes", "obx", "orc", "rxa", "rxr")

    def __init__(self, orc: Segment | None) -> None:
        self.orc = orc
        self.rxa: Segment | None = None
        self.rxr: Segment | None = None
        self.obx: list[Segment] = []
        self.notes: dict[int, list[Segment]] = {}


def _groups(msg: Message) -> tuple[list[Segment], dict[int, list[Segment]], list[_Order]]:
    """The PERSON_OBSERVATION OBX (with their NTEs) and the ORDER groups, in message order.  An RXA
    without an ORC before it (v2.3-era senders) starts its own group."""
    person: list[Segment] = []
    person_notes: dict[int, list[Segment]] = {}
    orders: list[_Order] = []
    current: _Order | None = None
    last_obx: Segment | None = None
    for seg in msg.segments:
        name = seg.name
        if name == "ORC":
            current = _Order(seg)
            orders.append(current)
            last_obx = None
        elif name == "RXA":
            if current is None or current.rxa is not None:
                current = _Order(None)
                orders.append(current)
            current.rxa = seg
            last_obx = None
        elif name == "RXR" and current is not None:
            if current.rxr is None:
                current.rxr = seg
        elif name == "OBX":
            last_obx = seg
            if current is None:
                person.append(seg)
                person_notes[id(seg)] = []
            else:
                current.obx.append(seg)
                current.notes[id(seg)] = []
        elif name == "NTE" and last_obx is not None:
            (person_notes if current is None else current.notes)[id(last_obx)].append(seg)
        elif name not in ("TQ1", "TQ2", "PRT", "NTE"):
            last_obx = None
    return person, person_notes, orders


def _loinc(obx: Segment) -> str:
    code = obx.get(3, 1).strip()
    sysname = obx.get(3, 3).strip().upper()
    return code if sysname in ("LN", "LOINC", "") else ""


def _function(code: str, display: str) -> JSON:
    return {"coding": [{"system": PERFORMER_FUNCTION, "code": code, "display": display}]}


def manufacturer(rxa: Segment, ctx: ConvertContext) -> JSON | None:
    """RXA-17 (CWE, MVX code) → Organization keyed by coding system + code (IG CWE[Organization])."""
    rep = rxa.rep(17)
    code, display, sysname = rep.c(1).strip(), rep.c(2).strip(), rep.c(3).strip()
    if not code and not display:
        return None
    org: JSON = {"resourceType": "Organization", "active": True}
    if display:
        org["name"] = display
    if code:
        # IG CWE[Organization]: CWE-3 → identifier.system (MVX → http://hl7.org/fhir/sid/mvx, as for any code)
        system = code_system(sysname or "MVX", ctx.coding_systems) or code_system("MVX")
        org["identifier"] = [{"system": system, "value": code}]
    ref = ctx.add("Organization", org, key=f"manufacturer|{sysname.upper() or 'MVX'}|{code or display}")
    out: JSON = {"reference": ref}
    if display:
        out["display"] = display
    return out


def _vis_date(obx: Segment, ctx: ConvertContext) -> str | None:
    """OBX-5 of a VIS publication / presentation date.  Not a result value but a date about the leaflet:
    under ``strictness: lenient`` one that is not a date (a sender's OBX-2 CE with a VIS code under the
    date's LOINC) is left out of the education with a located warning; ``strict`` rejects it (AE 102)."""
    try:
        return dtm_at(obx.get(5), ctx.settings, obx, 5)
    except ConversionError as exc:
        if exc.hl7_error != "102" or ctx.settings.strictness != "lenient":
            raise
        ctx.warn(
            "field_dropped",
            obx.loc(5),
            f"VIS date ({_loinc(obx)}) is not a valid HL7 date; the education entry has no date "
            "(channel strictness: lenient)",
        )
        return None


def _education(obxs: list[Segment], ctx: ConvertContext) -> list[JSON]:
    """CDC IG VIS observations (grouped by OBX-4) → Immunization.education."""
    groups: dict[str, JSON] = {}
    for obx in obxs:
        code = _loinc(obx)
        if code not in _VIS_CODES:
            continue
        edu = groups.setdefault(obx.get(4).strip(), {})
        if code == VIS_DOCUMENT:
            text = obx.get(5, 2).strip() or obx.get(5, 1).strip()
            if text:
                edu["documentType"] = text
        elif code == VIS_VACCINE:
            # the VIS is named by the vaccine type it covers when no VIS document type is sent
            text = obx.get(5, 2).strip() or obx.get(5, 1).strip()
            if text:
                edu.setdefault("documentType", text)
        elif code in (VIS_PUBLISHED, VIS_PRESENTED) and (d := _vis_date(obx, ctx)):
            edu["publicationDate" if code == VIS_PUBLISHED else "presentationDate"] = d
    # FHIR imm-1: documentType or reference must be present
    return [e for e in groups.values() if "documentType" in e]


def immunization(
    order: _Order, ctx: ConvertContext, patient_key: str, enc: str | None, used: set[str]
) -> str:
    """One ORDER group → an Immunization; returns its reference."""
    rxa = order.rxa
    orc = order.orc
    if rxa is None:
        seq = orc.sequence if orc is not None else 1
        raise ConversionError(
            "VXU order group has an ORC but no RXA (pharmacy administration): send one RXA per ORC",
            code="100",
            location=Location("RXA", seq),
        )
    settings = ctx.settings
    action = rxa.get(21).strip().upper()
    res: JSON = {"resourceType": "Immunization"}
    placer = ei(orc.rep(2), ctx, orc.loc(2)) if orc is not None else None
    filler = ei(orc.rep(3), ctx, orc.loc(3)) if orc is not None else None
    idents: list[JSON] = []
    for ident, code, display in (
        (placer, "PLAC", "Placer Identifier"),
        (filler, "FILL", "Filler Identifier"),
    ):
        if ident is not None:
            typed = dict(ident)
            typed["type"] = {"coding": [{"system": V2_TABLE + "0203", "code": code, "display": display}]}
            idents.append(typed)
    if idents:
        res["identifier"] = idents
    # status: RXA-21 D → entered-in-error, else RXA-20 (table 0322), default completed
    if action == "D":
        status = "entered-in-error"
    else:
        status = (
            table(ctx, COMPLETION_STATUS, rxa.get(20).strip().upper(), rxa.loc(20), "0322") or "completed"
        )
    res["status"] = status
    if rxa.rep(18) and (reason := cwe(rxa.rep(18), ctx, rxa.loc(18))):
        res["statusReason"] = reason
    vaccine = cwe(rxa.rep(5), ctx, rxa.loc(5), field="RXA-5")
    if vaccine is None:
        raise ConversionError(
            "RXA-5 administered code (the vaccine) is missing", code="101", location=rxa.loc(5)
        )
    res["vaccineCode"] = vaccine
    if ctx.patient_ref:
        res["patient"] = {"reference": ctx.patient_ref}
    if enc:
        res["encounter"] = {"reference": enc}
    occurred = dtm_at(rxa.get(3), settings, rxa, 3)
    if not occurred:
        raise ConversionError(
            "RXA-3 date/time start of administration is missing", code="101", location=rxa.loc(3)
        )
    res["occurrenceDateTime"] = occurred
    if action == "A" and rxa.get(22).strip() and (recorded := dtm_at(rxa.get(22), settings, rxa, 22)):
        res["recorded"] = recorded
    # RXA-9 administration notes (NIP001): 00 = new record (primary source); else historical, its origin
    origin = rxa.rep(9)
    origin_code = origin.c(1).strip()
    if origin_code:
        primary = origin_code == "00"
        res["primarySource"] = primary
        if not primary and (ro := cwe(origin, ctx, rxa.loc(9))):
            res["reportOrigin"] = ro
    # location: RXA-27 (PL), else RXA-11 (LA2: its PL components)
    for field in (27, 11):
        rep = rxa.rep(field)
        if rep and (loc := pl(rep, ctx, rxa.loc(field))) is not None:
            res["location"] = loc
            where = ctx.find(loc.get("reference", "")) if field == 27 and rxa.rep(28) else None
            if (
                where is not None
                and "address" not in where
                and (addr := xad(rxa.rep(28), settings)) is not None
            ):
                where["address"] = addr
            break
    if (man := manufacturer(rxa, ctx)) is not None:
        res["manufacturer"] = man
    if lot := rxa.get(15, 1).strip():
        res["lotNumber"] = lot
    if rxa.get(16).strip() and (exp := dt(rxa.get(16).strip()[:8], settings, rxa.loc(16))):
        res["expirationDate"] = exp
    rxr = order.rxr
    if rxr is not None:
        if rxr.rep(2) and (site := cwe(rxr.rep(2), ctx, rxr.loc(2))):
            res["site"] = site
        if rxr.rep(1) and (route := cwe(rxr.rep(1), ctx, rxr.loc(1))):
            res["route"] = route
    amount = rxa.get(6).strip()
    if amount and amount != UNKNOWN_AMOUNT and (n := nm(amount, rxa.loc(6))) is not None:
        dose: JSON = {"value": n}
        dose.update(unit(rxa.rep(7)))
        res["doseQuantity"] = dose
    performers: list[JSON] = []
    if orc is not None and orc.rep(12) and (op := xcn(orc.rep(12), ctx, orc.loc(12))) is not None:
        performers.append({"function": _function("OP", "Ordering Provider"), "actor": op})
    for i, rep in enumerate(rxa.reps(10), start=1):
        if (ap := xcn(rep, ctx, Location("RXA", rxa.sequence, 10, i))) is not None:
            performers.append({"function": _function("AP", "Administering Provider"), "actor": ap})
    if performers:
        res["performer"] = performers
    reasons = [
        c for i, r in enumerate(rxa.reps(19), 1) if (c := cwe(r, ctx, Location("RXA", rxa.sequence, 19, i)))
    ]
    if reasons:
        res["reasonCode"] = reasons
    eligibility: list[JSON] = []
    funding: JSON | None = None
    for obx in order.obx:
        code = _loinc(obx)
        if code == ELIGIBILITY and obx.rep(5) and (c := cwe(obx.rep(5), ctx, obx.loc(5))):
            eligibility.append(c)
        elif code == FUNDING and funding is None and obx.rep(5):
            funding = cwe(obx.rep(5), ctx, obx.loc(5))
    if eligibility:
        res["programEligibility"] = eligibility
    if funding:
        res["fundingSource"] = funding
    if edu := _education(order.obx, ctx):
        res["education"] = edu
    # identity
    key_ident = filler or placer
    first = (vaccine.get("coding") or [{}])[0]
    code_key = f"{first.get('system', '')}|{first.get('code', '')}" if first else str(vaccine.get("text", ""))
    order_key = f"{key_ident.get('system', '')}|{key_ident['value']}" if key_ident is not None else ""
    if key_ident is not None and order_key in used:
        # another ORDER group of this message has the same order number: a second administration (a sender
        # that repeats one ORC for its history), not the same one; keyed apart instead of merged into it
        ctx.warn(
            "immunization_duplicate_order_id",
            orc.loc(3 if filler is not None else 2) if orc is not None else None,
            "another order group of this message has the same order number: this administration is keyed by "
            "order number + vaccine + date instead",
        )
        ref = ctx.add("Immunization", res, key=f"{order_key}|immunization|{code_key}|{occurred}")
    elif key_ident is not None and key_ident.get("system"):
        ref = ctx.add("Immunization", res, identifier=(key_ident["system"], key_ident["value"]))
    elif key_ident is not None:
        facility = ctx.message.msh.get(4, 1).strip() or ctx.message.msh.get(3, 1).strip()
        ref = ctx.add("Immunization", res, key=f"{facility}|immunization|{key_ident['value']}")
    else:
        ctx.count("immunization_fallback_key")
        ref = ctx.add("Immunization", res, key=f"{patient_key}|immunization|{code_key}|{occurred}")
    if order_key:
        used.add(order_key)
    ctx.guard(ctx.key_of(ref) or ref, IMMUNIZATION_STATUS_RANK.get(status, 0))
    return ref


def service_request(
    order: _Order, placer: JSON | None, filler: JSON | None, ctx: ConvertContext, enc: str | None
) -> str | None:
    """ORC → ServiceRequest (IG VXU_V04 ORDER.ORC[ServiceRequest], "only if the system wants to know about
    the order"): keyed by ORC-2 placer, else ORC-3 filler; a conditional *create* like ORU's, the ordering
    system owns the order.  The order's Observations are ``basedOn`` it."""
    from transforms import oru

    orc = order.orc
    key_ident = placer or filler
    if orc is None or key_ident is None:
        return None
    res: JSON = {"resourceType": "ServiceRequest"}
    idents: list[JSON] = []
    for ident, code, display in (
        (placer, "PLAC", "Placer Identifier"),
        (filler, "FILL", "Filler Identifier"),
    ):
        if ident is not None:
            typed = dict(ident)
            typed["type"] = {"coding": [{"system": V2_TABLE + "0203", "code": code, "display": display}]}
            idents.append(typed)
    res["identifier"] = idents
    res["status"] = (
        oru.ORDER_STATUS.get(orc.get(5).strip().upper())
        or oru.ORDER_CONTROL_STATUS.get(orc.get(1).strip().upper())
        or "unknown"
    )
    res["intent"] = "order"
    if order.rxa is not None and (vaccine := cwe(order.rxa.rep(5), ctx, order.rxa.loc(5), field="RXA-5")):
        res["code"] = vaccine
    if ctx.patient_ref:
        res["subject"] = {"reference": ctx.patient_ref}
    if enc:
        res["encounter"] = {"reference": enc}
    if orc.rep(12) and (requester := xcn(orc.rep(12), ctx, orc.loc(12))) is not None:
        res["requester"] = requester
    system = key_ident.get("system")
    if system:
        return ctx.add("ServiceRequest", res, identifier=(system, key_ident["value"]), create_only=True)
    facility = ctx.message.msh.get(4, 1).strip() or ctx.message.msh.get(3, 1).strip()
    return ctx.add("ServiceRequest", res, key=f"{facility}|order|{key_ident['value']}", create_only=True)


def _observations(
    obxs: list[Segment],
    notes: dict[int, list[Segment]],
    ctx: ConvertContext,
    key_prefix: str,
    enc: str | None,
    part_of: str | None,
    based_on: str | None = None,
) -> None:
    from transforms import oru

    seen: dict[str, int] = {}
    for obx in obxs:
        if not obx.rep(3):
            ctx.count("obx_without_code_skipped")
            continue
        ref = oru.observation(
            obx,
            notes.get(id(obx), []),
            ctx,
            key_prefix=key_prefix,
            obr=None,
            obr_status_code="",
            seen=seen,
            enc=enc,
        )
        obs = ctx.find(ref) if ref is not None else None
        if obs is not None and part_of:
            obs.setdefault("partOf", [{"reference": part_of}])
        if obs is not None and based_on:
            obs.setdefault("basedOn", [{"reference": based_on}])


def convert(msg: Message, ctx: ConvertContext) -> None:
    """VXU^V04 → Immunization(s) in ``ctx``."""
    from transforms import adt, oru

    trigger = msg.trigger
    if trigger not in TRIGGERS:
        raise MessageRejected(
            f"VXU trigger {redact.trigger(trigger) if trigger else '(empty)'} is not supported (supported: V04)",
            code="201",
            location=Location("MSH", 1, 9, None, 2),
        )
    pid = msg.first("PID")
    if pid is None:
        raise ConversionError("VXU message has no PID segment", code="100", location=Location("PID", 1))
    patient_ref = oru.patient(pid, ctx)
    patient_key = ctx.key_of(patient_ref) or patient_ref
    for nk1 in msg.all("NK1"):
        adt.related_person(nk1, ctx, patient_ref, patient_key)
    enc = oru.encounter(msg, ctx)
    person, person_notes, orders = _groups(msg)
    if not orders:
        # the ORDER group is optional (VXU_V04 [{ ORC ... }]): a demographics-only update
        ctx.count("vxu_without_order")
    if person:
        _observations(person, person_notes, ctx, f"{patient_key}|vxu-observation", enc, None)
    used: set[str] = set()
    for order in orders:
        ref = immunization(order, ctx, patient_key, enc, used)
        orc = order.orc
        sr = (
            service_request(order, ei(orc.rep(2), ctx, orc.loc(2)), ei(orc.rep(3), ctx, orc.loc(3)), ctx, enc)
            if orc is not None
            else None
        )
        if order.obx:
            _observations(order.obx, order.notes, ctx, f"{ctx.key_of(ref) or ref}|observation", enc, ref, sr)


__all__ = ["COMPLETION_STATUS", "IMMUNIZATION_STATUS_RANK", "TRIGGERS", "convert"]
