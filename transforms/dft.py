"""DFT^P03 / P11 (financial transactions) and BAR^P01 / P02 / P05 / P06 / P12 (patient accounts) → Account,
ChargeItem, Procedure, Condition, Coverage.

Per the HL7 V2-to-FHIR IG (PID[Account], FT1[ChargeItem], PR1[Procedure], DG1[Condition], IN1[Coverage];
docs/mapping.md): PID-18 → the Account (status active; BAR^P02 purge and P06 end → inactive) with the
Coverages of the IN1 segments; each FT1 → a ChargeItem on that Account; PR1 → Procedure; DG1 → Condition
(the ADT mapping); the DFT's common order (ORC/OBR/OBX) → ServiceRequest, DiagnosticReport and
Observations through the ORU mapping.  Patient and Encounter are conditional creates (the ADT feed owns
them).

Identity: a ChargeItem is keyed on FT1-2 transaction id (per sending facility), else (counted
``charge_fallback_key``) on patient + FT1-1 + FT1-4 date + FT1-7 code; a Procedure on PR1-19, else on
visit (or patient) + PR1-3 code + PR1-5 time, so a BAR^P12 that updates or deletes (PR1-20 ``D``) a
procedure writes the same resource.
"""

from __future__ import annotations

from typing import Any, Final

from engine.errors import ConversionError, Location
from engine.hl7 import Message, Rep, Segment
from transforms.bundle import ConvertContext, supported_trigger
from transforms.datatypes import V2_TABLE, cwe, dtm_at, ei, nm, xcn

JSON = dict[str, Any]

DFT_TRIGGERS: Final = frozenset({"P03", "P11"})
BAR_TRIGGERS: Final = frozenset({"P01", "P02", "P05", "P06", "P12"})
CLOSING_TRIGGERS: Final = frozenset({"P02", "P06"})
# FT1-6 transaction type (table 0017): every posted transaction is billable; a credit or a payment is its
# own transaction (its own FT1-2), never a change of the charge it offsets
CHARGE_STATUS: Final = "billable"
# PR1[Procedure] leaves Procedure.status to the implementer by the message context: a procedure a DFT/BAR's PR1
# reports or an FT1-25 bills was performed (PR1-20 ``D`` → entered-in-error); an ADT's PR1 says unknown
PROCEDURE_STATUS: Final = "completed"
CHARGE_TYPE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v2-0017"
PROCEDURE_ACTION_DELETE: Final = "D"
SNOMED: Final = "http://snomed.info/sct"
# IG PR1[Procedure]: performer[1] PR1-8 anesthesiologist (SNOMED 88189002), performer[2] PR1-11 surgeon
# (304292004), performer[3] PR1-12 procedure practitioner (the IG gives it no function: less specific)
PERFORMER_FUNCTION: Final[tuple[tuple[int, str, str], ...]] = (
    (8, "88189002", "Anesthesiologist"),
    (11, "304292004", "Surgeon"),
    (12, "", ""),
)


def _split(msg: Message, name: str) -> list[list[Segment]]:
    """Header segments + each run starting at ``name`` (the header repeated in every part)."""
    head: list[Segment] = []
    parts: list[list[Segment]] = []
    for seg in msg.segments:
        if seg.name == name:
            parts.append([*head, seg])
        elif parts:
            parts[-1].append(seg)
        else:
            head.append(seg)
    return parts or [head]


def _sub(msg: Message, segs: list[Segment]) -> Message:
    return Message(msg.text, msg.delimiters, segs)


def _facility(ctx: ConvertContext) -> str:
    msh = ctx.message.msh
    return msh.get(4, 1).strip() or msh.get(3, 1).strip()


def _money(rep: Rep, loc: Location) -> JSON | None:
    """CP / MO (``100&USD``) → Money; a price that is not a number is a located AE 102 at ``loc``."""
    amount = nm(rep.c(1, 1).strip(), loc) if rep.c(1, 1).strip() else None
    if amount is None:
        return None
    money: JSON = {"value": amount}
    currency = rep.c(1, 2).strip().upper()
    if len(currency) == 3 and currency.isalpha():
        money["currency"] = currency
    return money


