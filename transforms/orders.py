"""ORC/OBR helpers shared by the order and result messages (ORM/OML/OMG, ORU, MDM, OUL): typed order
identifiers, the placer/filler order numbers, timing and priority (TQ1, ORC-7 / OBR-27), the order type."""

from __future__ import annotations

from typing import Any, Final

from engine.errors import Location
from engine.hl7 import Rep, Segment
from transforms.bundle import ConvertContext
from transforms.datatypes import V2_TABLE, cwe, drop_end_before_start, dtm_at, ei, fhir_code, table

JSON = dict[str, Any]

# table 0027 priority (TQ1-9, ORC-7.6, OBR-27.6, OBR-5) → ServiceRequest.priority
PRIORITY: Final[dict[str, str]] = {
    "S": "stat",
    "A": "asap",
    "R": "routine",
    "P": "urgent",
    "C": "urgent",
    "T": "urgent",
}
# table 0482 order type (ORC-29) → v3 RoleCode service delivery location, next to the v2 coding
ORDER_TYPE_ROLE: Final[dict[str, tuple[str, str]]] = {
    "O": ("OF", "Outpatient facility"),
    "I": ("HOSP", "Hospital"),
}
V3_ROLE_CODE: Final = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"


def typed(ident: JSON, code: str, display: str) -> JSON:
    """``ident`` with an identifier type of table 0203 (PLAC, FILL, PGN, ...)."""
    out = dict(ident)
    out["type"] = {"coding": [{"system": V2_TABLE + "0203", "code": code, "display": display}]}
    return out


def order_numbers(
    orc: Segment | None, obr: Segment | None, ctx: ConvertContext
) -> tuple[JSON | None, JSON | None]:
    """(placer, filler) order numbers: OBR-2/OBR-3, falling back to ORC-2/ORC-3 (ORU's rule)."""
    placer = filler = None
    for seg in (obr, orc):
        if seg is None:
            continue
        if placer is None:
            placer = ei(seg.rep(2), ctx, seg.loc(2))
        if filler is None:
            filler = ei(seg.rep(3), ctx, seg.loc(3))
    return placer, filler


def group_numbers(rep: Rep, ctx: ConvertContext, loc: Location) -> list[JSON]:
    """ORC-4 placer group number → identifiers: EI (``id^namespace^uid^type``), or EIP (v2.8.2:
    ``placer id&ns&uid&type^filler id&ns&uid&type``, recognised by subcomponents in component 1)."""
    if not rep:
        return []
    subs = rep.subs(1)
    if len(subs) <= 1:
        ident = ei(rep, ctx, loc)
        return [ident] if ident is not None else []
    out: list[JSON] = []
    d = ctx.message.delimiters
    for comp in (1, 2):
        parts = rep.subs(comp)
        if parts and parts[0].strip():
            ident = ei(Rep(d.component.join(parts[:4]), d), ctx, loc)
            if ident is not None:
                out.append(ident)
    return out


def requisition_key(orc: Segment | None, obr: Segment | None, ctx: ConvertContext) -> tuple[JSON, str] | None:
    """The last-resort business key of an order with neither a placer nor a filler number (ORC-2/3, OBR-2/3
    empty; called only then): its requisition, the ORC-4 placer group number (the sender's own identifier of
    the requisition, IG ORC-4 → ServiceRequest.requisition), plus the order's code OBR-4 (else OBR-1 set id),
    so a later message for the same requisition and test meets the same resource.  Returns (the requisition
    identifier, the key string) with the located warning ``order_keyed_by_requisition``; None when ORC-4 is
    empty too or the channel is strict (keys stay strict: the caller rejects as before)."""
    if orc is None or ctx.settings.strictness != "lenient" or not orc.rep(4):
        return None
    groups = group_numbers(orc.rep(4), ctx, orc.loc(4))
    if not groups:
        return None
    req = groups[0]
    facility = ctx.message.msh.get(4, 1).strip() or ctx.message.msh.get(3, 1).strip()
    what = "the order's code (OBR-4)"
    if obr is None:
        part = ""
        what = "nothing else (no OBR)"
    elif obr.rep(4):
        code = obr.rep(4)
        part = f"OBR-4:{code.c(3).strip().upper()}|{code.c(1).strip()}"
    else:
        part = f"OBR-1:{obr.get(1).strip()}"
        what = "the OBR-1 set id (OBR-4 is empty)"
    ctx.warn(
        "order_keyed_by_requisition",
        orc.loc(2),
        "the order has neither a placer (ORC-2/OBR-2) nor a filler (ORC-3/OBR-3) order number: it is keyed "
        f"by its requisition (ORC-4 placer group number) and {what}; ask the sender for ORC-2",
    )
    return req, f"{req.get('system') or 'facility:' + facility}|requisition|{req['value']}|{part}"


