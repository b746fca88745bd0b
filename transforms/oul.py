"""OUL^R22 (unsolicited specimen-oriented observation) → Specimen + DiagnosticReport + Observation.

OUL_R22 is specimen first: PID, PV1, then SPECIMEN groups (SPM, its own OBX, SAC containers) each holding
ORDER groups (OBR, then ORC, NTE, TQ1, RESULT: OBX + NTE).  Every SPM → Specimen (:func:`transforms.orm.specimen`,
IG SPM[Specimen]); every ORDER → the ORU mapping (:func:`transforms.oru.report`: DiagnosticReport keyed on
the filler order number, Observations keyed on it + OBX-3 + OBX-4, the order's ServiceRequest as a
conditional create), with ``DiagnosticReport.specimen`` and ``Observation.specimen`` pointing at the group's
Specimen.  The specimen's own OBX (before the first OBR) → Observations with that ``specimen``.

A correction (OBX-11 C, OBR-25 C) updates the same resources, guarded by status rank like ORU.
"""

from __future__ import annotations

from typing import Any, Final

from engine import redact
from engine.errors import ConversionError, Location, MessageRejected
from engine.hl7 import Message, Segment
from transforms.bundle import ConvertContext

JSON = dict[str, Any]

TRIGGERS: Final = frozenset({"R22", "R23", "R24"})

_BREAKS: Final = frozenset({"SAC", "INV", "TXA", "CTI", "TCD", "SID", "PV1", "PV2", "PRT"})


class _Specimen:
    __slots__ = ("observations", "orders", "spm")

    def __init__(self, spm: Segment | None) -> None:
        self.spm = spm
        self.observations: list[tuple[Segment, list[Segment]]] = []
        self.orders: list[Any] = []  # oru._Order


def _groups(msg: Message) -> tuple[Segment | None, list[tuple[Segment, list[Segment]]], list[_Specimen]]:
    """(first PID, patient-level OBX groups, SPECIMEN groups).  An OBR before any SPM gets a group
    without a specimen."""
    from transforms import oru

    pid: Segment | None = None
    patient_obs: list[tuple[Segment, list[Segment]]] = []
    specimens: list[_Specimen] = []
    current: _Specimen | None = None
    order: Any = None  # oru._Order
    notes: list[Segment] | None = None
    obx_notes: list[Segment] | None = None  # the NTE/PRT list of the OBX the last segments follow
    for seg in msg.segments:
        name = seg.name
        if name == "PID":
            if pid is None:
                pid = seg
            notes = None
        elif name == "SPM":
            current = _Specimen(seg)
            specimens.append(current)
            order = None
            notes = None
        elif name == "OBR":
            if current is None:
                current = _Specimen(None)
                specimens.append(current)
            order = oru._Order(seg, None)
            current.orders.append(order)
            notes = order.notes
        elif name == "ORC":
            if order is not None and order.orc is None:
                order.orc = seg
                notes = order.notes
            else:
                notes = None
        elif name == "OBX":
            group: tuple[Segment, list[Segment]] = (seg, [])
            if order is not None:
                order.observations.append(group)
            elif current is not None:
                current.observations.append(group)
            else:
                patient_obs.append(group)
            notes = obx_notes = group[1]
            continue
        elif name == "NTE":
            if notes is not None:
                notes.append(seg)
            continue
        elif name == "PRT":
            # an OBX's PRT (→ Observation.performer) rides with its NTEs; an order's PRT is not mapped
            if obx_notes is not None:
                obx_notes.append(seg)
            continue
        elif name == "TQ1":
            if order is not None and order.tq1 is None:
                order.tq1 = seg  # the order's timing (TQ1[ServiceRequest])
        elif name in _BREAKS:
            notes = None
        obx_notes = None
    return pid, patient_obs, specimens


def _order_groups(msg: Message) -> tuple[Segment | None, list[tuple[Segment, list[Segment]]], list[Any]]:
    """OUL_R24 (order first): (first PID, patient-level OBX groups, ORDER groups).  Each ORDER is an
    ``oru._Order`` (OBR, ORC, TQ1, the RESULT OBX groups) with its SPECIMEN groups beside it:
    ``[(order, [_Specimen, ...]), ...]``.  An OBX right after an SPM (before its
    CONTAINER's SAC/INV) is the specimen's own; after the container, or without an SPM, it is a result of
    the order."""
    from transforms import oru

    pid: Segment | None = None
    patient_obs: list[tuple[Segment, list[Segment]]] = []
    orders: list[tuple[Any, list[_Specimen]]] = []
    order: Any = None  # oru._Order
    specimen: _Specimen | None = None  # the SPECIMEN group whose own OBXs may follow
    notes: list[Segment] | None = None
    for seg in msg.segments:
        name = seg.name
        if name == "PID":
            if pid is None:
                pid = seg
            notes = None
        elif name == "OBR":
            order = oru._Order(seg, None)
            orders.append((order, []))
            specimen = None
            notes = order.notes
        elif name == "ORC" and order is not None and order.orc is None:
            order.orc = seg
            notes = order.notes
        elif name == "TQ1" and order is not None:
            if order.tq1 is None:
                order.tq1 = seg
            notes = None
        elif name == "SPM" and order is not None:
            specimen = _Specimen(seg)
            orders[-1][1].append(specimen)
            notes = None
        elif name == "OBX":
            group: tuple[Segment, list[Segment]] = (seg, [])
            if order is None:
                patient_obs.append(group)
            elif specimen is not None:
                specimen.observations.append(group)
            else:
                order.observations.append(group)
            notes = group[1]
        elif name == "NTE":
            if notes is not None:
                notes.append(seg)
        elif name in ("SAC", "INV"):
            specimen = None  # the CONTAINER ends the specimen's own OBXs; results follow
            notes = None
        elif name in _BREAKS and name != "PRT":
            notes = None
    return pid, patient_obs, orders