# ---------------------------------------------------------------------------
def procedure(
    pr1: Segment, ctx: ConvertContext, patient_key: str, enc: str | None, status: str = PROCEDURE_STATUS
) -> str | None:
    """PR1 → Procedure (IG PR1[Procedure]) with ``status`` (the IG leaves it to the message context: a billed
    procedure was done; an ADT does not say, so its caller passes ``unknown``); PR1-20 ``D`` →
    entered-in-error on the same resource."""
    code = cwe(pr1.rep(3), ctx, pr1.loc(3), field="PR1-3")
    desc = pr1.get(4).strip()
    if code is None and desc:
        code = {"text": desc}
    elif code is not None and desc and "text" not in code:
        code["text"] = desc
    if code is None:
        ctx.count("procedure_without_code_skipped")
        return None
    res: JSON = {"resourceType": "Procedure"}
    ident = ei(pr1.rep(19), ctx, pr1.loc(19))
    if ident is not None:
        res["identifier"] = [ident]
    deleted = pr1.get(20).strip().upper() == PROCEDURE_ACTION_DELETE
    res["status"] = "entered-in-error" if deleted else status
    if pr1.rep(6) and (category := cwe(pr1.rep(6), ctx, pr1.loc(6))):
        for coding in category.get("coding", ()):
            coding.setdefault("system", V2_TABLE + "0230")  # PR1-6 procedure functional type
        res["category"] = category
    res["code"] = code
    if ctx.patient_ref:
        res["subject"] = {"reference": ctx.patient_ref}
    if enc:
        res["encounter"] = {"reference": enc}
    when = pr1.get(5).strip()
    if when:
        res["performedDateTime"] = dtm_at(when, ctx.settings, pr1, 5)
    performers: list[JSON] = []
    for field, function, display in PERFORMER_FUNCTION:  # PR1-12 is deprecated in v2.6+ (ROL)
        for i, rep in enumerate(pr1.reps(field), start=1):
            who = xcn(rep, ctx, Location("PR1", pr1.sequence, field, i))
            if who is None or "reference" not in who:
                continue
            performer: JSON = {"actor": who}
            if function:
                performer["function"] = {"coding": [{"system": SNOMED, "code": function, "display": display}]}
            performers.append(performer)
    if performers:
        res["performer"] = performers
    if pr1.rep(15) and (reason := cwe(pr1.rep(15), ctx, pr1.loc(15))):
        res["reasonCode"] = [reason]
    if pr1.rep(25) and (parent := ei(pr1.rep(25), ctx, pr1.loc(25))):
        # IG: partOf the Procedure whose identifier is PR1-25; a logical reference (Reference.identifier): the
        # parent may be sent in another message, or never
        res["partOf"] = [{"identifier": parent}]
    if ident is not None and "system" in ident:
        return ctx.add("Procedure", res, identifier=(ident["system"], ident["value"]))
    first = (code.get("coding") or [{}])[0]
    code_key = f"{first.get('system', '')}|{first.get('code', '')}" if first else str(code.get("text", ""))
    owner = (ctx.key_of(enc) if enc else None) or patient_key
    return ctx.add("Procedure", res, key=f"{owner}|procedure|{code_key}|{when}")


def billed_procedure(ft1: Segment, ctx: ConvertContext, patient_key: str, enc: str | None) -> str | None:
    """FT1-25 procedure code of a charge without its own PR1 → the Procedure that was billed (status
    completed, performed at FT1-4), keyed like a PR1 without PR1-19: visit (or patient) + code + time."""
    code = cwe(ft1.rep(25), ctx, ft1.loc(25), field="FT1-25")
    if code is None:
        return None
    res: JSON = {"resourceType": "Procedure", "status": PROCEDURE_STATUS, "code": code}
    if ctx.patient_ref:
        res["subject"] = {"reference": ctx.patient_ref}
    if enc:
        res["encounter"] = {"reference": enc}
    when = ft1.get(4, 1).strip()
    if when:
        res["performedDateTime"] = dtm_at(when, ctx.settings, ft1, 4)
    first = (code.get("coding") or [{}])[0]
    code_key = f"{first.get('system', '')}|{first.get('code', '')}" if first else str(code.get("text", ""))
    owner = (ctx.key_of(enc) if enc else None) or patient_key
    return ctx.add("Procedure", res, key=f"{owner}|procedure|{code_key}|{when}")


