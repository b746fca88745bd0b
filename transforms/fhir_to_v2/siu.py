"""Appointment → SIU S12/S13/S14/S15/S17/S26 (the IG's SCH/AIL/AIP[Appointment] maps in reverse).

SCH-1 is the placer appointment id: the value of the Appointment's identifier in ``placer_system``
(else its resource id), written ``value^^system^URI`` so the receiver, and Sluice's inbound converter,
read the same identifier back.  SCH-2 carries an identifier typed ``FILL`` when there is one.  Times go in
TQ1-7/8 (v2.5+) and SCH-11.4/5, in the site zone; SCH-25 from the status (table 0278); participants:
Patient → PID, Practitioner → AIP, Location → AIL, serviceType → AIS; the comment → NTE lines.
"""

from __future__ import annotations

from typing import Any

from engine.errors import ConversionError
from transforms.fhir_to_v2.outbound import ACTIVE, Outbound, candidates
from transforms.fhir_to_v2.settings import WritebackSettings
from transforms.fhir_to_v2.writer import (
    authority,
    comps,
    control_id,
    cwe,
    cx,
    digest,
    dtm,
    ei,
    encode,
    esc,
    msh,
    segment,
    split_display,
    xpn,
)

JSON = dict[str, Any]

# Appointment.status → SCH-25 filler status (table 0278; the inbound FILLER_STATUS map in reverse)
FILLER_STATUS: dict[str, str] = {
    "proposed": "PENDING",
    "pending": "PENDING",
    "booked": "BOOKED",
    "arrived": "STARTED",
    "checked-in": "STARTED",
    "fulfilled": "COMPLETE",
    "cancelled": "CANCELLED",
    "noshow": "NOSHOW",
    "entered-in-error": "DELETED",
    "waitlist": "WAITLIST",
}
STATE_OF_STATUS: dict[str, str] = {
    "cancelled": "cancelled",
    "noshow": "noshow",
    "entered-in-error": "deleted",
}
V2_0276 = "http://terminology.hl7.org/CodeSystem/v2-0276"


def _identifier(res: JSON, system: str) -> str:
    for ident in res.get("identifier", ()) or ():
        if isinstance(ident, dict) and ident.get("system") == system and ident.get("value"):
            return str(ident["value"])
    return ""


def _typed(res: JSON, code: str) -> JSON | None:
    for ident in res.get("identifier", ()) or ():
        if not isinstance(ident, dict) or not ident.get("value"):
            continue
        for c in (ident.get("type") or {}).get("coding", ()) or ():
            if isinstance(c, dict) and c.get("code") == code:
                return ident
    return None


def placer(res: JSON, settings: WritebackSettings) -> tuple[str, str]:
    """(value, system) of the placer id: the ``placer_system`` identifier, else the resource id."""
    if settings.placer_system and (value := _identifier(res, settings.placer_system)):
        return value, settings.placer_system
    rid = str(res.get("id") or "")
    if not rid:
        raise ConversionError(
            f"the {res.get('resourceType', 'resource')} has no identifier in placer_system "
            f"{settings.placer_system!r} and no id: the receiver could not match its updates; "
            "give it an identifier in that system",
            code="101",
        )
    return rid, ""


def _ref_kind(actor: JSON) -> str:
    ref = str(actor.get("reference") or "")
    if ref:
        return ref.split("/")[-2] if ref.count("/") >= 1 else ""
    return str(actor.get("type") or "")


def _ref_id(actor: JSON) -> str:
    ref = str(actor.get("reference") or "")
    return ref.rstrip("/").split("/")[-1] if ref else ""


def pid(actor: JSON, settings: WritebackSettings, patient: JSON | None = None) -> str:
    """A patient (the resource, or a participant's reference) → PID: PID-3 from its identifier in
    ``patient_system`` (or the logical reference's identifier, else the reference id), PID-5 the name."""
    idents: list[str] = []
    if patient is not None:
        for ident in patient.get("identifier", ()) or ():
            if isinstance(ident, dict) and ident.get("value"):
                if settings.patient_system and ident.get("system") != settings.patient_system:
                    continue
                code = ""
                for c in (ident.get("type") or {}).get("coding", ()) or ():
                    code = str(c.get("code") or "")
                idents.append(cx(str(ident["value"]), str(ident.get("system") or ""), settings, code or "MR"))
        if not idents and patient.get("id"):
            idents.append(cx(str(patient["id"]), "", settings, "PI", settings.sending_facility))
    else:
        ident = actor.get("identifier")
        if isinstance(ident, dict) and ident.get("value"):
            idents.append(cx(str(ident["value"]), str(ident.get("system") or ""), settings, "MR"))
        elif rid := _ref_id(actor):
            idents.append(cx(rid, "", settings, "PI", settings.sending_facility))
    name = ""
    if patient is not None:
        name = "~".join(xpn(n) for n in patient.get("name", ()) or () if isinstance(n, dict))
    elif actor.get("display"):
        family, given = split_display(str(actor["display"]))
        name = comps(esc(family), esc(given))
    fields = ["1", "", "~".join(i for i in idents if i), "", name]
    if patient is not None:
        fields += [
            "",
            dtm(patient.get("birthDate"), settings),
            {"female": "F", "male": "M", "other": "O", "unknown": "U"}.get(
                str(patient.get("gender") or ""), ""
            ),
        ]
    return segment("PID", fields)


