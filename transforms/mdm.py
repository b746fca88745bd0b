"""MDM^T01-T11 (medical document management) → DocumentReference (+ Patient, Encounter, Practitioner).

Per the IG's MDM_T02 message map and TXA[DocumentReference] / OBX[DocumentReference]: one
DocumentReference per message keyed on TXA-12 (unique document number, ``masterIdentifier``), so a
status change (T03/T04), an edit (T07/T08), a replacement or addendum sent under the same number
(T05/T06/T09/T10) and a cancel (T11) update the *same* resource.  A replacement or addendum with a new
number names its original in TXA-13 (parent document number): ``relatesTo`` (``replaces`` /
``appends``) points at it by identifier.

Content: the OBX text lines (TX/FT/ST/…) joined with line breaks → one text/plain attachment; each ED
repetition → an attachment of its own; RP → an attachment ``url``.  Status: TXA-19 availability
(AV → current, OB → superseded, CA → entered-in-error, UN → current, the v2 code kept in an
alternate-codes extension), T11 → entered-in-error; ``docStatus`` from TXA-17 completion status.

A notification without content (T01, T03, T05, T07, T09 with no OBX) cannot carry the document, and a
conditional update without it would erase what a message "with content" wrote: it is written as a
conditional *create* (counted ``document_notification_only``), so it records a document nobody sent
yet but never overwrites one.  A cancel or an obsolete/cancelled status (T11, TXA-19 CA/OB) is always
applied.  See docs/mapping.md.
"""

from __future__ import annotations

import base64
from typing import Any, Final

from engine import redact
from engine.errors import ConversionError, Location, MessageRejected
from engine.hl7 import Delimiters, Message, Segment
from transforms.bundle import ConvertContext
from transforms.datatypes import V2_TABLE, cwe, dtm_at, ei, plain_text, table_at, xcn
from transforms.orders import order_numbers

JSON = dict[str, Any]

TRIGGERS: Final = frozenset({"T01", "T02", "T03", "T04", "T05", "T06", "T07", "T08", "T09", "T10", "T11"})
WITH_CONTENT: Final = frozenset({"T02", "T04", "T06", "T08", "T10"})
ADDENDUM: Final = frozenset({"T05", "T06"})
REPLACEMENT: Final = frozenset({"T09", "T10"})
CANCEL: Final = frozenset({"T11"})

# TXA-19 document availability status (table 0275) → DocumentReference.status
AVAILABILITY: Final[dict[str, str]] = {
    "AV": "current",
    "UN": "current",
    "OB": "superseded",
    "CA": "entered-in-error",
}
# TXA-17 document completion status (table 0271) → DocumentReference.docStatus
COMPLETION: Final[dict[str, str]] = {
    "DI": "preliminary",
    "DO": "preliminary",
    "IP": "preliminary",
    "IN": "preliminary",
    "PA": "preliminary",
    "AU": "final",
    "LA": "final",
}
# Guard ranks: a late "current" after a cancel goes to review.
DOCUMENT_STATUS_RANK: Final[dict[str, int]] = {"current": 1, "superseded": 2, "entered-in-error": 3}

ALTERNATE_CODES: Final = "http://hl7.org/fhir/StructureDefinition/alternate-codes"
_TEXT_TYPES: Final = frozenset({"TX", "FT", "ST", "CE", "CWE", "NM", "DT", "DTM", "TS", "SN", "TM", ""})
_PLAIN_TEXT_TYPES: Final = frozenset({"TX", "FT", "ST", ""})
_CONFIDENTIALITY: Final = V2_TABLE + "0272"


def _text_content(obxs: list[Segment], d: Delimiters) -> str | None:
    lines: list[str] = []
    for obx in obxs:
        vtype = obx.get(2).strip().upper()
        if vtype not in _TEXT_TYPES:
            continue
        reps = obx.reps(5)
        if not reps:
            lines.append("")
        for rep in reps:
            # a coded or other composite value (``N^^expandedYes-NoIndicator``) as its components' text, so the
            # HL7 encoding never reaches the document (TX/FT/ST have no components: their text as sent)
            lines.append(rep.text.rstrip() if vtype in _PLAIN_TEXT_TYPES else plain_text(rep, d))
    text = "\n".join(lines).strip("\n")
    return text if text.strip() else None


