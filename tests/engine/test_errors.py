"""engine/errors.py: the one exception tree (what a located error says of itself)."""

from __future__ import annotations

from engine.errors import ConversionError, Location


def test_reason_is_the_message_without_the_location_it_starts_with() -> None:
    at = Location("PID", 1, 7)
    assert ConversionError("PID-7: is not a valid HL7 date/time", code="102", location=at).reason == (
        "is not a valid HL7 date/time"
    )
    assert ConversionError("PID-7 is empty", code="101", location=at).reason == "is empty"
    # a message that does not start with its location, or an unlocated one, is its own reason
    assert ConversionError("no such date", code="102", location=at).reason == "no such date"
    assert ConversionError("no such date", code="102").reason == "no such date"
