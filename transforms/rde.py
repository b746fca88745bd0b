"""RDE^O11 / O25 (pharmacy encoded order, refill authorization) and OMP^O09 (pharmacy/treatment order: RXO,
no RXE) → MedicationRequest (+ Medication); RDS^O13 (pharmacy dispense) → MedicationDispense (+ MedicationRequest,
Medication).

Per the HL7 V2-to-FHIR IG's ORC / RXE / RXO / RXR / RXC [MedicationRequest, Medication] and RXD
[MedicationDispense] segment maps (docs/mapping.md): each ORDER group (ORC, TQ1, RXO, RXE, RXR, RXC, NTE,
RXD) → one MedicationRequest; the give / dispense code with the dosage form and the RXC components → a
Medication shared by every order of the same product; each RXD → a MedicationDispense ``authorizingPrescription``
the MedicationRequest.  Patient and Encounter are conditional creates (the ADT feed owns them).

Identity and lifecycle: the MedicationRequest is keyed on ORC-2 placer order number, else ORC-3 filler
order number, else RXE-15 prescription number, so a discontinue (ORC-1 DC / OD, ORC-5 DC), a cancel, a
hold or a release writes the *same* MedicationRequest; stopped / cancelled / completed outrank active (a
late resend of the new order goes to review instead of restarting it).  RDE writes it as a conditional
update (the ordering system owns it); RDS only makes sure it exists (conditional create).  A
MedicationDispense is keyed on the order + RXD-1 dispense sub-id counter (else RXD-3 dispense time).
"""

from __future__ import annotations

from typing import Any, Final

from engine.errors import ConversionError, Location
from engine.hl7 import Message, Rep, Segment
from transforms.bundle import ConvertContext, supported_trigger
from transforms.datatypes import V2_TABLE, cwe, dtm_at, ei, quantity, unsigned_int, xcn

JSON = dict[str, Any]

# O01: the trigger HL7 v2.3/v2.3.1 gave RDE and RDS (structures RDE_O01 / RDS_O01, the same segments);
# v2.4 renamed them O11 / O13, and senders on v2.3 still send O01
RDE_TRIGGERS: Final = frozenset({"O01", "O11", "O25"})
RDS_TRIGGERS: Final = frozenset({"O01", "O13"})
# OMP^O09 (pharmacy/treatment order, from the ordering system): the same ORDER group with RXO as the order
# detail and no RXE; the MedicationRequest is keyed like the RDE's, so the pharmacy's later RDE for the same
# placer number (ORC-2) updates it
OMP_TRIGGERS: Final = frozenset({"O09"})
_TRIGGERS: Final = {"RDE": RDE_TRIGGERS, "RDS": RDS_TRIGGERS, "OMP": OMP_TRIGGERS}
_DETAIL: Final = {"RDE": "RXE", "RDS": "RXD", "OMP": "RXO"}  # the segment each order group of the type needs

# ORC-5 order status (table 0038) → MedicationRequest.status
ORDER_STATUS: Final[dict[str, str]] = {
    "A": "active",
    "CA": "cancelled",
    "CM": "completed",
    "DC": "stopped",
    "ER": "entered-in-error",
    "HD": "on-hold",
    "IP": "active",
    "RP": "stopped",
    "SC": "active",
}
# ORC-1 order control (table 0119) → MedicationRequest.status, when ORC-5 is empty
ORDER_CONTROL_STATUS: Final[dict[str, str]] = {
    "NW": "active",
    "OK": "active",
    "XO": "active",
    "XX": "active",
    "XR": "active",
    "RL": "active",
    "RO": "active",
    "RE": "active",
    "SC": "active",
    "PA": "active",
    "CA": "cancelled",
    "CR": "cancelled",
    "OC": "cancelled",
    "DC": "stopped",
    "DR": "stopped",
    "OD": "stopped",
    "HD": "on-hold",
    "HR": "on-hold",
    "OH": "on-hold",
    "RP": "stopped",
}
# ORC-1 codes whose ORC-9 (transaction time) is a later change, not when the order was written
LATER_CONTROLS: Final = frozenset(
    {"DC", "OD", "DR", "CA", "OC", "CR", "HD", "OH", "HR", "RL", "RP", "XO", "XX"}
)
# Guard ranks: a finished order is not reopened by a late resend of the original
MEDICATION_REQUEST_STATUS_RANK: Final[dict[str, int]] = {
    "active": 1,
    "on-hold": 1,
    "draft": 1,
    "cancelled": 2,
    "stopped": 2,
    "completed": 2,
    "entered-in-error": 3,
}
# ORC-1 / ORC-5 → MedicationDispense.status (a dispense message reports what was dispensed)
DISPENSE_STATUS: Final[dict[str, str]] = {
    "CA": "cancelled",
    "OC": "cancelled",
    "DC": "stopped",
    "OD": "stopped",
}
# RXE-9 / RXD-11 substitution status (table 0167): may / was the product be substituted?
SUBSTITUTION: Final[dict[str, bool]] = {
    "N": False,
    "0": False,
    "G": True,
    "T": True,
    "1": True,
    "2": True,
    "3": True,
}
PLACER: Final = {"coding": [{"system": V2_TABLE + "0203", "code": "PLAC", "display": "Placer Identifier"}]}
FILLER: Final = {"coding": [{"system": V2_TABLE + "0203", "code": "FILL", "display": "Filler Identifier"}]}
PRESCRIPTION: Final = {
    "coding": [{"system": V2_TABLE + "0203", "code": "RXN", "display": "Prescription number"}]
}