def content(obxs: list[Segment], ctx: ConvertContext, txa: Segment) -> list[JSON]:
    """OBX → DocumentReference.content (IG OBX[DocumentReference]).

    An ED whose data is not valid in its encoding (OBX-5.4) is, under ``strictness: lenient``, left out with a
    located warning (``document_attachment_dropped``) when the document has other content (text, another
    attachment); when it is the only content the message is rejected in both modes (no silent loss)."""
    from transforms import oru

    out: list[JSON] = []
    text = _text_content(obxs, ctx.delimiters)
    if text is not None:
        att: JSON = {
            "contentType": "text/plain; charset=utf-8",
            "data": base64.b64encode(text.encode("utf-8")).decode("ascii"),
        }
        out.append({"attachment": att})
    lenient = ctx.settings.strictness == "lenient"
    bad: list[ConversionError] = []  # lenient: attachments whose data is not what OBX-5.4 says
    for obx in obxs:
        vtype = obx.get(2).strip().upper()
        if vtype == "ED":
            for rep in obx.reps(5):
                if not rep:
                    continue
                try:
                    a = oru.attachment(rep, obx, ctx)
                except ConversionError as exc:
                    if not lenient or exc.hl7_error != "102":
                        raise
                    bad.append(exc)
                    continue
                if a is not None:
                    out.append({"attachment": a})
        elif vtype == "RP":
            for rep in obx.reps(5):
                url = rep.c(1).strip()
                if url:
                    out.append({"attachment": {"url": oru.pointer_url(url, ctx)}})
    if bad and not out:
        raise bad[0]  # the bad attachment is the document's only content: nothing to file without it
    for err in bad:
        ctx.warn(
            "document_attachment_dropped",
            err.location,
            f"{err.message}: this attachment was left out of the document, which keeps its other content "
            "(channel strictness: lenient); send the data in the encoding OBX-5.4 names",
        )
    return out


def orders(msg: Message, ctx: ConvertContext, enc: str | None) -> list[str]:
    """The COMMON_ORDER groups (ORC + OBR) → ServiceRequest, with ORU's mapping (IG MDM_T02: ORC/OBR
    [ServiceRequest], referenced from ``context.related``): a conditional create, the ordering system owns
    the order.  An ORC without an OBR names no service and is left out."""
    from transforms import oru

    out: list[str] = []
    _pid, groups, _obs = oru._groups(msg)
    for order in groups:
        obr = order.obr
        if obr is None:
            continue
        code = cwe(obr.rep(4), ctx, obr.loc(4), field="OBR-4")
        if code is None:
            ctx.count("order_without_service_skipped")
            continue
        placer, filler = order_numbers(order.orc, order.obr, ctx)
        if (ref := oru.service_request(order, placer, filler, code, ctx, enc)) is not None:
            # IG MDM_T02 COMMON_ORDER.NTE → NTE[ServiceRequest]: the notes after the OBR
            if (
                order.notes
                and (sr := ctx.find(ref)) is not None
                and (note := oru.annotation(order.notes, ctx))
            ):
                sr["note"] = [note]
            out.append(ref)
    return out


def _status(trigger: str, txa: Segment, ctx: ConvertContext) -> tuple[str, str]:
    """(DocumentReference.status, the TXA-19 code) ; T11 forces entered-in-error."""
    code = txa.get(19).strip().upper()
    if trigger in CANCEL:
        return "entered-in-error", code
    if not code:
        return "current", ""
    status = AVAILABILITY.get(code)
    if status is None:
        raise ConversionError(
            "TXA-19 document availability status is not in HL7 table 0275 (AV, CA, OB, UN)",
            code="103",
            location=txa.loc(19),
        )
    return status, code


