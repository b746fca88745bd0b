"""HL7 v2 message → FHIR R4 transaction Bundle: the entry point.

``convert(msg, settings)`` returns the Bundle (a plain dict); ``convert_report`` returns a
:class:`Conversion` with the counted events, status guards and required resources too.

Dispatch is by MSH-9.1: ``ADT`` → :mod:`transforms.adt`, ``ORU`` → :mod:`transforms.oru`,
``SIU`` → :mod:`transforms.siu`.  Each module exposes ``convert(msg, ctx) -> None`` and adds
entries to the :class:`transforms.bundle.ConvertContext`.

Errors: an unsupported message type is ``MessageRejected`` (AR 200), an unsupported trigger AR 201;
content problems are ``ConversionError`` (AE 101/102/103/204) with a location.  Nothing else
escapes: an unexpected failure inside a mapping becomes ``ConversionError`` code 207 (counted as
``internal_error``) so the message is failed with a reason, never a traceback.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

from engine.errors import ConversionError, Location, MessageRejected, SluiceError
from engine.hl7 import Message
from transforms.bundle import Conversion, ConvertContext, det_uuid
from transforms.datatypes import V2_TABLE, dtm_at, fhir_code, utc_now_instant, value
from transforms.settings import ConvertSettings

__all__ = ["MODULES", "Conversion", "ConvertSettings", "convert", "convert_report"]

MODULES: dict[str, str] = {"ADT": "transforms.adt", "ORU": "transforms.oru", "SIU": "transforms.siu"}
PROVENANCE_TAG_SYSTEM = "urn:sluice:message"

_loaded: dict[str, ModuleType] = {}


def _module(message_type: str) -> ModuleType:
    mod = _loaded.get(message_type)
    if mod is not None:
        return mod
    name = MODULES.get(message_type)
    if name is None:
        raise MessageRejected(
            f"message type {message_type or '(empty)'!r} is not supported by the FHIR conversion "
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
            f"message type {message_type!r} is not supported yet",
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
        raise ConversionError(
            f"internal conversion error ({type(exc).__name__}) converting {msg.message_type}^{msg.trigger}",
            code="207",
        ) from exc


def convert(msg: Message, settings: ConvertSettings) -> dict[str, Any]:
    """Convert one message to a FHIR R4 ``transaction`` Bundle (a plain dict)."""
    return convert_report(msg, settings).bundle


def _convert(msg: Message, settings: ConvertSettings) -> Conversion:
    """The conversion without the safety net (property tests call this to find real bugs)."""
    mod = _module(msg.message_type)
    ctx = ConvertContext(msg, settings)
    fn: Callable[[Message, ConvertContext], None] = mod.convert
    fn(msg, ctx)
    if settings.provenance and ctx.entries:
        add_provenance(msg, ctx)
    if settings.validate:
        validate_bundle(ctx.bundle())
    return ctx.result()


def add_provenance(msg: Message, ctx: ConvertContext) -> None:
    """MSH → one Provenance (IG: MSH[Provenance-Transformation]) targeting every resource written.

    Provenance has no identifier, so it is a conditional *create* on a tag holding the uuid5 of
    sender + control id: a resent message does not add a second Provenance.
    """
    msh = msg.msh
    app, facility = value(msh, 3, ctx), value(msh, 4, ctx)
    sender = f"{app}|{facility}|{msg.control_id}"
    tag = det_uuid("message|" + sender)
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