def charge_item(
    ft1: Segment,
    notes: list[Segment],
    services: list[str],
    ctx: ConvertContext,
    patient_key: str,
    enc: str | None,
    account: str | None,
) -> str:
    """FT1 → ChargeItem (IG FT1[ChargeItem])."""
    from transforms import oru

    s = ctx.settings
    code = cwe(ft1.rep(7), ctx, ft1.loc(7), field="FT1-7") or cwe(
        ft1.rep(25), ctx, ft1.loc(25), field="FT1-25"
    )
    if code is None:
        raise ConversionError(
            "FT1-7 transaction code is empty (and no FT1-25 procedure code): send what is charged",
            code="101",
            location=ft1.loc(7),
        )
    res: JSON = {"resourceType": "ChargeItem"}
    txn = ft1.get(2).strip()
    if txn:
        res["identifier"] = [{"value": txn}]
    res["status"] = CHARGE_STATUS
    res["code"] = code
    if ctx.patient_ref:
        res["subject"] = {"reference": ctx.patient_ref}
    if enc:
        res["context"] = {"reference": enc}
    start = ft1.get(4, 1).strip()
    end = ft1.get(4, 2).strip()
    if start and end:
        res["occurrencePeriod"] = {
            "start": dtm_at(start, s, ft1, 4),
            "end": dtm_at(end, s, ft1, 4),
        }
    elif start:
        res["occurrenceDateTime"] = dtm_at(start, s, ft1, 4)
    if ft1.get(5).strip():
        res["enteredDate"] = dtm_at(ft1.get(5), s, ft1, 5)
    if ft1.get(10).strip() and (qty := nm(ft1.get(10).strip(), ft1.loc(10))) is not None:
        res["quantity"] = {"value": qty}
    if ft1.rep(11) and (price := _money(ft1.rep(11), ft1.loc(11))):
        res["priceOverride"] = price
    performers = [
        {"actor": who}
        for i, rep in enumerate(ft1.reps(20), start=1)
        if (who := xcn(rep, ctx, Location("FT1", ft1.sequence, 20, i))) is not None and "reference" in who
    ]
    if performers:
        res["performer"] = performers
    if ft1.rep(24) and (enterer := xcn(ft1.rep(24), ctx, ft1.loc(24))) is not None and "reference" in enterer:
        res["enterer"] = enterer  # FT1-24 entered by
    reasons = [
        c for i, r in enumerate(ft1.reps(19), 1) if (c := cwe(r, ctx, Location("FT1", ft1.sequence, 19, i)))
    ]
    if reasons:
        res["reason"] = reasons
    if services:
        res["service"] = [{"reference": ref} for ref in services]
    if ft1.rep(29) and (product := cwe(ft1.rep(29), ctx, ft1.loc(29), field="FT1-29")):
        res["productCodeableConcept"] = product
    if account:
        res["account"] = [{"reference": account}]
    if notes and (note := oru.annotation(notes, ctx)):
        res["note"] = [note]
    if txn:
        return ctx.add("ChargeItem", res, key=f"{_facility(ctx)}|charge|{txn}")
    ctx.count("charge_fallback_key")
    first = (code.get("coding") or [{}])[0]
    code_key = f"{first.get('system', '')}|{first.get('code', '')}" if first else str(code.get("text", ""))
    return ctx.add("ChargeItem", res, key=f"{patient_key}|charge|{ft1.get(1).strip()}|{start}|{code_key}")


def _orders(msg: Message, ctx: ConvertContext, enc: str | None) -> None:
    """The DFT's common order (ORC/OBR with OBX/NTE) → ServiceRequest, DiagnosticReport, Observations (the ORU
    mapping).  The charge is what the message is about: an order the ORU mapping cannot convert is left out
    with a located warning instead of rejecting the charges."""
    from transforms import oru

    segs = [msg.msh]
    keep = False
    for seg in msg.segments:
        if seg.name in ("ORC", "OBR", "OBX"):
            keep = True
            segs.append(seg)
        elif seg.name == "NTE" and keep:
            segs.append(seg)
        else:
            keep = False
    if len(segs) == 1:
        return
    _pid, orders, _patient_obs = oru._groups(Message(msg.text, msg.delimiters, segs))
    for order in orders:
        try:
            oru.report(order, ctx, enc)
        except ConversionError as exc:
            ctx.warn(
                "dft_order_not_converted",
                exc.location,
                f"the order could not be converted ({exc.hl7_error}): the charges are converted without it",
            )


