"""ServiceRequest → ORM^O01 or OML^O21 (ORC-1 NW new order, XO change, CA cancel): the IG's
ORC/OBR/TQ1[ServiceRequest], DG1[Condition], OBX[Observation], PV1[Encounter] and SPM[Specimen] maps in
reverse.  ORC-2 / OBR-2 placer order number: the identifier in ``placer_system``, else the id.

The step option ``order_message`` picks the message: ``ORM^O01`` (MSH, PID, ORC, OBR, NTE; the default
before v2.7, where HL7 withdrew it) or ``OML^O21`` (the default from v2.7 on; as HL7 v2.5.1's OML_O21:
MSH, PID, [PV1], ORC, [TQ1], OBR, [NTE], [DG1], [OBX, [NTE]], [SPM]).
Before v2.5 (no TQ1, no SPM) the times go in ORC-7 and the first contained specimen in OBR-7 / OBR-15.
The OML form carries what a ServiceRequest holds by reference only when the referenced resource is
*contained* (``#id``): a contained Encounter, Condition, Observation or Specimen is written in full; a
Specimen referenced by id or identifier becomes an SPM with its id (SPM-2) and display (SPM-4 text).
"""

from __future__ import annotations

from typing import Any

from transforms.fhir_to_v2.outbound import ACTIVE, Outbound, candidates
from transforms.fhir_to_v2.settings import WritebackSettings
from transforms.fhir_to_v2.siu import _ref_id, _typed, _xcn, pid, placer
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
)

JSON = dict[str, Any]

STATE_OF_STATUS = {"revoked": "cancelled", "entered-in-error": "deleted"}
PRIORITY = {"stat": "S", "asap": "A", "urgent": "A", "routine": "R"}
# ServiceRequest.status → ORC-5 order status (table 0038; the inbound ORDER_STATUS map in reverse)
ORDER_STATUS = {"on-hold": "HD", "completed": "CM", "revoked": "CA", "entered-in-error": "ER"}
# Observation.status → OBX-11 (table 0085; the inbound OBX_STATUS map in reverse)
OBX_STATUS = {
    "final": "F",
    "corrected": "C",
    "amended": "A",
    "preliminary": "P",
    "cancelled": "X",
    "entered-in-error": "W",
    "registered": "I",
}
# Encounter.class code → PV1-2 patient class (table 0004; the inbound PATIENT_CLASS map in reverse)
PATIENT_CLASS = {"EMER": "E", "IMP": "I", "AMB": "O", "PRENC": "P"}
# Condition.verificationStatus → DG1-6 diagnosis type (table 0052)
DIAGNOSIS_TYPE = {"confirmed": "F", "provisional": "W", "differential": "W"}
UCUM = "http://unitsofmeasure.org"


def convert(res: JSON, settings: WritebackSettings, now: str) -> Outbound:
    """A ServiceRequest → its candidate order messages (one per order control code)."""
    if settings.order == "OML^O21":
        return _oml(res, settings, now)
    return _orm(res, settings, now)


def _orm(res: JSON, settings: WritebackSettings, now: str) -> Outbound:
    state = STATE_OF_STATUS.get(str(res.get("status") or ""), ACTIVE)
    pvalue, psystem = placer(res, settings)
    order = ei(pvalue, psystem, settings, namespace=settings.sending_application)
    subject = _obj(res.get("subject"))
    requester = _obj(res.get("requester"))
    provider = _xcn(requester, settings) if requester else ""
    authored = dtm(res.get("authoredOn"), settings)
    when_needed = dtm(res.get("occurrenceDateTime"), settings)
    code = cwe(_obj(res.get("code")) or None, settings.system_names)
    body_tail = [
        segment(
            "OBR",
            [
                "1",
                order,
                "",
                code,
                PRIORITY.get(str(res.get("priority") or ""), ""),
                "",
                when_needed,
                *[""] * 8,
                provider,
            ],
        ),
        *_notes(res.get("note")),
    ]
    patient = pid(subject, settings) if subject else ""
    key = f"ServiceRequest|{psystem}|{pvalue}"
    content = digest(patient, *body_tail)
    when = dtm(str((res.get("meta") or {}).get("lastUpdated") or "") or now, settings)
    variants: dict[str, bytes] = {}
    for control in candidates("ServiceRequest", state):
        header = msh(settings, when, "ORM^O01^ORM_O01", control_id(key, content, control))
        orc = segment("ORC", [control, order, "", "", "", "", "", "", authored, "", "", provider])
        segs = [header, *([patient] if patient else []), orc, *body_tail]
        variants[control] = encode(segs, settings)
    return Outbound("ServiceRequest", key, state, content, "", variants)