def convert(msg: Message, ctx: ConvertContext) -> None:
    """MDM^T01..T11 → a DocumentReference in ``ctx``."""
    from transforms import oru

    trigger = msg.trigger
    if trigger not in TRIGGERS:
        raise MessageRejected(
            f"MDM trigger {redact.trigger(trigger) if trigger else '(empty)'} is not supported (supported: "
            + ", ".join(sorted(TRIGGERS))
            + ")",
            code="201",
            location=Location("MSH", 1, 9, None, 2),
        )
    txa = msg.first("TXA")
    if txa is None:
        raise ConversionError("MDM message has no TXA segment", code="100", location=Location("TXA", 1))
    number = ei(txa.rep(12), ctx, txa.loc(12))
    if number is None:
        raise ConversionError(
            "TXA-12 unique document number is missing: it identifies the document across its lifecycle",
            code="101",
            location=txa.loc(12),
        )
    settings = ctx.settings
    pid = msg.first("PID")
    if pid is None:
        raise ConversionError("MDM message has no PID segment", code="100", location=Location("PID", 1))
    patient_ref = oru.patient(pid, ctx)
    enc = oru.encounter(msg, ctx)
    status, avail = _status(trigger, txa, ctx)
    res: JSON = {"resourceType": "DocumentReference", "masterIdentifier": dict(number)}
    idents: list[JSON] = []
    if file_name := txa.get(16).strip():
        idents.append({"value": file_name, "type": {"text": "Unique Document File Name"}})
    if idents:
        res["identifier"] = idents
    res["status"] = status
    if avail in ("CA", "OB", "UN"):
        res["_status"] = {
            "extension": [
                {
                    "url": ALTERNATE_CODES,
                    "valueCodeableConcept": {"coding": [{"system": V2_TABLE + "0275", "code": avail}]},
                }
            ]
        }
    # TXA-17 is no key (the document's lifecycle follows TXA-19 and the trigger): a code outside table 0271
    # is a table miss like any other, counted (AE 103 only under the channel's code_table_errors: reject)
    if doc_status := table_at(ctx, COMPLETION, txa, 17, "0271"):
        res["docStatus"] = doc_status
    if txa.rep(2) and (dtype := cwe(txa.rep(2), ctx, txa.loc(2), field="TXA-2")):
        res["type"] = dtype
    res["subject"] = {"reference": patient_ref}
    if txa.get(6).strip() and (created := dtm_at(txa.get(6), settings, txa, 6, kind="instant")):
        res["date"] = created
    authors = [
        a for i, r in enumerate(txa.reps(9), 1) if (a := xcn(r, ctx, Location("TXA", txa.sequence, 9, i)))
    ]
    if authors:
        res["author"] = authors
    if txa.rep(10) and (auth := xcn(txa.rep(10), ctx, txa.loc(10))) is not None:
        res["authenticator"] = auth
    if title := txa.get(25).strip():
        res["description"] = title
    if conf := txa.get(18).strip().upper():
        res["securityLabel"] = [{"coding": [{"system": _CONFIDENTIALITY, "code": conf}]}]
    parent = ei(txa.rep(13), ctx, txa.loc(13)) if txa.get(13).strip() else None
    if parent is not None and parent.get("value") != number.get("value"):
        if trigger in ADDENDUM or trigger in REPLACEMENT:
            code = "appends" if trigger in ADDENDUM else "replaces"
            res["relatesTo"] = [{"code": code, "target": {"identifier": dict(parent)}}]
    elif trigger in ADDENDUM or trigger in REPLACEMENT:
        ctx.count("document_replaced_in_place")
    obxs = msg.all("OBX")
    contents = content(obxs, ctx, txa)
    notification_only = not contents
    if not contents:
        ctx.count("document_notification_only")
        placeholder: JSON = {
            "contentType": "text/plain",
            "title": title or "document notification (no content)",
        }
        contents = [{"attachment": placeholder}]
    if txa.get(3).strip():
        ctype = txa.get(3).strip().upper()
        for c in contents:
            c.setdefault("format", {"system": V2_TABLE + "0191", "code": ctype})
    res["content"] = contents
    context: JSON = {}
    related = orders(msg, ctx, enc)
    if related:
        context["related"] = [{"reference": r} for r in related]
    if enc:
        context["encounter"] = [{"reference": enc}]
    if txa.get(4).strip() and (activity := dtm_at(txa.get(4), settings, txa, 4)):
        context["period"] = {"start": activity}
    if context:
        res["context"] = context
    system = number.get("system")
    create_only = notification_only and status == "current"
    if system:
        ref = ctx.add("DocumentReference", res, identifier=(system, number["value"]), create_only=create_only)
    else:
        facility = msg.msh.get(4, 1).strip() or msg.msh.get(3, 1).strip()
        ref = ctx.add(
            "DocumentReference", res, key=f"{facility}|document|{number['value']}", create_only=create_only
        )
    if not create_only:
        ctx.guard(ctx.key_of(ref) or ref, DOCUMENT_STATUS_RANK.get(status, 0))


__all__ = ["AVAILABILITY", "COMPLETION", "DOCUMENT_STATUS_RANK", "TRIGGERS", "convert"]