def timing(
    tq1: Segment | None, orc: Segment | None, obr: Segment | None, ctx: ConvertContext
) -> tuple[JSON | None, str, str]:
    """(bounds period, priority code, repeat pattern code) from TQ1 (v2.5+: TQ1-7/8, TQ1-9, TQ1-3), else
    ORC-7 / OBR-27 (TQ: quantity^interval^duration^start^end^priority; interval component 1 the pattern).
    An end before the start (FHIR per-1) is dropped with the located warning ``order_end_before_start``."""
    settings = ctx.settings
    if tq1 is not None:
        p: JSON = {}
        if tq1.get(7).strip() and (s := dtm_at(tq1.get(7).strip(), settings, tq1, 7)):
            p["start"] = s
        if tq1.get(8).strip() and (e := dtm_at(tq1.get(8).strip(), settings, tq1, 8)):
            p["end"] = e
            _end_not_before_start(p, tq1.loc(8), "TQ1-8", "TQ1-7", ctx)
        return p or None, tq1.get(9).strip().upper(), tq1.get(3).strip()
    for seg, field in ((orc, 7), (obr, 27)):
        if seg is None or not seg.rep(field):
            continue
        rep = seg.rep(field)
        p = {}
        if rep.c(4).strip() and (s := dtm_at(rep.c(4).strip(), settings, seg, field)):
            p["start"] = s
        if rep.c(5).strip() and (e := dtm_at(rep.c(5).strip(), settings, seg, field)):
            p["end"] = e
            name = f"{seg.name}-{field}"
            _end_not_before_start(p, seg.loc(field, 5), f"{name}.5", f"{name}.4", ctx)
        return p or None, rep.c(6).strip().upper(), rep.c(2).strip()
    return None, "", ""


def _end_not_before_start(
    p: JSON, loc: Location, end_name: str, start_name: str, ctx: ConvertContext
) -> None:
    """The order's period (the ServiceRequest's occurrencePeriod or timing bounds) keeps its start when its end
    is before it."""
    drop_end_before_start(
        p,
        ctx,
        "order_end_before_start",
        loc,
        f"the order's end ({end_name}) is before its start ({start_name}): the start is kept, {end_name} dropped",
    )


def order_type(rep: Rep, ctx: ConvertContext, loc: Location) -> JSON | None:
    """ORC-29 order type (table 0482) → a ServiceRequest.locationCode CodeableConcept."""
    cc = cwe(rep, ctx, loc)
    if cc is None:
        return None
    code = rep.c(1).strip().upper()
    role = ORDER_TYPE_ROLE.get(code)
    if role is not None and not rep.c(3).strip():
        # the bare table 0482 code: say which table, and add the v3 service delivery location
        cc["coding"] = [
            {"system": V2_TABLE + "0482", "code": code},
            {"system": V3_ROLE_CODE, "code": role[0], "display": role[1]},
        ]
    return cc


def occurrence(
    res: JSON, tq1: Segment | None, orc: Segment | None, obr: Segment | None, ctx: ConvertContext
) -> None:
    """ServiceRequest.priority and occurrence[x] (IG TQ1[ServiceRequest], TQ[ServiceRequest], OBR-5, OBR-6): the
    priority from TQ1-9 (else ORC-7.6 / OBR-27.6, else OBR-5); a repeat pattern (TQ1-3, TQ-2: table 0335)
    → occurrenceTiming bounded by the period; else the period (TQ1-7/8, TQ-4/5) → occurrencePeriod or
    occurrenceDateTime; else OBR-6 → occurrenceDateTime."""
    period, prio, pattern = timing(tq1, orc, obr, ctx)
    if not prio and obr is not None:
        prio = obr.get(5).strip().upper()
    if prio:
        loc = tq1.loc(9) if tq1 is not None else (orc.loc(7) if orc is not None else None)
        if (p := table(ctx, PRIORITY, prio, loc or Location("ORC", 1, 7), "0027")) is not None:
            res["priority"] = p
    if pattern:
        # a repeat pattern (table 0335: BID, Q4H, Once ...) → occurrenceTiming, bounded by the period
        tim: JSON = {"code": {"coding": [{"system": V2_TABLE + "0335", "code": fhir_code(pattern)}]}}
        if period:
            tim["repeat"] = {"boundsPeriod": period}
        res["occurrenceTiming"] = tim
    elif period and "start" in period and "end" in period:
        res["occurrencePeriod"] = period
    elif period:
        res["occurrenceDateTime"] = period.get("start") or period["end"]
    elif obr is not None and obr.get(6).strip() and (occ := dtm_at(obr.get(6).strip(), ctx.settings, obr, 6)):
        res["occurrenceDateTime"] = occ


__all__ = [
    "ORDER_TYPE_ROLE",
    "PRIORITY",
    "V3_ROLE_CODE",
    "group_numbers",
    "occurrence",
    "order_numbers",
    "order_type",
    "requisition_key",
    "timing",
    "typed",
]