def _notes(notes: Any) -> list[str]:
    """Annotations → NTE lines (one per line of text)."""
    texts = [str(n.get("text") or "") for n in notes or () if isinstance(n, dict)]
    lines = "\n".join(texts).split("\n") if texts else []
    return [segment("NTE", [str(i), "", esc(text)]) for i, text in enumerate(lines, start=1)]


def _obj(value: Any) -> JSON:
    """A JSON object, or an empty one for anything else (a value where FHIR has an element)."""
    return value if isinstance(value, dict) else {}


def _contained(res: JSON, ref: Any, rtype: str) -> JSON | None:
    """The contained resource a ``#id`` reference points at (of type ``rtype``), else None."""
    if not isinstance(ref, dict):
        return None
    target = str(ref.get("reference") or "")
    if not target.startswith("#"):
        return None
    for c in res.get("contained", ()) or ():
        if isinstance(c, dict) and c.get("resourceType") == rtype and str(c.get("id") or "") == target[1:]:
            return c
    return None


def _ei_sub(ident: JSON | None, settings: WritebackSettings, namespace: str = "") -> str:
    """Identifier → EI as subcomponents (``value&namespace&uid&type``), for an EIP component."""
    if not isinstance(ident, dict) or not ident.get("value"):
        return ""
    ns, uid, kind = authority(str(ident.get("system") or ""), settings)
    parts = [esc(str(ident["value"])), esc(ns or namespace), esc(uid), esc(kind)]
    while parts and not parts[-1]:
        parts.pop()
    return "&".join(parts)


def _cc(value: Any, settings: WritebackSettings) -> str:
    return cwe(value, settings.system_names) if isinstance(value, dict) else ""


def _pv1(res: JSON, settings: WritebackSettings) -> str:
    """SR.encounter → PV1: PV1-2 the class (``U`` when unknown), PV1-19 the visit number (the Encounter's
    identifier, the reference's, else the reference id under ``sending_facility``)."""
    ref = res.get("encounter")
    if not isinstance(ref, dict):
        return ""
    enc = _contained(res, ref, "Encounter")
    cls, visit = "U", ""
    ident = _obj(ref.get("identifier")) or None
    if enc is not None:
        c = _obj(enc.get("class"))
        code = str(c.get("code") or "")
        cls = PATIENT_CLASS.get(code) or (code if str(c.get("system") or "").endswith("v2-0004") else "U")
        for i in enc.get("identifier", ()) or ():
            if isinstance(i, dict) and i.get("value"):
                ident = i
                break
    if ident is not None and ident.get("value"):
        visit = cx(str(ident["value"]), str(ident.get("system") or ""), settings, "VN")
    elif enc is None and (rid := _ref_id(ref)):
        visit = cx(rid, "", settings, "VN", settings.sending_facility)
    return segment("PV1", ["1", cls, *[""] * 16, visit])


def _timing(res: JSON, settings: WritebackSettings) -> tuple[str, str, str, str]:
    """(start, end, repeat pattern, priority) of the order: occurrence[x] and priority."""
    start = end = pattern = ""
    if res.get("occurrenceDateTime"):
        start = dtm(res.get("occurrenceDateTime"), settings)
    elif isinstance(res.get("occurrencePeriod"), dict):
        start = dtm(res["occurrencePeriod"].get("start"), settings)
        end = dtm(res["occurrencePeriod"].get("end"), settings)
    elif isinstance(res.get("occurrenceTiming"), dict):
        timing = res["occurrenceTiming"]
        for c in (timing.get("code") or {}).get("coding", ()) or ():
            if isinstance(c, dict) and c.get("code"):
                pattern = esc(str(c["code"]))
                break
        bounds = (timing.get("repeat") or {}).get("boundsPeriod")
        if isinstance(bounds, dict):
            start, end = dtm(bounds.get("start"), settings), dtm(bounds.get("end"), settings)
    return start, end, pattern, PRIORITY.get(str(res.get("priority") or ""), "")


def _dg1(res: JSON, settings: WritebackSettings) -> list[str]:
    """Contained Conditions of reasonReference → DG1 (DG1-3 code, DG1-5 onset, DG1-6 type)."""
    out: list[str] = []
    for ref in res.get("reasonReference", ()) or ():
        cond = _contained(res, ref, "Condition")
        if cond is None or not (code := _cc(cond.get("code"), settings)):
            continue
        ver = ""
        for c in (cond.get("verificationStatus") or {}).get("coding", ()) or ():
            ver = DIAGNOSIS_TYPE.get(str(c.get("code") or ""), "")
        onset = dtm(cond.get("onsetDateTime"), settings) if isinstance(cond.get("onsetDateTime"), str) else ""
        out.append(segment("DG1", [str(len(out) + 1), "", code, "", onset, ver]))
    return out