class _Order:
    __slots__ = ("notes", "orc", "rxc", "rxd", "rxe", "rxo", "rxr", "tq1")

    def __init__(self, orc: Segment | None) -> None:
        self.orc = orc
        self.tq1: Segment | None = None
        self.rxo: Segment | None = None
        self.rxe: Segment | None = None
        self.rxr: list[Segment] = []
        self.rxc: list[Segment] = []
        self.rxd: list[Segment] = []
        self.notes: dict[str, list[Segment]] = {}  # "RXO" / "RXE" / "RXD<n>" → its NTEs


def _groups(msg: Message) -> list[_Order]:
    orders: list[_Order] = []
    current: _Order | None = None
    note_owner = ""
    for seg in msg.segments:
        name = seg.name
        if name == "ORC":
            current = _Order(seg)
            orders.append(current)
            note_owner = ""
            continue
        if name in ("RXO", "RXE", "RXD") and current is None:
            current = _Order(None)
            orders.append(current)
        if current is None:
            continue
        if name == "TQ1" and current.tq1 is None:
            current.tq1 = seg
        elif name == "RXO":
            current.rxo = seg
            note_owner = "RXO"
        elif name == "RXE":
            current.rxe = seg
            note_owner = "RXE"
        elif name == "RXD":
            current.rxd.append(seg)
            note_owner = f"RXD{len(current.rxd)}"
        elif name == "RXR":
            current.rxr.append(seg)
        elif name == "RXC":
            current.rxc.append(seg)
        elif name == "NTE" and note_owner:
            current.notes.setdefault(note_owner, []).append(seg)
        elif name not in ("TQ2", "NTE"):
            note_owner = ""
    return orders


def _code_key(code: JSON) -> str:
    first = (code.get("coding") or [{}])[0]
    return f"{first.get('system', '')}|{first.get('code', '')}" if first else str(code.get("text", ""))


def _amount(value: str, units: Rep | None, loc: Location) -> JSON | None:
    value = value.strip()
    if not value:
        return None
    return quantity(value, units, loc)


def medication(
    code_rep: Rep, form_rep: Rep | None, rxcs: list[Segment], ctx: ConvertContext, loc: Location
) -> str:
    """The product (give / dispense code, dosage form, RXC components) → Medication (IG RXE[Medication],
    RXC[Medication]), keyed by its content: every order of the same product shares one Medication."""
    code = cwe(code_rep, ctx, loc, field=f"{loc.segment}-{loc.field or 0}")
    if code is None:
        raise ConversionError(
            f"{loc.segment}-{loc.field} (the medication's code) is empty: send the give / dispense code",
            code="101",
            location=loc,
        )
    res: JSON = {"resourceType": "Medication", "code": code}
    parts = [_code_key(code)]
    form = cwe(form_rep, ctx) if form_rep else None
    if form is not None:
        res["form"] = form
        parts.append(_code_key(form))
    ingredients: list[JSON] = []
    for rxc in rxcs:
        item = cwe(rxc.rep(2), ctx, rxc.loc(2), field="RXC-2")
        if item is None:
            continue
        ingredient: JSON = {"itemCodeableConcept": item}
        amount = _amount(rxc.get(3), rxc.rep(4), rxc.loc(3))
        if amount is not None:
            # RXC-3/4 component amount in the product: a Ratio over one unit of it (FHIR rat-1 needs both)
            ingredient["strength"] = {"numerator": amount, "denominator": {"value": 1}}
        ingredients.append(ingredient)
        parts.append(f"{_code_key(item)}|{rxc.get(3).strip()}|{rxc.get(4).strip()}")
    if ingredients:
        res["ingredient"] = ingredients
    return ctx.add("Medication", res, key="medication|" + "|".join(parts))