def _specimen_observations(group: _Specimen, sref: str, ctx: ConvertContext, enc: str | None) -> None:
    """The SPECIMEN group's own OBXs → Observations with that ``specimen``."""
    from transforms import orm

    for oref in orm.observations(
        group.observations, ctx, f"{ctx.key_of(sref) or sref}|observation", None, enc
    ):
        obs = ctx.find(oref)
        if obs is not None:
            obs.setdefault("specimen", {"reference": sref})


def _convert_r24(msg: Message, ctx: ConvertContext) -> None:
    """OUL^R24 (order-oriented observation): each ORDER → the ORU mapping with its SPECIMEN groups' SPMs
    as the report's specimens (``oru.report`` links the DiagnosticReport and its results to them)."""
    from transforms import orm, oru

    pid, patient_obs, orders = _order_groups(msg)
    if pid is None:
        raise ConversionError(
            "OUL message has no PID segment: results need a patient", code="100", location=Location("PID", 1)
        )
    if not orders and not patient_obs:
        raise ConversionError("OUL^R24 message has no OBR segment", code="100", location=Location("OBR", 1))
    patient_ref = oru.patient(pid, ctx)
    patient_key = ctx.key_of(patient_ref) or patient_ref
    enc = oru.encounter(msg, ctx)
    if patient_obs:
        orm.observations(patient_obs, ctx, f"{patient_key}|patient-observation", None, enc)
    for order, groups in orders:
        for group in groups:
            if group.spm is not None and group.observations:
                sref = orm.specimen(group.spm, ctx, None, None, patient_key)
                if sref is not None:
                    _specimen_observations(group, sref, ctx, enc)
        if groups:
            order.specimens = [g.spm for g in groups if g.spm is not None]
            order.obr_specimen = False  # the order's SPMs are its specimens (as OUL_R22)
        oru.report(order, ctx, enc)


def convert(msg: Message, ctx: ConvertContext) -> None:
    """OUL^R22 / R23 (specimen first; R23 adds the CONTAINER level) / R24 (order first) → entries in ``ctx``."""
    from transforms import orm, oru

    trigger = msg.trigger
    if trigger not in TRIGGERS:
        raise MessageRejected(
            f"OUL trigger {redact.trigger(trigger) if trigger else '(empty)'} is not supported "
            "(supported: R22, R23, R24)",
            code="201",
            location=Location("MSH", 1, 9, None, 2),
        )
    if trigger == "R24":
        _convert_r24(msg, ctx)
        return
    pid, patient_obs, specimens = _groups(msg)
    if pid is None:
        raise ConversionError(
            "OUL message has no PID segment: results need a patient", code="100", location=Location("PID", 1)
        )
    if not specimens and not patient_obs:
        raise ConversionError(
            "OUL message has no SPM or OBR segment", code="100", location=Location("SPM", 1)
        )
    patient_ref = oru.patient(pid, ctx)
    patient_key = ctx.key_of(patient_ref) or patient_ref
    enc = oru.encounter(msg, ctx)
    if patient_obs:
        orm.observations(patient_obs, ctx, f"{patient_key}|patient-observation", None, enc)
    for group in specimens:
        sref = orm.specimen(group.spm, ctx, None, None, patient_key) if group.spm is not None else None
        if sref is not None and group.observations:
            for oref in orm.observations(
                group.observations, ctx, f"{ctx.key_of(sref) or sref}|observation", None, enc
            ):
                obs = ctx.find(oref)
                if obs is not None:
                    obs.setdefault("specimen", {"reference": sref})
        for order in group.orders:
            if group.spm is not None:
                order.specimens = [group.spm]  # the group's specimen, not one made from the OBR
                order.obr_specimen = False
            ref = oru.report(order, ctx, enc)
            if sref is None:
                continue
            report = ctx.find(ref)
            if report is None:
                continue
            report["specimen"] = [{"reference": sref}]
            for result in report.get("result", ()):
                obs = ctx.find(result["reference"])
                if obs is not None:
                    obs.setdefault("specimen", {"reference": sref})
            for based in report.get("basedOn", ()):
                sr = ctx.find(based["reference"])
                if sr is not None:
                    sr.setdefault("specimen", [{"reference": sref}])
                    spec = ctx.find(sref)
                    if spec is not None:
                        spec.setdefault("request", [{"reference": based["reference"]}])


__all__ = ["TRIGGERS", "convert"]
