"""One FHIR resource → its :class:`~transforms.fhir_to_v2.outbound.Outbound` (pure): dispatch by type."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from engine.errors import ConversionError, SluiceError
from transforms.fhir_to_v2 import adt, orm, siu
from transforms.fhir_to_v2.outbound import Outbound, is_deleted
from transforms.fhir_to_v2.settings import WritebackSettings

CONVERTERS: dict[str, Callable[[dict[str, Any], WritebackSettings, str], Outbound]] = {
    "Appointment": siu.convert,
    "Patient": adt.convert,
    "ServiceRequest": orm.convert,
}

# A deleted resource (a fhir-poll tombstone, outbound.DELETED_TAG) converts as the status that means
# "this should not exist" (state deleted: SIU^S17, ORC-1 CA); a Patient's converter reads the tag (A29).
DELETED_STATUS: dict[str, str] = {"Appointment": "entered-in-error", "ServiceRequest": "entered-in-error"}


def convert(resource: Any, settings: WritebackSettings, now: str | None = None) -> Outbound:
    """A resource (parsed JSON) → its candidate HL7 v2 messages; ``ConversionError`` saying what is wrong."""
    if not isinstance(resource, dict):
        raise ConversionError("the FHIR content is not a JSON object (a resource)", code="100")
    rtype = str(resource.get("resourceType") or "")
    fn = CONVERTERS.get(rtype)
    if fn is None:
        raise ConversionError(
            f"fhir-to-hl7 cannot write a {rtype[:40] or 'resource without resourceType'} as HL7 v2 "
            f"(it writes {', '.join(sorted(CONVERTERS))}); filter other types out of the channel",
            code="200",
        )
    when = now or datetime.now(UTC).isoformat(timespec="seconds")
    if rtype in DELETED_STATUS and is_deleted(resource):
        resource = {**resource, "status": DELETED_STATUS[rtype]}
    try:
        return fn(resource, settings, when)
    except UnicodeEncodeError as exc:
        raise ConversionError(
            f"the {rtype} has a character that charset {settings.charset or 'ASCII'} cannot carry "
            f"(position {exc.start} of the message); set the step's charset to 'UNICODE UTF-8' if the "
            "receiver accepts it",
            code="102",
        ) from None
    except SluiceError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError):
        raise ConversionError(
            # (no exception type in the text: the compiled build raises TypeError where pure Python
            # raises AttributeError, and both must say the same)
            f"the {rtype} has a value fhir-to-hl7 cannot read: check that it is valid FHIR R4 (dates as "
            "YYYY-MM-DD or full instants, references as {reference: Type/id}, text where text belongs)",
            code="102",
        ) from None