def _status(orc: Segment | None, ctx: ConvertContext) -> str:
    if orc is None:
        return "active"
    order_status = orc.get(5).strip().upper()
    if order_status and (hit := ORDER_STATUS.get(order_status)):
        return hit
    control = orc.get(1).strip().upper()
    if control and (hit := ORDER_CONTROL_STATUS.get(control)):
        return hit
    if order_status or control:
        ctx.count("code_table_miss")
    return "unknown"


def _dosage(order: _Order, ctx: ConvertContext) -> JSON | None:
    """RXE (else RXO) dose, rate and instructions, RXR route / site / method, TQ1 timing → Dosage."""
    s = ctx.settings
    dose: JSON = {}
    rx = order.rxe
    fields = (3, 4, 5, 7, 23, 24) if rx is not None else (2, 3, 4, 7, 21, 22)
    if rx is None:
        rx = order.rxo
    if rx is not None:
        lo_f, hi_f, unit_f, instr_f, rate_f, rate_unit_f = fields
        if rx.rep(instr_f) and (instr := cwe(rx.rep(instr_f), ctx, rx.loc(instr_f))):
            dose["text"] = (
                instr.get("text") or instr["coding"][0].get("display") or instr["coding"][0]["code"]
            )
        low = _amount(rx.get(lo_f), rx.rep(unit_f), rx.loc(lo_f))
        high = _amount(rx.get(hi_f), rx.rep(unit_f), rx.loc(hi_f))
        rate: JSON = {}
        if low is not None and high is not None and high != low:
            rate["doseRange"] = {"low": low, "high": high}
        elif low is not None:
            rate["doseQuantity"] = low
        if (r := _amount(rx.get(rate_f), rx.rep(rate_unit_f), rx.loc(rate_f))) is not None:
            rate["rateQuantity"] = r
        if rate:
            dose["doseAndRate"] = [rate]
    timing: JSON = {}
    tq1 = order.tq1
    if tq1 is not None:
        pattern = tq1.get(3, 1).strip()
        if pattern:
            timing["code"] = {"text": pattern}
        start = tq1.get(7).strip()
        end = tq1.get(8).strip()
        bounds: JSON = {}
        if start:
            bounds["start"] = dtm_at(start, s, tq1, 7)
        if end:
            bounds["end"] = dtm_at(end, s, tq1, 8)
        if bounds:
            timing["repeat"] = {"boundsPeriod": bounds}
    elif order.orc is not None and (legacy := order.orc.get(7, 2).strip()):
        timing["code"] = {"text": legacy}  # ORC-7 quantity/timing (TQ, before v2.5): its interval
    if timing:
        dose["timing"] = timing
    if order.rxr:
        rxr = order.rxr[0]
        if rxr.rep(2) and (site := cwe(rxr.rep(2), ctx, rxr.loc(2))):
            dose["site"] = site
        if rxr.rep(1) and (route := cwe(rxr.rep(1), ctx, rxr.loc(1))):
            dose["route"] = route
        if rxr.rep(4) and (method := cwe(rxr.rep(4), ctx, rxr.loc(4))):
            dose["method"] = method
    return dose or None


def _identifiers(order: _Order, ctx: ConvertContext) -> tuple[list[JSON], JSON | None]:
    """ORC-2 placer, ORC-3 filler, RXE-15 prescription number; and the one that keys the order."""
    orc, rxe = order.orc, order.rxe
    idents: list[JSON] = []
    key: JSON | None = None
    for seg, field, kind in ((orc, 2, PLACER), (orc, 3, FILLER)):
        if seg is not None and (ident := ei(seg.rep(field), ctx, seg.loc(field))) is not None:
            idents.append({"type": kind, **ident})
            key = key or ident
    if rxe is not None and (rx_no := rxe.get(15).strip()):
        idents.append({"type": PRESCRIPTION, "value": rx_no})
        key = key or {"value": rx_no}
    return idents, key


def _facility(ctx: ConvertContext) -> str:
    msh = ctx.message.msh
    return msh.get(4, 1).strip() or msh.get(3, 1).strip()