def _obx_value(obs: JSON, settings: WritebackSettings) -> tuple[str, str, str]:
    """(OBX-2 value type, OBX-5 value, OBX-6 units) of an Observation's value[x]."""
    q = obs.get("valueQuantity")
    if isinstance(q, dict) and q.get("value") is not None:
        code, unit_text = str(q.get("code") or ""), str(q.get("unit") or "")
        if q.get("system") == UCUM and code:
            units = comps(esc(code), esc(unit_text or code), "UCUM")
        else:
            units = comps(esc(unit_text or code))
        return "NM", esc(str(q["value"])), units
    if isinstance(obs.get("valueCodeableConcept"), dict):
        return "CWE", cwe(obs["valueCodeableConcept"], settings.system_names), ""
    if isinstance(obs.get("valueString"), str):
        return "ST", esc(obs["valueString"]), ""
    if isinstance(obs.get("valueInteger"), int) and not isinstance(obs.get("valueInteger"), bool):
        return "NM", str(obs["valueInteger"]), ""
    if isinstance(obs.get("valueDateTime"), str):
        return "DTM", dtm(obs["valueDateTime"], settings), ""
    return "", "", ""


def _obx(res: JSON, settings: WritebackSettings) -> list[str]:
    """Contained Observations of supportingInfo → OBX (+ their notes as NTE)."""
    out: list[str] = []
    n = 0
    for ref in res.get("supportingInfo", ()) or ():
        obs = _contained(res, ref, "Observation")
        if obs is None or not (code := _cc(obs.get("code"), settings)):
            continue
        n += 1
        vtype, value, units = _obx_value(obs, settings)
        status = OBX_STATUS.get(str(obs.get("status") or ""), "")
        effective = (
            dtm(obs.get("effectiveDateTime"), settings)
            if isinstance(obs.get("effectiveDateTime"), str)
            else ""
        )
        out.append(
            segment("OBX", [str(n), vtype, code, "", value, units, *[""] * 4, status, "", "", effective])
        )
        out.extend(_notes(obs.get("note")))
    return out


def _spm_of(spec: JSON, n: int, settings: WritebackSettings) -> str:
    """A (contained) Specimen → SPM (the inbound SPM[Specimen] map in reverse)."""
    placer_id = _typed(spec, "PLAC")
    filler_id = _typed(spec, "FILL")
    if placer_id is None and filler_id is None:
        for i in spec.get("identifier", ()) or ():
            if isinstance(i, dict) and i.get("value") and not i.get("type"):
                placer_id = i
                break
    spm2 = comps(_ei_sub(placer_id, settings), _ei_sub(filler_id, settings))
    coll = _obj(spec.get("collection"))
    period = _obj(coll.get("collectedPeriod")) or None
    if period is not None:
        collected = comps(dtm(period.get("start"), settings), dtm(period.get("end"), settings))
    else:
        collected = (
            dtm(coll.get("collectedDateTime"), settings)
            if isinstance(coll.get("collectedDateTime"), str)
            else ""
        )
    amount = ""
    q = coll.get("quantity")
    if isinstance(q, dict) and q.get("value") is not None:
        code, text = str(q.get("code") or ""), str(q.get("unit") or "")
        if q.get("system") == UCUM and code:
            unit = "&".join((esc(code), esc(text or code), "UCUM"))
        else:
            unit = esc(text or code)
        amount = comps(esc(str(q["value"])), unit)
    containers = [c for c in spec.get("container", ()) or () if isinstance(c, dict)]
    first = containers[0] if containers else {}
    notes = [str(x.get("text") or "") for x in spec.get("note", ()) or () if isinstance(x, dict)]
    fields = [
        str(n),
        spm2,
        "",
        _cc(spec.get("type"), settings),
        "",
        _cc(first.get("additiveCodeableConcept"), settings),
        _cc(coll.get("method"), settings),
        _cc(coll.get("bodySite"), settings),
        "",
        "",
        "",
        amount,
        "",
        esc(" ".join(" ".join(notes).split())),
        "",
        "",
        collected,
        dtm(spec.get("receivedTime"), settings) if isinstance(spec.get("receivedTime"), str) else "",
        "",
        {"available": "Y", "unavailable": "N"}.get(str(spec.get("status") or ""), ""),
        "",
        "",
        "",
        "~".join(c for x in spec.get("condition", ()) or () if (c := _cc(x, settings))),
        "",
        "",
        _cc(first.get("type"), settings),
    ]
    return segment("SPM", fields)


