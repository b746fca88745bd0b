"""PPR^PC1 / PC2 / PC3 (patient problem add / update / delete) → Condition (problem-list-item) and Goal.

Per the HL7 V2-to-FHIR IG's PRB[Condition] and GOL[Goal] segment maps (docs/mapping.md): each PROBLEM group
(PRB, its NTE, GOAL groups) → one Condition; each GOL inside it → a Goal that ``addresses`` it.  The Patient
and Encounter are conditional creates, as in ORU (the ADT feed owns them).

Identity and lifecycle: the Condition is keyed on PRB-4 problem instance id (else, counted
``problem_fallback_key``, on patient + PRB-3 problem code), so an update (PC2, PRB-1 UP/CO), a resolution
(PRB-9, or life cycle status resolved) and a deletion (PC3, PRB-1 DE) all write the *same* Condition; a
deletion is ``entered-in-error`` without a clinicalStatus (FHIR con-5).  Goals likewise on GOL-4, else on
the problem + GOL-3.  OBX and orders inside a problem are not mapped (counted ``ppr_segment_not_mapped``).
"""

from __future__ import annotations

from typing import Any, Final

from engine import redact
from engine.errors import ConversionError, Location, MessageRejected
from engine.hl7 import Message, Segment
from transforms.bundle import ConvertContext
from transforms.datatypes import cwe, dtm_at, ei, nm, table

JSON = dict[str, Any]

TRIGGERS: Final = frozenset({"PC1", "PC2", "PC3"})
DELETE_TRIGGERS: Final = frozenset({"PC3"})

CONDITION_CATEGORY: Final = "http://terminology.hl7.org/CodeSystem/condition-category"
CONDITION_CLINICAL: Final = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION: Final = "http://terminology.hl7.org/CodeSystem/condition-ver-status"

# PRB-14 problem life cycle status (user-defined table 0838; what senders send) → Condition.clinicalStatus
CLINICAL_STATUS: Final[dict[str, str]] = {
    "A": "active",
    "ACTIVE": "active",
    "AC": "active",
    "I": "inactive",
    "INACTIVE": "inactive",
    "R": "resolved",
    "RESOLVED": "resolved",
    "RE": "recurrence",
    "RECURRENCE": "recurrence",
    "REL": "relapse",
    "RELAPSE": "relapse",
    "REM": "remission",
    "REMISSION": "remission",
}
# PRB-13 problem confirmation status (table 0315 in v2.3-2.4 / user-defined 0800) → verificationStatus
VERIFICATION_STATUS: Final[dict[str, str]] = {
    "C": "confirmed",
    "CONFIRMED": "confirmed",
    "P": "provisional",
    "PROVISIONAL": "provisional",
    "D": "differential",
    "DIFFERENTIAL": "differential",
    "U": "unconfirmed",
    "UNCONFIRMED": "unconfirmed",
    "R": "refuted",
    "REFUTED": "refuted",
    "E": "entered-in-error",
}
# GOL-18 goal life cycle status → Goal.lifecycleStatus (required in R4)
GOAL_STATUS: Final[dict[str, str]] = {
    "A": "active",
    "ACTIVE": "active",
    "P": "proposed",
    "PROPOSED": "proposed",
    "PL": "planned",
    "PLANNED": "planned",
    "AC": "accepted",
    "ACCEPTED": "accepted",
    "H": "on-hold",
    "ON-HOLD": "on-hold",
    "C": "completed",
    "COMPLETED": "completed",
    "CA": "cancelled",
    "CANCELLED": "cancelled",
    "R": "rejected",
    "REJECTED": "rejected",
}
# Status ranks for guards: a deletion is final (a late resend of the add goes to review instead)
CONDITION_STATUS_RANK: Final[dict[str, int]] = {"entered-in-error": 2}


class _Problem:
    __slots__ = ("goals", "notes", "prb")

    def __init__(self, prb: Segment) -> None:
        self.prb = prb
        self.notes: list[Segment] = []
        self.goals: list[tuple[Segment, list[Segment]]] = []