def medication_request(
    order: _Order, ctx: ConvertContext, patient_key: str, enc: str | None, *, create_only: bool
) -> str:
    """ORC + RXE (else RXO) + RXR + RXC + TQ1 → MedicationRequest (IG ORC/RXE/RXO[MedicationRequest])."""
    from transforms import oru

    s = ctx.settings
    orc, rxe, rxo = order.orc, order.rxe, order.rxo
    product = rxe if rxe is not None else rxo
    where = orc if orc is not None else (product or order.rxd[0])
    if product is not None:
        code_field, form_field = (2, 6) if rxe is not None else (1, 5)
        med = medication(
            product.rep(code_field), product.rep(form_field), order.rxc, ctx, product.loc(code_field)
        )
    elif order.rxd:
        rxd = order.rxd[0]
        med = medication(rxd.rep(2), rxd.rep(6), order.rxc, ctx, rxd.loc(2))
    else:
        raise ConversionError(
            "the order group has no RXE (pharmacy encoded order): send one RXE per ORC",
            code="100",
            location=Location("RXE", where.sequence + 1),
        )
    res: JSON = {"resourceType": "MedicationRequest"}
    idents, key_ident = _identifiers(order, ctx)
    if idents:
        res["identifier"] = idents
    status = _status(orc, ctx)
    res["status"] = status
    res["intent"] = "order"
    res["medicationReference"] = {"reference": med}
    if ctx.patient_ref:
        res["subject"] = {"reference": ctx.patient_ref}
    if enc:
        res["encounter"] = {"reference": enc}
    if rxe is not None and rxe.get(32).strip():
        res["authoredOn"] = dtm_at(rxe.get(32), s, rxe, 32)  # original order date/time
    elif orc is not None and orc.get(9).strip() and orc.get(1).strip().upper() not in LATER_CONTROLS:
        res["authoredOn"] = dtm_at(orc.get(9), s, orc, 9)
    if orc is not None and orc.rep(12) and (requester := xcn(orc.rep(12), ctx, orc.loc(12))) is not None:
        res["requester"] = requester
    reasons: list[JSON] = []
    if rxe is not None:
        reasons = [
            c
            for i, r in enumerate(rxe.reps(27), 1)
            if (c := cwe(r, ctx, Location("RXE", rxe.sequence, 27, i)))
        ]
    elif rxo is not None:
        reasons = [
            c
            for i, r in enumerate(rxo.reps(20), 1)
            if (c := cwe(r, ctx, Location("RXO", rxo.sequence, 20, i)))
        ]
    if reasons:
        res["reasonCode"] = reasons
    notes = order.notes.get("RXE") or order.notes.get("RXO")
    if notes and (note := oru.annotation(notes, ctx)):
        res["note"] = [note]
    if (dosage := _dosage(order, ctx)) is not None:
        res["dosageInstruction"] = [dosage]
    if rxe is not None:
        dispense: JSON = {}
        if refills := unsigned_int(rxe.get(12).strip()):
            dispense["numberOfRepeatsAllowed"] = refills
        if (amount := _amount(rxe.get(10), rxe.rep(11), rxe.loc(10))) is not None:
            dispense["quantity"] = amount
        if dispense:
            res["dispenseRequest"] = dispense
        substitution = rxe.get(9).strip().upper()
        if substitution in SUBSTITUTION:
            res["substitution"] = {"allowedBoolean": SUBSTITUTION[substitution]}
    if key_ident is None:
        raise ConversionError(
            "the order has no placer (ORC-2), filler (ORC-3) or prescription number (RXE-15): send one so "
            "later messages about it update the same MedicationRequest",
            code="101",
            location=orc.loc(2) if orc is not None else Location("ORC", 1, 2),
        )
    if "system" in key_ident:
        ref = ctx.add(
            "MedicationRequest",
            res,
            identifier=(key_ident["system"], key_ident["value"]),
            create_only=create_only,
        )
    else:
        ref = ctx.add(
            "MedicationRequest",
            res,
            key=f"{_facility(ctx)}|medication-order|{key_ident['value']}",
            create_only=create_only,
        )
    if not create_only:
        ctx.guard(ctx.key_of(ref) or ref, MEDICATION_REQUEST_STATUS_RANK.get(status, 0))
    return ref