def _spm(res: JSON, settings: WritebackSettings) -> list[str]:
    """SR.specimen → SPM: a contained Specimen in full; a referenced one with its id (SPM-2) and display
    (SPM-4 text)."""
    out: list[str] = []
    for ref in res.get("specimen", ()) or ():
        if not isinstance(ref, dict):
            continue
        n = len(out) + 1
        spec = _contained(res, ref, "Specimen")
        if spec is not None:
            out.append(_spm_of(spec, n, settings))
            continue
        ident = _obj(ref.get("identifier")) or None
        if ident is None and (rid := _ref_id(ref)):
            ident = {"value": rid}
        spm2 = _ei_sub(ident, settings, namespace=settings.sending_application)
        if not spm2:
            continue
        display = str(ref.get("display") or "")
        out.append(segment("SPM", [str(n), spm2, "", comps("", esc(display)) if display else ""]))
    return out


def _oml(res: JSON, settings: WritebackSettings, now: str) -> Outbound:
    status = str(res.get("status") or "")
    state = STATE_OF_STATUS.get(status, ACTIVE)
    pvalue, psystem = placer(res, settings)
    order = ei(pvalue, psystem, settings, namespace=settings.sending_application)
    filler_id = _typed(res, "FILL")
    filler = (
        ei(str(filler_id["value"]), str(filler_id.get("system") or ""), settings)
        if filler_id is not None
        else ""
    )
    req = _obj(res.get("requisition")) or None
    group = ei(str(req.get("value") or ""), str(req.get("system") or ""), settings) if req else ""
    subject = _obj(res.get("subject"))
    patient = ""
    if subject:
        contained = _contained(res, subject, "Patient")
        patient = pid(subject, settings, contained) if contained is not None else pid(subject, settings)
    requester = _obj(res.get("requester"))
    provider = _xcn(requester, settings) if requester else ""
    start, end, pattern, priority = _timing(res, settings)
    # ORC-1 is the only field that differs between the variants: "{control}" stands in for it
    orc_tail = [order, filler, group, ORDER_STATUS.get(status, ""), "", ""]
    if not settings.has_tq1 and (start or end or pattern or priority):
        orc_tail[5] = comps("", pattern, "", start, end, priority)  # ORC-7 TQ before v2.5
    orc_tail += ["", dtm(res.get("authoredOn"), settings), "", "", provider]
    timing = []
    if settings.has_tq1 and (start or end or pattern or priority):
        timing.append(segment("TQ1", ["1", "", pattern, "", "", "", start, end, priority]))
    obr_fields = ["1", order, filler, _cc(res.get("code"), settings), "", "", "", "", "", ""]
    obr_fields.append("G" if res.get("intent") == "reflex-order" else "")
    obr_fields += ["", "", "", "", provider, *[""] * 14]
    specimens = _spm(res, settings)
    if not settings.has_tq1:
        # no SPM before v2.5: the first contained specimen's collection time and type go in OBR-7 / OBR-15
        specimens = []
        spec = next((s for r in res.get("specimen", ()) or () if (s := _contained(res, r, "Specimen"))), None)
        if spec is not None:
            coll = _obj(spec.get("collection"))
            period = _obj(coll.get("collectedPeriod"))
            collected = coll.get("collectedDateTime") or period.get("start")
            obr_fields[6] = dtm(collected, settings) if isinstance(collected, str) else ""
            obr_fields[14] = _cc(spec.get("type"), settings).replace("^", "&")
    obr_fields.append("~".join(c for r in res.get("reasonCode", ()) or () if (c := _cc(r, settings))))
    obr = segment("OBR", obr_fields)
    visit = _pv1(res, settings)
    body = [
        *timing,
        obr,
        *_notes(res.get("note")),
        *_dg1(res, settings),
        *_obx(res, settings),
        *specimens,
    ]
    key = f"ServiceRequest|{psystem}|{pvalue}"
    content = digest(patient, visit, segment("ORC", ["", *orc_tail]), *body)
    when = dtm(str((res.get("meta") or {}).get("lastUpdated") or "") or now, settings)
    variants: dict[str, bytes] = {}
    for control in candidates("ServiceRequest", state):
        header = msh(settings, when, "OML^O21^OML_O21", control_id(key, content, control))
        orc = segment("ORC", [control, *orc_tail])
        segs = [header, *([patient] if patient else []), *([visit] if visit else []), orc, *body]
        variants[control] = encode(segs, settings)
    return Outbound("ServiceRequest", key, state, content, "", variants)