def _groups(msg: Message, ctx: ConvertContext) -> list[_Problem]:
    problems: list[_Problem] = []
    in_goal = False
    after_main = False  # NTEs belong to the PRB/GOL right before them, not to an OBX/ORC in between
    for seg in msg.segments:
        name = seg.name
        if name == "PRB":
            problems.append(_Problem(seg))
            in_goal, after_main = False, True
        elif not problems:
            continue
        elif name == "GOL":
            problems[-1].goals.append((seg, []))
            in_goal, after_main = True, True
        elif name == "NTE":
            if after_main:
                (problems[-1].goals[-1][1] if in_goal else problems[-1].notes).append(seg)
        elif name in ("VAR", "ROL"):
            continue
        else:
            after_main = False
            if name in ("OBX", "ORC", "OBR", "PTH", "RXO", "RXR", "RXC"):
                ctx.count("ppr_segment_not_mapped")
    return problems


def optional_date(seg: Segment, field: int, ctx: ConvertContext, kind: str = "dateTime") -> str | None:
    """An optional date of ``seg``-``field``: a value that is no HL7 date is dropped with a located warning
    (``bad_date_dropped``) instead of rejecting the problem list update."""
    raw = seg.get(field).strip()
    if not raw:
        return None
    try:
        return dtm_at(raw, ctx.settings, seg, field, kind=kind)
    except ConversionError:
        ctx.warn("bad_date_dropped", seg.loc(field), "not a valid HL7 date/time: the element is left out")
        return None


def _concept(system: str, code: str) -> JSON:
    return {"coding": [{"system": system, "code": code}]}


def condition(problem: _Problem, ctx: ConvertContext, patient_key: str, enc: str | None, delete: bool) -> str:
    """PRB (+ NTE) → Condition (IG PRB[Condition])."""
    from transforms import oru

    prb = problem.prb
    action = prb.get(1).strip().upper()
    code = cwe(prb.rep(3), ctx, prb.loc(3), field="PRB-3")
    if code is None:
        raise ConversionError(
            "PRB-3 problem id (the problem's code) is empty: send the problem's code or text",
            code="101",
            location=prb.loc(3),
        )
    res: JSON = {"resourceType": "Condition"}
    ident = ei(prb.rep(4), ctx, prb.loc(4))
    if ident is not None:
        res["identifier"] = [ident]
    ver = table(ctx, VERIFICATION_STATUS, prb.get(13).strip().upper(), prb.loc(13), "0315")
    clinical = table(ctx, CLINICAL_STATUS, prb.get(14).strip().upper(), prb.loc(14), "0838")
    resolved = optional_date(prb, 9, ctx)
    if delete or action == "DE":
        ver, clinical = "entered-in-error", None
    elif resolved and clinical is None:
        clinical = "resolved"
    if clinical is None and ver != "entered-in-error":
        clinical = "active"  # a problem on the list is active until said otherwise
    if clinical:
        res["clinicalStatus"] = _concept(CONDITION_CLINICAL, clinical)
    if ver:
        res["verificationStatus"] = _concept(CONDITION_VERIFICATION, ver)
    category = [_concept(CONDITION_CATEGORY, "problem-list-item")]
    category[0]["coding"][0]["display"] = "Problem List Item"
    if prb.rep(10) and (cls := cwe(prb.rep(10), ctx, prb.loc(10))):
        category.append(cls)
    res["category"] = category
    if prb.rep(26) and (sev := cwe(prb.rep(26), ctx, prb.loc(26))):
        res["severity"] = sev
    res["code"] = code
    if ctx.patient_ref:
        res["subject"] = {"reference": ctx.patient_ref}
    if enc:
        res["encounter"] = {"reference": enc}
    if onset := optional_date(prb, 16, ctx):
        res["onsetDateTime"] = onset
    elif onset_text := prb.get(17).strip():
        res["onsetString"] = onset_text
    if resolved and clinical in ("resolved", "inactive", "remission"):
        res["abatementDateTime"] = resolved
    if recorded := optional_date(prb, 7, ctx) or optional_date(prb, 2, ctx):
        res["recordedDate"] = recorded
    if problem.notes and (note := oru.annotation(problem.notes, ctx)):
        res["note"] = [note]
    if ident is not None and "system" in ident:
        ref = ctx.add("Condition", res, identifier=(ident["system"], ident["value"]))
    elif ident is not None:
        facility = ctx.message.msh.get(4, 1).strip() or ctx.message.msh.get(3, 1).strip()
        ref = ctx.add("Condition", res, key=f"{patient_key}|problem|{facility}|{ident['value']}")
    else:
        ctx.count("problem_fallback_key")
        first = (code.get("coding") or [{}])[0]
        code_key = (
            f"{first.get('system', '')}|{first.get('code', '')}" if first else str(code.get("text", ""))
        )
        ref = ctx.add("Condition", res, key=f"{patient_key}|problem|{code_key}")
    ctx.guard(ctx.key_of(ref) or ref, CONDITION_STATUS_RANK.get(ver or "", 1))
    return ref


