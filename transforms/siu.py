"""SIU (scheduling) → Appointment (+ Patient, Practitioner, Location).

One Appointment per message keyed by SCH-2 (filler appointment id, else SCH-1 placer id), so
book (S12) → reschedule (S13) → modify (S14) → cancel (S15/S16) → delete (S17) / no-show (S26)
all update the *same* Appointment.  Status: SCH-25 through the IG's table-0278 map, overridden by
the trigger for S15/S16 (cancelled), S17 (entered-in-error) and S26 (noshow).

A cancellation that arrives before any booking creates the Appointment with status cancelled, unless
the channel sets ``cancel_before_book: error``: then the Appointment key goes into ``requires`` and
the engine answers AE 204 when no booking was applied before.  See docs/mapping.md.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Final

from engine import redact
from engine.errors import ConversionError, Location, MessageRejected
from engine.hl7 import Message, Rep, Segment
from transforms.bundle import ConvertContext
from transforms.datatypes import V2_TABLE, cwe, dtm, ei, pl, table, xads, xcn, xtns
from transforms.oru import _placer_filler, _ref, annotation, patient

JSON = dict[str, Any]

# SCH-25 / AIx filler status (table 0278) → Appointment.status (IG FillerStatusCodes[Appointment]).
FILLER_STATUS: Final[dict[str, str]] = {
    "PENDING": "pending",
    "WAITLIST": "waitlist",
    "BOOKED": "booked",
    "STARTED": "checked-in",
    "COMPLETE": "fulfilled",
    "CANCELLED": "cancelled",
    "DELETED": "entered-in-error",
    "NOSHOW": "noshow",
    # not mapped by the IG (Sluice choices, docs/mapping.md)
    "OVERBOOK": "booked",
    "DISCONTINUED": "cancelled",
}

# Trigger → forced status (None: SCH-25, else booked)
TRIGGER_STATUS: Final[dict[str, str | None]] = {
    "S12": None,
    "S13": None,
    "S14": None,
    "S15": "cancelled",
    "S16": "cancelled",
    "S17": "entered-in-error",
    "S26": "noshow",
}
CANCEL_TRIGGERS: Final = frozenset({"S15", "S16", "S17"})

# Guard ranks: a late booking/reschedule after a cancellation goes to manual review.
APPOINTMENT_STATUS_RANK: Final[dict[str, int]] = {
    "proposed": 1,
    "pending": 1,
    "waitlist": 1,
    "booked": 1,
    "arrived": 2,
    "checked-in": 2,
    "fulfilled": 3,
    "cancelled": 3,
    "noshow": 3,
    "entered-in-error": 4,
}

# Participant status (ParticipationStatus) from the resource's own filler status
_PARTICIPANT_STATUS: Final = {
    "cancelled": "declined",
    "noshow": "declined",
    "entered-in-error": "declined",
    "pending": "tentative",
    "waitlist": "tentative",
    "proposed": "needs-action",
}

# SCH-7 codes of table 0276 (FHIR Appointment.appointmentType is bound to v2-0276)
APPOINTMENT_REASON_0276: Final = {
    "CHECKUP": "A routine check-up, such as an annual physical",
    "EMERGENCY": "Emergency appointment",
    "FOLLOWUP": "A follow up visit from a previous appointment",
    "ROUTINE": "Routine appointment - default if not valued",
    "WALKIN": "A previously unscheduled walk-in visit",
}

_UNIT_MINUTES: Final = {
    "S": 1 / 60,
    "SEC": 1 / 60,
    "M": 1.0,
    "MIN": 1.0,
    "H": 60.0,
    "HR": 60.0,
    "HOUR": 60.0,
    "D": 1440.0,
    "DAY": 1440.0,
    "W": 10080.0,
    "WK": 10080.0,
}
_UNIT_SECONDS_UCUM: Final = {"s": 1 / 60, "min": 1.0, "h": 60.0, "d": 1440.0, "wk": 10080.0}


def _minutes(amount: str, units: Rep | None, loc: Location) -> float | None:
    """A duration NM + CNE/CE units (default minutes) → minutes; invalid → AE 102."""
    amount = amount.strip()
    if not amount:
        return None
    try:
        value = float(amount)
    except ValueError:
        raise ConversionError(f"{loc} is not a number (duration)", code="102", location=loc) from None
    if value < 0 or value != value or value > 10_000_000:
        raise ConversionError(f"{loc} is not a usable duration", code="102", location=loc)
    code = units.c(1).strip() if units is not None else ""
    factor = (_UNIT_SECONDS_UCUM.get(code) or _UNIT_MINUTES.get(code.upper(), 1.0)) if code else 1.0
    return value * factor


def _plus(start: str, minutes: float, explicit_offset: bool, ctx: ConvertContext) -> str:
    """FHIR instant + minutes; the end is in the site zone (DST-correct) unless the start had an offset."""
    t = datetime.fromisoformat(start) + timedelta(minutes=minutes)
    if not explicit_offset:
        t = t.astimezone(ctx.settings.zone)
    return t.isoformat(timespec="seconds")


def _has_offset(value: str) -> bool:
    v = value.strip()
    return len(v) > 5 and v[-5] in "+-"


def _instant(value: str, ctx: ConvertContext, loc: Location) -> str | None:
    v = value.strip()
    if not v:
        return None
    return dtm(v, ctx.settings, loc, kind="instant")


class _Timing:
    """Start/end of one resource segment (AIS/AIL/AIP/AIG) or of the appointment."""

    __slots__ = ("end", "start")

    def __init__(self, start: str | None = None, end: str | None = None):
        self.start = start
        self.end = end

    def period(self) -> JSON | None:
        p: JSON = {}
        if self.start:
            p["start"] = self.start
        if self.end:
            p["end"] = self.end
        return p or None


def resource_timing(
    seg: Segment,
    start_f: int,
    dur_f: int,
    ctx: ConvertContext,
    default_start: str | None,
    default_offset: bool,
) -> _Timing:
    """AIx start date/time (or the appointment start + start offset) and duration → timing."""
    raw = seg.get(start_f).strip()
    start = _instant(raw, ctx, seg.loc(start_f))
    explicit = _has_offset(raw) if raw else default_offset
    if start is None and default_start is not None:
        offset = _minutes(seg.get(start_f + 1), seg.rep(start_f + 2), seg.loc(start_f + 1))
        start = _plus(default_start, offset, default_offset, ctx) if offset else default_start
    end = None
    if start is not None:
        dur = _minutes(seg.get(dur_f), seg.rep(dur_f + 1), seg.loc(dur_f))
        if dur:
            end = _plus(start, dur, explicit, ctx)
    return _Timing(start, end)


def _status_of(seg: Segment, field: int, ctx: ConvertContext) -> str | None:
    code = seg.get(field, 1).strip()
    if not code:
        return None
    return table(ctx, FILLER_STATUS, code.upper(), seg.loc(field), "0278")


def appointment_status(trigger: str, sch: Segment, ctx: ConvertContext) -> str:
    forced = TRIGGER_STATUS.get(trigger)
    if forced:
        return forced
    return _status_of(sch, 25, ctx) or "booked"


def _participant(actor: JSON, status: str | None, types: list[JSON], timing: _Timing | None) -> JSON:
    p: JSON = {}
    if types:
        p["type"] = types
    p["actor"] = actor
    p["required"] = "required"
    p["status"] = _PARTICIPANT_STATUS.get(status or "", "accepted")
    if timing is not None and (per := timing.period()):
        p["period"] = per
    return p


# SCH-12 / SCH-16 / SCH-20 → Appointment.participant.type (IG SCH[Appointment]).  The IG assigns the
# placeholder codes ``#placer contact#`` / ``#filler contact#`` (no such concepts exist yet), so those two
# are local codes; SCH-20 uses the IG's provenance-participant-type ``enterer``.  See docs/mapping.md.
# Each contact's phone (SCH-13 / SCH-17 / SCH-21) and address (SCH-14 / SCH-18 / -) go on its Practitioner:
# the IG gives them no target, but they are how the scheduler reaches that person (docs/mapping.md).
_CONTACT_DETAILS: Final[dict[int, tuple[int, int | None]]] = {12: (13, 14), 16: (17, 18), 20: (21, None)}
_CONTACT_TYPES: Final[tuple[tuple[int, JSON], ...]] = (
    (
        12,
        {
            "coding": [
                {
                    "system": "urn:sluice:codesystem:participant-type",
                    "code": "placer-contact",
                    "display": "Placer Contact",
                }
            ],
            "text": "Placer contact person",
        },
    ),
    (
        16,
        {
            "coding": [
                {
                    "system": "urn:sluice:codesystem:participant-type",
                    "code": "filler-contact",
                    "display": "Filler Contact",
                }
            ],
            "text": "Filler contact person",
        },
    ),
    (
        20,
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                    "code": "enterer",
                    "display": "Enterer",
                }
            ],
            "text": "Entered by",
        },
    ),
)


def contact_participants(sch: Segment, ctx: ConvertContext) -> list[JSON]:
    """SCH-12 placer contact, SCH-16 filler contact, SCH-20 entered-by person → Practitioner participants
    (``required: information-only``: they are named for contact, not expected to attend).  The same
    person in several roles is one participant with several types."""
    out: list[JSON] = []
    by_actor: dict[str, JSON] = {}
    for field, ptype in _CONTACT_TYPES:
        rep = sch.rep(field)
        if not rep:
            continue
        actor = xcn(rep, ctx, sch.loc(field))
        if actor is None:
            continue
        if (prac := ctx.find(actor.get("reference", ""))) is not None:
            phone_f, addr_f = _CONTACT_DETAILS[field]
            if "telecom" not in prac and (telecom := xtns(sch, phone_f, "work")):
                prac["telecom"] = telecom
            if addr_f and "address" not in prac and (address := xads(sch, addr_f, ctx.settings)):
                prac["address"] = address
        key = actor.get("reference") or actor.get("display", "")
        same = by_actor.get(key)
        if same is not None:
            same["type"].append(dict(ptype))
            continue
        p: JSON = {
            "type": [dict(ptype)],
            "actor": actor,
            "required": "information-only",
            "status": "accepted",
        }
        by_actor[key] = p
        out.append(p)
    return out


def _notes_after(msg: Message) -> dict[int, list[Segment]]:
    """NTE segments grouped under the index of the segment they follow (SCH, AIS, AIG, AIL, AIP)."""
    out: dict[int, list[Segment]] = {}
    owner: int | None = None
    for i, seg in enumerate(msg.segments):
        if seg.name in ("SCH", "AIS", "AIG", "AIL", "AIP"):
            owner = i
        elif seg.name == "NTE":
            if owner is not None:
                out.setdefault(owner, []).append(seg)
        elif seg.name != "TQ1":
            owner = None
    return out


def patient_context(msg: Message, ctx: ConvertContext, patient_ref: str) -> None:
    """The IG's SIU PATIENT group beyond PID: PV1/PV2 → Encounter (a conditional create, like ORU: the ADT
    feed owns it), OBX → Observation (same mapping and key as an ADT's OBX: patient + OBX-3 + OBX-4),
    DG1 → Condition (same key as ADT: encounter, else patient, + code)."""
    from transforms import adt, oru

    patient_key = ctx.key_of(patient_ref) or patient_ref
    if (pid := msg.first("PID")) is not None:
        adt.mother(pid, ctx, patient_ref, patient_key)  # PID-21 (IG PID[Patient] → RelatedPerson-Mother)
    enc_ref = oru.encounter(msg, ctx)
    if msg.first("OBX") is not None:
        adt.observations(msg, ctx, patient_key, enc_ref)
    for dg1 in msg.all("DG1"):
        adt.condition(dg1, ctx, patient_ref, patient_key, enc_ref)


def service_requests(msg: Message, sch: Segment, trigger: str, ctx: ConvertContext) -> list[JSON]:
    """IG SIU_S12: ``IF SCH-26 or SCH-27 VALUED`` → ServiceRequest[1..n] (SCH[ServiceRequest]) that the
    Appointment is ``basedOn``.  SCH-26/SCH-27 repetitions are paired by position (the IG leaves aligning
    repeating orders with repeating AIS to the implementer: the first AIS-3 gives every one its code).

    Keyed exactly like the ORU's order (placer number, else filler; system, else facility), and written as a
    conditional *create*: the ordering system's feed owns the order, an appointment only makes sure it
    exists, so an ORM/ORU and an SIU for the same order meet in one ServiceRequest."""
    placers = [ei(r, ctx, sch.loc(26)) for r in sch.reps(26)] if sch.get(26).strip() else []
    fillers = [ei(r, ctx, sch.loc(27)) for r in sch.reps(27)] if sch.get(27).strip() else []
    if not any(placers) and not any(fillers):
        return []
    if not ctx.patient_ref:
        # FHIR R4 ServiceRequest.subject is 1..1: an SIU without a PID has no patient to order for
        ctx.warn(
            "order_without_patient",
            sch.loc(26) if sch.get(26).strip() else sch.loc(27),
            "SCH-26/SCH-27 name an order but the message has no PID: no ServiceRequest was written "
            "(the Appointment is kept without basedOn)",
        )
        return []
    code = None
    for seg in msg.all("AIS"):
        if seg.rep(3) and (code := cwe(seg.rep(3), ctx, seg.loc(3), field="AIS-3")) is not None:
            break
    facility = msg.msh.get(4, 1).strip() or msg.msh.get(3, 1).strip()
    # IG: status "active" IF SCH-25 NOT VALUED; the table it names for SCH-25 (FillerStatusCodes[Appointment])
    # yields Appointment codes, so a cancelled or deleted appointment's order is revoked, anything else active
    status = "revoked" if trigger in CANCEL_TRIGGERS else "active"
    refs: list[JSON] = []
    for n in range(max(len(placers), len(fillers))):
        placer = placers[n] if n < len(placers) else None
        filler = fillers[n] if n < len(fillers) else None
        key_ident = placer or filler
        if key_ident is None:
            continue
        res: JSON = {"identifier": _placer_filler(placer, filler), "status": status, "intent": "order"}
        if code is not None:
            res["code"] = code
        res["subject"] = _ref(ctx.patient_ref)
        system = key_ident.get("system")
        if system:
            ref = ctx.add("ServiceRequest", res, identifier=(system, key_ident["value"]), create_only=True)
        else:
            ref = ctx.add(
                "ServiceRequest", res, key=f"{facility}|order|{key_ident['value']}", create_only=True
            )
        refs.append(_ref(ref))
    return refs


def convert(msg: Message, ctx: ConvertContext) -> None:
    """SIU^S12..S17, S26 → an Appointment in ``ctx``."""
    trigger = msg.trigger
    if trigger not in TRIGGER_STATUS:
        raise MessageRejected(
            f"SIU trigger {redact.trigger(trigger) if trigger else '(empty)'} is not supported (supported: "
            + ", ".join(sorted(TRIGGER_STATUS))
            + ")",
            code="201",
            location=Location("MSH", 1, 9, None, 2),
        )
    sch = msg.first("SCH")
    if sch is None:
        raise ConversionError("SIU message has no SCH segment", code="100", location=Location("SCH", 1))
    s = ctx.settings
    placer = ei(sch.rep(1), ctx, sch.loc(1))
    filler = ei(sch.rep(2), ctx, sch.loc(2))
    key_ident = filler or placer
    if key_ident is None:
        raise ConversionError(
            "SCH has neither a filler (SCH-2) nor a placer (SCH-1) appointment id: send SCH-2",
            code="101",
            location=sch.loc(2),
        )
    res: JSON = {}
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
    status = appointment_status(trigger, sch, ctx)
    res["status"] = status
    if trigger in ("S15", "S16", "S17") and sch.rep(6) and (reason := cwe(sch.rep(6), ctx, sch.loc(6))):
        res["cancelationReason"] = reason
    # SCH-7 (reason, table 0276) → appointmentType when it is a 0276 code, else reasonCode; SCH-8 → appointmentType
    reason_rep = sch.rep(7)
    if reason_rep:
        code = reason_rep.c(1).strip().upper()
        sysname = reason_rep.c(3).strip().upper()
        if code in APPOINTMENT_REASON_0276 and sysname in ("", "HL70276", "HL7-0276"):
            res["appointmentType"] = {
                "coding": [
                    {"system": V2_TABLE + "0276", "code": code, "display": APPOINTMENT_REASON_0276[code]}
                ]
            }
        elif cc := cwe(reason_rep, ctx, sch.loc(7), field="SCH-7"):
            res["reasonCode"] = [cc]
    if "appointmentType" not in res and sch.rep(8):
        type_rep = sch.rep(8)
        if type_rep.c(3).strip():
            cc = cwe(type_rep, ctx, sch.loc(8), field="SCH-8")
        else:
            code = type_rep.c(1).strip()
            cc = {"coding": [{"system": V2_TABLE + "0277", "code": code}]} if code else None
        if cc:
            res["appointmentType"] = cc
    # times: TQ1-7/8, else SCH-11 (TQ) start/end, else the resources' times
    tq1 = msg.first("TQ1")
    start_raw = end_raw = ""
    start_loc = end_loc = sch.loc(11)
    if tq1 is not None and tq1.get(7).strip():
        start_raw, start_loc = tq1.get(7), tq1.loc(7)
        end_raw, end_loc = tq1.get(8), tq1.loc(8)
    elif sch.get(11, 4).strip():
        start_raw, start_loc = sch.get(11, 4), Location("SCH", sch.sequence, 11, 1, 4)
        end_raw, end_loc = sch.get(11, 5), Location("SCH", sch.sequence, 11, 1, 5)
    start = _instant(start_raw, ctx, start_loc)
    end = _instant(end_raw, ctx, end_loc)
    explicit = _has_offset(start_raw)
    duration = _minutes(sch.get(9), sch.rep(10), sch.loc(9))
    # participants
    participants: list[JSON] = []
    notes = _notes_after(msg)
    pid = msg.first("PID")
    if pid is not None:
        pref = patient(pid, ctx)
        participants.append(_participant({"reference": pref}, None, [], None))
        patient_context(msg, ctx, pref)
    participants.extend(contact_participants(sch, ctx))
    service_types: list[JSON] = []
    timings: list[_Timing] = []
    for seg in msg.segments:
        name = seg.name
        if name == "AIS":
            t = resource_timing(seg, 4, 7, ctx, start, explicit)
            timings.append(t)
            if seg.rep(3) and (cc := cwe(seg.rep(3), ctx, seg.loc(3), field="AIS-3")):
                service_types.append(cc)
        elif name in ("AIL", "AIP"):
            t = resource_timing(seg, 6, 9, ctx, start, explicit)
            timings.append(t)
            own = _status_of(seg, 12, ctx)
            if name == "AIL":
                actor = pl(seg.rep(3), ctx, seg.loc(3))
                types: list[JSON] = []
            else:
                actor = xcn(seg.rep(3), ctx, seg.loc(3))
                types = [c for r in seg.reps(4) if (c := cwe(r, ctx, seg.loc(4), field="AIP-4")) is not None]
            if actor is None:
                if seg.rep(3):
                    ctx.count("participant_without_identity")
                continue
            participants.append(_participant(actor, own, types, t))
        elif name == "AIG":
            # IG AIG[Appointment]: AIG-4 resource type → participant.type, AIG-8..12 → period, AIG-14 →
            # status.  AIG-3 becomes an actor only "if AIG-4 reflects a location", which the IG does not
            # define: no actor (a participant with a type is valid, FHIR app-1)
            t = resource_timing(seg, 8, 11, ctx, start, explicit)
            timings.append(t)
            types = [c for r in seg.reps(4) if (c := cwe(r, ctx, seg.loc(4), field="AIG-4")) is not None]
            if not types:
                ctx.count("aig_without_type")
                continue
            p = _participant({}, _status_of(seg, 14, ctx), types, t)
            del p["actor"]
            participants.append(p)
    if start is None:
        starts = sorted((t.start for t in timings if t.start), key=lambda v: datetime.fromisoformat(v))
        ends = sorted((t.end for t in timings if t.end), key=lambda v: datetime.fromisoformat(v))
        if starts:
            start = starts[0]
            end = ends[-1] if ends else None
    if start and not end and duration:
        end = _plus(start, duration, explicit, ctx)
    if start and end and datetime.fromisoformat(end) < datetime.fromisoformat(start):
        raise ConversionError("appointment end is before its start", code="102", location=end_loc)
    if start and end:
        res["start"] = start
        res["end"] = end
    elif start:
        ctx.count("appointment_without_end")
        res["requestedPeriod"] = [{"start": start}]
    if duration and duration >= 1:
        res["minutesDuration"] = max(1, round(duration))
    if service_types:
        res["serviceType"] = service_types
    # comments: SCH's NTEs (and the resources' NTEs, labelled) → comment, line breaks kept
    comment_parts: list[str] = []
    for i, seg in enumerate(msg.segments):
        if i in notes and (note := annotation(notes[i], ctx)) is not None:
            text = note["text"]
            comment_parts.append(text if seg.name == "SCH" else f"{seg.name}: {text}")
    if comment_parts:
        res["comment"] = "\n".join(comment_parts)
    if not participants:
        raise ConversionError(
            "SIU message names no participant (no PID, AIP or AIL): an Appointment needs at least one",
            code="101",
            location=Location("PID", 1),
        )
    res["participant"] = participants
    if based_on := service_requests(msg, sch, trigger, ctx):
        res["basedOn"] = based_on
    facility = msg.msh.get(4, 1).strip() or msg.msh.get(3, 1).strip()
    system = key_ident.get("system")
    if system:
        ref = ctx.add("Appointment", res, identifier=(system, key_ident["value"]))
    else:
        ref = ctx.add("Appointment", res, key=f"{facility}|appointment|{key_ident['value']}")
    key = ctx.key_of(ref) or ref
    if trigger in CANCEL_TRIGGERS and s.cancel_before_book == "error":
        # the engine answers AE 204 when no booking for this key was applied before (no guard here:
        # a guard from this message would satisfy the requirement itself)
        ctx.require(key)
    else:
        ctx.guard(key, APPOINTMENT_STATUS_RANK.get(status, 0))


__all__ = ["APPOINTMENT_STATUS_RANK", "FILLER_STATUS", "TRIGGER_STATUS", "convert"]