def _visit(
    msg: Message, pid: Segment, ctx: ConvertContext, patient_ref: str, trigger: str, financial: bool
) -> None:
    """One visit's segments (PV1 and what follows) of one patient."""
    from transforms import adt, adt_events, oru

    patient_key = ctx.key_of(patient_ref) or patient_ref
    enc = oru.encounter(msg, ctx)
    coverages: list[str] = []
    in1s: list[list[Segment]] = []
    for seg in msg.segments:
        if seg.name == "IN1":
            in1s.append([seg])
        elif seg.name == "IN2" and in1s and len(in1s[-1]) == 1:
            in1s[-1].append(seg)
    for group in in1s:
        ref = adt.coverage(group[0], ctx, patient_ref, patient_key, group[1] if len(group) > 1 else None)
        if ref:
            coverages.append(ref)
    account = adt_events.account(
        pid, ctx, patient_ref, "inactive" if trigger in CLOSING_TRIGGERS else "active"
    )
    if account is None:
        ctx.count("account_without_number")
    elif coverages and (acc := ctx.find(account)) is not None:
        acc["coverage"] = [{"coverage": {"reference": c}} for c in coverages]
    conditions = [
        (ref, dg1)
        for dg1 in msg.all("DG1")
        if (ref := adt.condition(dg1, ctx, patient_ref, patient_key, enc))
    ]
    if conditions:
        adt.encounter_diagnoses(enc, conditions, ctx)  # IG DG1[Encounter], as ADT
    if not financial:
        for pr1 in msg.all("PR1"):
            procedure(pr1, ctx, patient_key, enc)
        return
    _orders(msg, ctx, enc)
    # FINANCIAL groups: FT1, its NTEs, its PR1s (FINANCIAL_PROCEDURE)
    groups: list[tuple[Segment, list[Segment], list[Segment]]] = []
    for seg in msg.segments:
        if seg.name == "FT1":
            groups.append((seg, [], []))
        elif not groups:
            if seg.name == "PR1":  # a PR1 before any FT1 (not in the DFT structure): a procedure all the same
                procedure(seg, ctx, patient_key, enc)
        elif seg.name == "NTE" and not groups[-1][2]:
            groups[-1][1].append(seg)
        elif seg.name == "PR1":
            groups[-1][2].append(seg)
    if not groups:
        raise ConversionError(
            "DFT message has no FT1 segment (the financial transaction)",
            code="100",
            location=Location("FT1", 1),
        )
    for ft1, notes, pr1s in groups:
        services = [ref for pr1 in pr1s if (ref := procedure(pr1, ctx, patient_key, enc))]
        if not services and (billed := billed_procedure(ft1, ctx, patient_key, enc)):
            services.append(billed)
        charge_item(ft1, notes, services, ctx, patient_key, enc, account)


def convert(msg: Message, ctx: ConvertContext) -> None:
    """DFT^P03/P11 or BAR^P01/P02/P05/P06/P12 → entries in ``ctx``."""
    from transforms import adt, oru

    kind = msg.message_type
    trigger = supported_trigger(msg, DFT_TRIGGERS if kind == "DFT" else BAR_TRIGGERS)
    patients = _split(msg, "PID")
    if not any(seg.name == "PID" for seg in patients[0]):
        raise ConversionError(f"{kind} message has no PID segment", code="100", location=Location("PID", 1))
    for part in patients:
        patient_msg = _sub(msg, part)
        pid = patient_msg.first("PID")
        assert pid is not None
        patient_ref = oru.patient(pid, ctx)
        adt.mother(pid, ctx, patient_ref, ctx.key_of(patient_ref) or patient_ref)  # PID-21 (IG PID[Patient])
        visits = _split(patient_msg, "PV1")
        for visit in visits:
            _visit(_sub(msg, visit), pid, ctx, patient_ref, trigger, kind == "DFT")


__all__ = ["BAR_TRIGGERS", "DFT_TRIGGERS", "convert"]