def goal(
    gol: Segment, notes: list[Segment], ctx: ConvertContext, problem_ref: str, delete: bool
) -> str | None:
    """GOL (+ NTE) → Goal addressing the problem's Condition (IG GOL[Goal])."""
    from transforms import oru

    desc = cwe(gol.rep(3), ctx, gol.loc(3), field="GOL-3")
    if desc is None:
        ctx.count("goal_without_id_skipped")
        return None
    action = gol.get(1).strip().upper()
    status = table(ctx, GOAL_STATUS, gol.get(18).strip().upper(), gol.loc(18), "GOL-18") or "active"
    if delete or action == "DE":
        status = "entered-in-error"
    res: JSON = {"resourceType": "Goal"}
    ident = ei(gol.rep(4), ctx, gol.loc(4))
    if ident is not None:
        res["identifier"] = [ident]
    res["lifecycleStatus"] = status
    if gol.rep(9) and (cat := cwe(gol.rep(9), ctx, gol.loc(9))):
        res["category"] = [cat]
    if gol.rep(6) and (prio := nm(gol.get(6).strip(), gol.loc(6))) is not None:
        res["priority"] = {"text": str(prio)}
    res["description"] = desc
    if ctx.patient_ref:
        res["subject"] = {"reference": ctx.patient_ref}
    if start := optional_date(gol, 7, ctx, "date"):
        res["startDate"] = start
    if due := optional_date(gol, 8, ctx, "date"):
        res["target"] = [{"dueDate": due}]
    if status_date := optional_date(gol, 19, ctx, "date"):
        res["statusDate"] = status_date
    res["addresses"] = [{"reference": problem_ref}]
    if notes and (note := oru.annotation(notes, ctx)):
        res["note"] = [note]
    if ident is not None and "system" in ident:
        return ctx.add("Goal", res, identifier=(ident["system"], ident["value"]))
    problem_key = ctx.key_of(problem_ref) or problem_ref
    value = (
        ident["value"]
        if ident is not None
        else desc.get("text") or str(desc.get("coding", [{}])[0].get("code"))
    )
    return ctx.add("Goal", res, key=f"{problem_key}|goal|{value}")


def convert(msg: Message, ctx: ConvertContext) -> None:
    """PPR^PC1/PC2/PC3 → Condition(s) and Goal(s) in ``ctx``."""
    from transforms import oru

    trigger = msg.trigger
    if trigger not in TRIGGERS:
        raise MessageRejected(
            f"PPR trigger {redact.trigger(trigger) if trigger else '(empty)'} is not supported "
            "(supported: PC1, PC2, PC3; the goal and pathway messages PC4-PCL are not converted)",
            code="201",
            location=Location("MSH", 1, 9, None, 2),
        )
    pid = msg.first("PID")
    if pid is None:
        raise ConversionError("PPR message has no PID segment", code="100", location=Location("PID", 1))
    patient_ref = oru.patient(pid, ctx)
    patient_key = ctx.key_of(patient_ref) or patient_ref
    enc = oru.encounter(msg, ctx)
    problems = _groups(msg, ctx)
    if not problems:
        raise ConversionError(
            "PPR message has no PRB segment (the problem)", code="100", location=Location("PRB", 1)
        )
    delete = trigger in DELETE_TRIGGERS
    for problem in problems:
        ref = condition(problem, ctx, patient_key, enc, delete)
        for gol, notes in problem.goals:
            goal(gol, notes, ctx, ref, delete)


__all__ = ["CLINICAL_STATUS", "CONDITION_STATUS_RANK", "TRIGGERS", "VERIFICATION_STATUS", "convert"]
