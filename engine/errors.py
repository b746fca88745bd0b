"""One exception tree for the whole engine.

Every error a message can meet carries the acknowledgement it should produce
(like h11's ``error_status_hint``): ``ack_code`` is the original-mode code
(``AR`` reject / ``AE`` error) and ``hl7_error`` the HL7 table 0357 code.  The
translation into an ACK happens at exactly one boundary (``engine.intake``);
nothing else inspects exception types to choose ACK codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Location:
    """Where in a message an error is (HL7 ERR-2 / ERL)."""

    segment: str
    sequence: int = 1
    field: int | None = None
    repetition: int | None = None
    component: int | None = None
    subcomponent: int | None = None

    def hl7(self, component_sep: str = "^") -> str:
        """ERR-2 form, e.g. ``PID^1^3`` or ``PID^1^3^1^1``."""
        parts = [self.segment, str(self.sequence)]
        if self.field is not None:
            parts.append(str(self.field))
            if self.component is not None:
                parts.append(str(self.repetition or 1))
                parts.append(str(self.component))
                if self.subcomponent is not None:
                    parts.append(str(self.subcomponent))
        return component_sep.join(parts)

    def __str__(self) -> str:
        s = self.segment if self.sequence == 1 else f"{self.segment}({self.sequence})"
        if self.field is not None:
            s += f"-{self.field}"
            if self.component is not None:
                s += f".{self.component}"
                if self.subcomponent is not None:
                    s += f".{self.subcomponent}"
        return s


# HL7 table 0357, the codes Sluice uses.
HL7_ERROR_TEXT: dict[str, str] = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}


class SluiceError(Exception):
    """Base of every error Sluice raises on purpose."""

    ack_code: ClassVar[str] = "AR"
    hl7_error: ClassVar[str] = "207"

    def __init__(self, message: str, *, code: str | None = None, location: Location | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.hl7_error = code  # type: ignore[misc]
        self.location = location

    def __str__(self) -> str:
        if self.location is not None:
            return f"{self.message} (at {self.location})"
        return self.message

    @property
    def reason(self) -> str:
        """The message without the location it starts with (``PID-7: is not a valid ...`` → ``is not a valid
        ...``): for a warning that is located by itself."""
        prefix = str(self.location) if self.location is not None else ""
        if prefix and self.message.startswith(prefix):
            return self.message[len(prefix) :].lstrip(" :")
        return self.message


class ConfigError(SluiceError):
    """Bad configuration: names the file, the key path and what to do."""

    def __init__(
        self, message: str, *, file: str | None = None, key: str | None = None, hint: str | None = None
    ):
        super().__init__(message)
        self.file = file
        self.key = key
        self.hint = hint

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}: "
        if self.key:
            where += f"{self.key}: "
        text = f"{where}{self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text


class FramingError(SluiceError):
    """MLLP protocol violation.  No ACK can be sent; the connection is closed."""


class MessageRejected(SluiceError):
    """The receiver cannot accept the message as such (AR).  The sender may resend unchanged."""

    ack_code = "AR"
    hl7_error = "207"


class StoreError(MessageRejected):
    """The durable write failed: AR 207, nothing half-written."""

    hl7_error = "207"


class MessageContentError(SluiceError):
    """A content problem the sender must fix (AE)."""

    ack_code = "AE"
    hl7_error = "101"


class ConversionError(MessageContentError):
    """HL7 v2 → FHIR conversion found content it cannot map; carries a location."""


class InternalConversionError(ConversionError):
    """A bug in a mapping, not a problem with the message: AR 207 (application internal error).

    Raised only by the converter's safety net (``transforms.convert.convert_report``), chained
    (``__cause__``) to the unexpected exception, so the message is failed with a reason instead of
    crashing a worker, yet tests and the conformance runner can tell it from a located
    ``ConversionError`` the sender must fix.  AR, not AE: the content may well be fine; the
    stored message can be replayed once the converter is fixed.
    """

    ack_code = "AR"
    hl7_error = "207"


REJECTION_CLASSES = ("validation", "auth", "throttling", "server", "network", "conflict")
"""Why a delivery failed (``DeliveryError.category``; the ``class`` label of ``sluice_rejections_total``)."""


class DeliveryError(SluiceError):
    """A destination could not take a message.

    ``retryable`` says whether trying again later can help; ``retry_after`` is a
    server's hint in seconds (Retry-After), if it gave one.  ``category`` is the cause, one of
    :data:`REJECTION_CLASSES` (``None``: ``engine.metrics.rejection_class`` works it out).
    ``match_failure`` names the resource type of a conditional write that matched several
    resources on the server (e.g. ``"Patient"``: a patient match failure).
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = True,
        retry_after: float | None = None,
        category: str | None = None,
        match_failure: str | None = None,
    ):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        if category is not None and category not in REJECTION_CLASSES:
            raise ValueError(
                f"unknown rejection category {category!r}; use one of {', '.join(REJECTION_CLASSES)}"
            )
        self.category = category
        self.match_failure = match_failure


class PermanentDeliveryError(DeliveryError):
    """The destination rejected the message for good: dead-letter it with this reason."""

    def __init__(self, message: str, *, category: str | None = None, match_failure: str | None = None):
        super().__init__(message, retryable=False, category=category, match_failure=match_failure)