def _xcn(actor: JSON, settings: WritebackSettings) -> str:
    ident = actor.get("identifier")
    value, system = "", ""
    if isinstance(ident, dict) and ident.get("value"):
        value, system = str(ident["value"]), str(ident.get("system") or "")
    else:
        value = _ref_id(actor)
    family, given = split_display(str(actor.get("display") or ""))
    if not value and not family:
        return ""
    ns, uid, kind = authority(system, settings) if system else ("", "", "")
    hd = "&".join(p for p in (esc(ns), esc(uid), esc(kind)) if p) if (ns or uid) else ""
    # XCN: id^family^given^middle^suffix^prefix^degree^source table^assigning authority
    return comps(esc(value), esc(family), esc(given), "", "", "", "", "", hd)


def _pl(actor: JSON) -> str:
    """Location reference → PL: point of care (identifier value or id), PL-9 description (display)."""
    ident = actor.get("identifier")
    value = str(ident["value"]) if isinstance(ident, dict) and ident.get("value") else _ref_id(actor)
    display = str(actor.get("display") or "")
    return comps(esc(value), "", "", "", "", "", "", "", esc(display))


def _view(res: JSON, settings: WritebackSettings) -> tuple[list[str], list[str], str]:
    """(body segments after MSH, time fields, state) of an Appointment."""
    status = str(res.get("status") or "booked")
    state = STATE_OF_STATUS.get(status, ACTIVE)
    pvalue, psystem = placer(res, settings)
    sch1 = ei(pvalue, psystem, settings, namespace=settings.sending_application)
    filler = _typed(res, "FILL")
    sch2 = ei(str(filler["value"]), str(filler.get("system") or ""), settings) if filler else ""
    start, end = dtm(res.get("start"), settings), dtm(res.get("end"), settings)
    if not start:
        for per in res.get("requestedPeriod", ()) or ():
            start = dtm(per.get("start"), settings)
            end = dtm(per.get("end"), settings)
            break
    minutes = res.get("minutesDuration")
    duration = str(int(minutes)) if isinstance(minutes, int) and not isinstance(minutes, bool) else ""
    times = [start, end, duration]
    # SCH-7 reason: a 0276 appointmentType, else the first reasonCode; SCH-8: another appointmentType
    atype = res.get("appointmentType") if isinstance(res.get("appointmentType"), dict) else None
    reason = ""
    sch8 = ""
    if atype and any(c.get("system") == V2_0276 for c in atype.get("coding", ()) or ()):
        reason = cwe(atype, settings.system_names)
    else:
        sch8 = cwe(atype, settings.system_names)
        for rc in res.get("reasonCode", ()) or ():
            reason = cwe(rc, settings.system_names)
            break
    sch6 = cwe(res.get("cancelationReason"), settings.system_names) if state != ACTIVE else ""
    sch = segment(
        "SCH",
        [
            sch1,
            sch2,
            "",
            "",
            "",
            sch6,
            reason,
            sch8,
            duration,
            "MIN" if duration else "",
            comps("", "", "", start, end),
            *[""] * 13,
            FILLER_STATUS.get(status, ""),
        ],
    )
    body = [sch]
    if settings.has_tq1 and (start or end):
        body.append(segment("TQ1", ["1", "", "", "", "", "", start, end]))
    comment = str(res.get("comment") or "")
    for i, line in enumerate(comment.split("\n") if comment else [], start=1):
        body.append(segment("NTE", [str(i), "", esc(line)]))
    participants = [p for p in res.get("participant", ()) or () if isinstance(p, dict)]
    patients = [p for p in participants if _ref_kind(p.get("actor") or {}) == "Patient"]
    if patients:
        body.append(pid(patients[0]["actor"], settings))
    body.append(segment("RGS", ["1", "A" if state == ACTIVE else "D"]))
    n = 0
    for st in res.get("serviceType", ()) or ():
        if code := cwe(st, settings.system_names):
            n += 1
            body.append(segment("AIS", [str(n), "", code]))
    n = 0
    for p in participants:
        actor = p.get("actor") or {}
        if _ref_kind(actor) == "Location" and (loc := _pl(actor)):
            n += 1
            body.append(segment("AIL", [str(n), "", loc]))
    n = 0
    for p in participants:
        actor = p.get("actor") or {}
        if _ref_kind(actor) in ("Practitioner", "PractitionerRole") and (xcn := _xcn(actor, settings)):
            n += 1
            role = ""
            for t in p.get("type", ()) or ():
                role = cwe(t, settings.system_names)
                break
            body.append(segment("AIP", [str(n), "", xcn, role]))
    return body, times, state


def convert(res: JSON, settings: WritebackSettings, now: str) -> Outbound:
    """An Appointment → its candidate SIU messages (``now``: MSH-7 when it has no meta.lastUpdated)."""
    body, times, state = _view(res, settings)
    pvalue, psystem = placer(res, settings)
    key = f"Appointment|{psystem}|{pvalue}"
    content = digest(*body)
    timing = digest(*times)
    when = dtm(str((res.get("meta") or {}).get("lastUpdated") or "") or now, settings)
    variants: dict[str, bytes] = {}
    for trigger in candidates("Appointment", state):
        header = msh(settings, when, f"SIU^{trigger}^SIU_S12", control_id(key, content, trigger))
        variants[trigger] = encode([header, *body], settings)
    return Outbound("Appointment", key, state, content, timing, variants)
