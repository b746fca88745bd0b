"""ServiceRequest → ORM^O01 (NW new order, XO change, CA cancel): the IG's ORC/OBR[ServiceRequest] maps
in reverse.  ORC-2 / OBR-2 placer order number: the identifier in ``placer_system``, else the id."""

from __future__ import annotations

from typing import Any

from transforms.fhir_to_v2.outbound import ACTIVE, Outbound, candidates
from transforms.fhir_to_v2.settings import WritebackSettings
from transforms.fhir_to_v2.siu import _xcn, pid, placer
from transforms.fhir_to_v2.writer import control_id, cwe, digest, dtm, ei, encode, esc, msh, segment

JSON = dict[str, Any]

STATE_OF_STATUS = {"revoked": "cancelled", "entered-in-error": "deleted"}
PRIORITY = {"stat": "S", "asap": "A", "urgent": "A", "routine": "R"}


def convert(res: JSON, settings: WritebackSettings, now: str) -> Outbound:
    """A ServiceRequest → its candidate ORM^O01 messages (one per order control code)."""
    state = STATE_OF_STATUS.get(str(res.get("status") or ""), ACTIVE)
    pvalue, psystem = placer(res, settings)
    order = ei(pvalue, psystem, settings, namespace=settings.sending_application)
    subject = res.get("subject") if isinstance(res.get("subject"), dict) else {}
    requester = res.get("requester") if isinstance(res.get("requester"), dict) else {}
    provider = _xcn(requester, settings) if requester else ""
    authored = dtm(res.get("authoredOn"), settings)
    when_needed = dtm(res.get("occurrenceDateTime"), settings)
    code = cwe(res.get("code") if isinstance(res.get("code"), dict) else None)
    notes = [str(n.get("text") or "") for n in res.get("note", ()) or () if isinstance(n, dict)]
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
        )
    ]
    for i, text in enumerate("\n".join(notes).split("\n") if notes else [], start=1):
        body_tail.append(segment("NTE", [str(i), "", esc(text)]))
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