def medication_dispense(
    order: _Order, index: int, ctx: ConvertContext, request_ref: str, enc: str | None
) -> str:
    """RXD (+ its NTEs) → MedicationDispense (IG RXD[MedicationDispense]) authorized by the order."""
    from transforms import oru

    s = ctx.settings
    rxd = order.rxd[index]
    med = medication(rxd.rep(2), rxd.rep(6), order.rxc, ctx, rxd.loc(2))
    res: JSON = {"resourceType": "MedicationDispense"}
    if rx_no := rxd.get(7).strip():
        res["identifier"] = [{"type": PRESCRIPTION, "value": rx_no}]
    orc = order.orc
    control = orc.get(1).strip().upper() if orc is not None else ""
    res["status"] = DISPENSE_STATUS.get(control, "completed")
    res["medicationReference"] = {"reference": med}
    if ctx.patient_ref:
        res["subject"] = {"reference": ctx.patient_ref}
    if enc:
        res["context"] = {"reference": enc}
    performers = [
        {"actor": who}
        for i, rep in enumerate(rxd.reps(10), start=1)
        if (who := xcn(rep, ctx, Location("RXD", rxd.sequence, 10, i))) is not None and "reference" in who
    ]
    if performers:
        res["performer"] = performers
    res["authorizingPrescription"] = [{"reference": request_ref}]
    if (amount := _amount(rxd.get(4), rxd.rep(5), rxd.loc(4))) is not None:
        res["quantity"] = amount
    when = rxd.get(3).strip()
    if when:
        res["whenHandedOver"] = dtm_at(when, s, rxd, 3)
    notes = order.notes.get(f"RXD{index + 1}")
    if notes and (note := oru.annotation(notes, ctx)):
        res["note"] = [note]
    if (dose := _dosage(order, ctx)) is not None:
        res["dosageInstruction"] = [dose]
    substitution = rxd.get(11).strip().upper()
    if substitution in SUBSTITUTION:
        res["substitution"] = {"wasSubstituted": SUBSTITUTION[substitution]}
    counter = rxd.get(1).strip() or when
    if not counter:
        raise ConversionError(
            "RXD-1 dispense sub-id counter and RXD-3 date/time dispensed are both empty: send one so a resent "
            "dispense updates the same MedicationDispense",
            code="101",
            location=rxd.loc(1),
        )
    return ctx.add(
        "MedicationDispense", res, key=f"{ctx.key_of(request_ref) or request_ref}|dispense|{counter}"
    )


def convert(msg: Message, ctx: ConvertContext) -> None:
    """RDE^O11/O25 (O01 in v2.3), RDS^O13 (O01 in v2.3) or OMP^O09 → entries in ``ctx``."""
    from transforms import oru

    kind = msg.message_type
    supported_trigger(msg, _TRIGGERS.get(kind, RDE_TRIGGERS))
    pid = msg.first("PID")
    if pid is None:
        raise ConversionError(
            f"{kind} message has no PID segment: a medication order needs a patient",
            code="100",
            location=Location("PID", 1),
        )
    patient_ref = oru.patient(pid, ctx)
    patient_key = ctx.key_of(patient_ref) or patient_ref
    enc = oru.encounter(msg, ctx)
    orders = _groups(msg)
    if not orders:
        name = _DETAIL.get(kind, "RXE")
        raise ConversionError(
            f"{kind} message has no ORC/{name} order group", code="100", location=Location(name, 1)
        )
    for order in orders:
        if kind == "RDE" and order.rxe is None:
            where = order.orc.sequence + 1 if order.orc is not None else 1
            raise ConversionError(
                "RDE order group without an RXE (pharmacy encoded order): send one RXE per ORC",
                code="100",
                location=Location("RXE", where),
            )
        if kind == "OMP" and order.rxo is None:
            where = order.orc.sequence + 1 if order.orc is not None else 1
            raise ConversionError(
                "OMP order group without an RXO (pharmacy/treatment order): send one RXO per ORC",
                code="100",
                location=Location("RXO", where),
            )
        if kind == "RDS" and not order.rxd:
            where = order.orc.sequence + 1 if order.orc is not None else 1
            raise ConversionError(
                "RDS order group without an RXD (pharmacy dispense): send one RXD per ORC",
                code="100",
                location=Location("RXD", where),
            )
        ref = medication_request(order, ctx, patient_key, enc, create_only=kind == "RDS")
        for i in range(len(order.rxd)):
            medication_dispense(order, i, ctx, ref, enc)


__all__ = [
    "MEDICATION_REQUEST_STATUS_RANK",
    "OMP_TRIGGERS",
    "ORDER_CONTROL_STATUS",
    "ORDER_STATUS",
    "RDE_TRIGGERS",
    "RDS_TRIGGERS",
    "convert",
]
