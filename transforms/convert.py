"""HL7 v2 message → FHIR R4 transaction Bundle: the entry point.

``convert(msg, settings)`` returns the Bundle (a plain dict); ``convert_report`` returns a
:class:`Conversion` with the counted events, status guards and required resources too.

Dispatch is by MSH-9.1: ``ADT`` → :mod:`transforms.adt`, ``ORU`` → :mod:`transforms.oru`,
``SIU`` → :mod:`transforms.siu`, ``VXU`` → :mod:`transforms.vxu`, ``MDM`` → :mod:`transforms.mdm`, ``PPR`` → :mod:`transforms.ppr`,
``DFT``/``BAR`` → :mod:`transforms.dft`, ``ORM``/``OML``/``OMG`` → :mod:`transforms.orm`, ``OUL`` → :mod:`transforms.oul`,
``REF`` → :mod:`transforms.ref`, ``RDE``/``RDS`` → :mod:`transforms.rde`.  Each module exposes ``convert(msg, ctx) -> None`` and adds
entries to the :class:`transforms.bundle.ConvertContext`.

Errors: an unsupported message type is ``MessageRejected`` (AR 200), an unsupported trigger AR 201;
content problems are ``ConversionError`` (AE 101/102/103/204) with a location.  Nothing else
escapes: an unexpected failure inside a mapping (a converter bug) becomes
``InternalConversionError`` (AR 207, a ``ConversionError`` subclass without a location, chained to
the original exception) so the message is failed with a reason, never a traceback, and a test or
the conformance runner can still tell a bug from content the sender must fix.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from types import ModuleType
from typing import Any, Final

from engine import redact
from engine.errors import ConversionError, InternalConversionError, Location, MessageRejected, SluiceError
from engine.hl7 import HEADER_SEGMENTS, Message, escape, parse, unescape
from transforms.bundle import Conversion, ConvertContext, uuid5
from transforms.datatypes import V2_TABLE, dtm_at, fhir_code, utc_now_instant, value
from transforms.settings import ConvertSettings

__all__ = ["MODULES", "Conversion", "ConvertSettings", "convert", "convert_report"]

MODULES: Final[dict[str, str]] = {
    "ADT": "transforms.adt",
    "ORU": "transforms.oru",
    "SIU": "transforms.siu",
    "VXU": "transforms.vxu",
    "MDM": "transforms.mdm",
    "PPR": "transforms.ppr",
    "DFT": "transforms.dft",
    "BAR": "transforms.dft",
    "ORM": "transforms.orm",
    "OML": "transforms.orm",
    "OMG": "transforms.orm",
    "OUL": "transforms.oul",
    "REF": "transforms.ref",
    "RDE": "transforms.rde",
    "RDS": "transforms.rde",
    "OMP": "transforms.rde",
}
PROVENANCE_TAG_SYSTEM: Final = "urn:sluice:message"

_loaded: dict[str, ModuleType] = {}


def _module(message_type: str) -> ModuleType:
    mod = _loaded.get(message_type)
    if mod is not None:
        return mod
    name = MODULES.get(message_type)
    if name is None:
        raise MessageRejected(
            f"message type {redact.message_type(message_type) if message_type else '(empty)'} is not supported by the "
            "FHIR conversion "
            f"(supported: {', '.join(sorted(MODULES))})",
            code="200",
            location=Location("MSH", 1, 9, None, 1),
        )
    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        raise MessageRejected(
            f"message type {redact.message_type(message_type)} is not supported yet",
            code="200",
            location=Location("MSH", 1, 9, None, 1),
        ) from None
    _loaded[message_type] = mod
    return mod


def convert_report(msg: Message, settings: ConvertSettings) -> Conversion:
    """Convert one message; the Bundle plus events, guards and requires."""
    try:
        return _convert(msg, settings)
    except SluiceError:
        raise
    except Exception as exc:  # a mapping bug must fail the message with a reason, not crash the worker
        raise InternalConversionError(
            f"internal conversion error ({type(exc).__name__}) converting "
            f"{redact.type_and_trigger(msg.message_type, msg.trigger)}: "
            "a Sluice bug, not a problem with the message; report it and replay the message once fixed"
        ) from exc


def convert(msg: Message, settings: ConvertSettings) -> dict[str, Any]:
    """Convert one message to a FHIR R4 ``transaction`` Bundle (a plain dict, read-only: it may share recurring
    entries with other conversions of the same settings; ``copy.deepcopy`` it to change it)."""
    return convert_report(msg, settings).bundle


def _convert(msg: Message, settings: ConvertSettings) -> Conversion:
    """The conversion without the safety net (property tests call this to find real bugs)."""
    mod = _module(msg.message_type)
    cleaned = has_control_characters(msg)
    if cleaned:
        msg = without_control_characters(msg)
    nulls = 0
    if '""' in msg.text:
        msg, nulls = without_explicit_nulls(msg)
    fn: Callable[[Message, ConvertContext], None] = mod.convert
    dropped: list[tuple[Location, str]] = []
    while True:
        ctx = ConvertContext(msg, settings)
        if cleaned:
            ctx.count("control_characters_removed")
        if nulls:
            ctx.count("explicit_null", nulls)
        for where, why in dropped:
            ctx.warn("field_dropped", where, why)
        try:
            fn(msg, ctx)
            if settings.provenance and ctx.entries:
                add_provenance(msg, ctx)
        except ConversionError as exc:
            field_loc = droppable(exc, settings)
            if field_loc is None or len(dropped) >= MAX_DROPPED_FIELDS:
                raise
            at = exc.location
            assert at is not None  # droppable() returns a field only for a located error
            why = exc.reason
            field = f"{field_loc.segment}-{field_loc.field}"
            msg, more = without_field(msg, field_loc)
            also = f" (and from {more} more {field_loc.segment} with the same value)" if more else ""
            dropped.append((at, f"{why}; {field} was left out{also} (channel strictness: lenient)"))
            continue
        break
    if settings.validate:
        validate_bundle(ctx.bundle())
    return ctx.result()


# ---------------------------------------------------------------------------
# strictness: lenient -- one decision for every located error a mapper raises
# ---------------------------------------------------------------------------
# Fields that identify something (the patient, the message, the visit, an order, an appointment, a
# document): a bad value there is never dropped, in either mode.  Every MSH field is kept strict too.
KEY_FIELDS: Final[frozenset[tuple[str, int]]] = frozenset(
    {
        ("PID", 2), ("PID", 3), ("PID", 4),  # patient identifiers (PID-2/4: the v2.3 fallbacks)
        ("MRG", 1), ("MRG", 2), ("MRG", 3), ("MRG", 4), ("MRG", 5), ("MRG", 6),  # prior patient/visit ids
        ("PV1", 19), ("PV1", 50),  # visit number, alternate visit id
        ("ORC", 2), ("ORC", 3), ("ORC", 4),  # placer/filler order numbers, placer group number
        ("OBR", 2), ("OBR", 3),  # placer/filler order numbers
        ("SCH", 1), ("SCH", 2), ("ARQ", 1), ("ARQ", 2),  # appointment ids
        ("SCH", 11),  # the appointment's start and end: a booked Appointment without them is invalid FHIR
        ("TXA", 12), ("TXA", 13),  # unique document number, parent document number
        ("RXA", 1), ("RXA", 2),  # immunization give sub-id, administration sub-id
        ("OBX", 5),  # the observation value itself: a result is never sent without its value
        ("PID", 18),  # patient account number (Account key; A35/A41 account merges)
        ("FT1", 2),  # financial transaction id (ChargeItem key)
        ("PRB", 4), ("GOL", 4),  # problem / goal instance ids (Condition / Goal keys)
        ("RXE", 15), ("RXD", 1),  # prescription number, dispense sub-id counter (MedicationRequest / Dispense)
        ("IAM", 7),  # allergy unique identifier (AllergyIntolerance key)
        ("PR1", 19),  # procedure identifier (Procedure key)
        ("SPM", 2),  # specimen id (Specimen key)
    }
)  # fmt: skip
KEY_SEGMENTS: Final = frozenset({"MSH", "FHS", "BHS"})
# ...but for the message's date/time (MSH-7: only Provenance.recorded reads it, which falls back to the time of
# conversion): senders write it in forms HL7 does not allow (Mirth's test data: milliseconds without the dot)
HEADER_DROPPABLE: Final = frozenset({("MSH", 7)})
# A message with more bad fields than this is rejected in lenient mode too (it is not a stray value).
MAX_DROPPED_FIELDS: Final = 20


def droppable(exc: ConversionError, settings: ConvertSettings) -> Location | None:
    """The field a lenient conversion leaves out instead of rejecting the message, or None (reject).

    Only a *bad value* (HL7 error 102, data type error) located in a field that is not a key; a missing
    required field (101), a table or code-map miss the channel asked to reject (103), an unknown key
    (204) and an unlocated error are rejected in both modes."""
    loc = exc.location
    if (
        settings.strictness != "lenient"
        or exc.hl7_error != "102"
        or isinstance(exc, InternalConversionError)
        or loc is None
        or loc.field is None
        or (loc.segment in KEY_SEGMENTS and (loc.segment, loc.field) not in HEADER_DROPPABLE)
        or (loc.segment, loc.field) in KEY_FIELDS
    ):
        return None
    return Location(loc.segment, loc.sequence, loc.field)


def without_field(msg: Message, loc: Location) -> tuple[Message, int]:
    """``msg`` parsed again with field ``loc.field`` of the ``loc.sequence``-th ``loc.segment`` emptied (every
    repetition), and with it the same field of every other ``loc.segment`` that holds the very same value (a
    sender's systematic fault, such as one impossible analysis date on each of 130 results, is one bad value:
    it would fail there the same way); and how many of those others were emptied.  Segments are matched to
    lines as :func:`engine.hl7.parse` numbers them."""
    d = msg.delimiters
    lines = [line for line in msg.text.split("\r") if line]
    segs = msg.segments
    if loc.field is None:
        return msg, 0
    n = loc.field - 1 if loc.segment in HEADER_SEGMENTS else loc.field
    split = [
        line.split(d.field) if seg.name == loc.segment else None
        for line, seg in zip(lines, segs, strict=True)
    ]
    bad: str | None = None
    for fields, seg in zip(split, segs, strict=True):
        if fields is not None and seg.sequence == loc.sequence and 0 < n < len(fields):
            bad = fields[n]
    more = 0
    out: list[str] = []
    for line, fields, seg in zip(lines, split, segs, strict=True):
        if fields is not None and 0 < n < len(fields) and bad is not None:
            if seg.sequence == loc.sequence:
                fields[n] = ""
                line = d.field.join(fields)
            elif fields[n] == bad and bad:
                fields[n] = ""
                line = d.field.join(fields)
                more += 1
        out.append(line)
    return parse("\r".join(out)), more


# FHIR strings allow no character below U+0020 but TAB, LF and CR; HL7 v2 text has no business carrying
# one either (a NUL from a broken interface, a \X00\ escape), so the conversion drops them.
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
# the control characters FHIR strings forbid (all below U+0020 but TAB, LF and CR), one string each: ``ch in
# text`` is a single-character search (memchr), 29 of them cost a third of one bytes.translate of the text
_CONTROL_CHARS: Final = tuple(chr(c) for c in range(32) if c not in (9, 10, 13))


def has_control_characters(msg: Message) -> bool:
    """Could a value of ``msg`` hold a control character FHIR forbids?  Raw ones (a control-character
    delimiter too), or a hex escape (``\\X..\\``) that may decode to one.  C-level scans of the text:
    a one-character search per control character, then ``find`` of the escape character (memchr), which the usual message holds only in
    MSH-2; the usual message has neither."""
    text = msg.text
    for ch in _CONTROL_CHARS:  # one memchr-like scan each: cheaper than one translation of the whole text
        if ch in text:
            return True
    d = msg.delimiters
    esc = d.escape
    if not esc or esc == d.field:
        return False
    # == (esc + "X") in text: a one-character find is a memchr, a two-character search is not
    i = text.find(esc)
    while i >= 0:
        if text.startswith("X", i + 1):
            return True
        i = text.find(esc, i + 1)
    return False


def without_control_characters(msg: Message) -> Message:
    """``msg`` parsed again with every control character FHIR forbids taken out of its values.

    Segments, fields, repetitions and components stay where they are (delimiters are kept, even control
    characters used as delimiters, and so are segment names and MSH-2); a value whose escapes decode to
    such a character (``\\X00\\``, or ``\\F\\`` when the field separator is one) is written back
    escaped without it.  The mappings then see clean values, so an identifier or a name that was only
    control characters is empty, as it should be, rather than an invalid empty FHIR string."""
    d = msg.delimiters
    literal = {ch for ch in (d.escape, d.truncation) if ch}

    def clean(value: str) -> str:
        if _CONTROL.search(value):
            value = "".join(ch for ch in value if ch in literal or not _CONTROL.match(ch))
        if d.escape and d.escape in value:
            decoded = unescape(value, d)
            if _CONTROL.search(decoded):
                value = escape(_CONTROL.sub("", decoded), d)
        return value

    def split_clean(value: str, seps: str) -> str:
        if not seps:
            return clean(value)
        sep, rest = seps[0], seps[1:]
        return sep.join(split_clean(part, rest) for part in value.split(sep))

    inner = "".join(ch for ch in (d.repetition, d.component, d.subcomponent) if ch)
    lines: list[str] = []
    for line in msg.text.split("\r"):
        fields = line.split(d.field)
        first = 2 if fields[0] in HEADER_SEGMENTS else 1  # the segment name, and MSH-2 as sent
        fields[first:] = [split_clean(f, inner) for f in fields[first:]]
        lines.append(d.field.join(fields))
    return parse("\r".join(lines))


_NULL: Final = '""'


def without_explicit_nulls(msg: Message) -> tuple[Message, int]:
    """``msg`` with HL7's explicit null taken out: every field, repetition, component or subcomponent that
    is exactly ``""`` becomes empty, and how many there were.

    In HL7 v2 ``""`` means "this value is deleted", never the two-character string.  The mappings then
    see an empty value: the element is left out of the resource, and since ADT writes are full
    conditional updates, an update (A08, A31) that sends ``""`` clears the element on the server.  A
    ``""`` in an optional date is an absent date, not an invalid one; in a key field (PID-3, PV1-19 ...)
    it is a missing key, rejected as such.  MSH-1/MSH-2 and segment names are kept as sent."""
    d = msg.delimiters
    seps = "".join(ch for ch in (d.repetition, d.component, d.subcomponent) if ch)
    found = [0]  # (a list, not nonlocal: the module is compiled with mypyc)

    def split_null(value: str, rest: str) -> str:
        if value == _NULL:
            found[0] += 1
            return ""
        if _NULL not in value or not rest:
            return value
        sep = rest[0]
        if sep not in value:
            return split_null(value, rest[1:])
        return sep.join(split_null(part, rest[1:]) for part in value.split(sep))

    lines: list[str] = []
    for line in msg.text.split("\r"):
        if _NULL in line:
            fields = line.split(d.field)
            first = 2 if fields[0] in HEADER_SEGMENTS else 1
            fields[first:] = [split_null(f, seps) for f in fields[first:]]
            line = d.field.join(fields)
        lines.append(line)
    if not found[0]:
        return msg, 0
    return parse("\r".join(lines)), found[0]


def add_provenance(msg: Message, ctx: ConvertContext) -> None:
    """MSH → one Provenance (IG: MSH[Provenance-Transformation]) targeting every resource written.

    Provenance has no identifier, so it is a conditional *create* on a tag holding the uuid5 of
    sender + control id: a resent message does not add a second Provenance.
    """
    msh = msg.msh
    app, facility = value(msh, 3, ctx), value(msh, 4, ctx)
    sender = f"{app}|{facility}|{msg.control_id}"
    tag = uuid5("message|" + sender)  # unique per message: not cached
    recorded = dtm_at(value(msh, 7, ctx), ctx.settings, msh, 7, kind="instant")
    targets = [{"reference": e["fullUrl"]} for e in ctx.entries]
    trigger = fhir_code(msg.trigger)  # a FHIR code: no inner line breaks or runs of spaces
    prov: dict[str, Any] = {
        "resourceType": "Provenance",
        "meta": {"tag": [{"system": PROVENANCE_TAG_SYSTEM, "code": tag}]},
        "target": targets,
        "recorded": recorded or utc_now_instant(),
        "activity": {
            "coding": [{"system": V2_TABLE + "0003", "code": trigger}]
            if trigger
            else [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "UPDATE"}]
        },
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "author",
                        }
                    ]
                },
                "who": {"display": app.strip() or facility.strip() or "unknown sender"},
            }
        ],
    }
    ctx.add_create("Provenance", prov, if_none_exist=f"_tag={PROVENANCE_TAG_SYSTEM}|{tag}", key=sender)


def validate_bundle(bundle: dict[str, Any]) -> None:
    """Validate every entry's resource (and the Bundle) with the fhir.resources R4B models.

    Raises ``ConversionError`` (AE 102) naming the resource type and element paths (never values).
    Costly (~0.1-1 ms per resource): a per-channel option, off on the hot path.
    """
    from fhir.resources.R4B import get_fhir_model_class

    try:
        from pydantic.v1 import ValidationError as V1Error
    except ImportError:  # pragma: no cover
        V1Error = ValueError  # type: ignore[misc,assignment]
    from pydantic import ValidationError as V2Error

    for entry in bundle.get("entry", ()):
        res = entry["resource"]
        rtype = res.get("resourceType", "")
        try:
            get_fhir_model_class(rtype).parse_obj(res)
        except (V1Error, V2Error, KeyError, ValueError, TypeError) as exc:
            paths = _error_paths(exc)
            raise ConversionError(f"converted {rtype} is not valid FHIR R4 ({paths})", code="102") from None


def _error_paths(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            items = errors()
            return "; ".join(
                ".".join(str(p) for p in e.get("loc", ())) + ": " + str(e.get("type", "invalid"))
                for e in items[:5]
            )
        except Exception:  # pragma: no cover
            pass
    return type(exc).__name__
