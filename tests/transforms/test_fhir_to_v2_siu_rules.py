"""Appointment → SIU: issue #15's rules for which message a new version sends, one case each (pure).

S12 new; S13 only when a time changed (start, end, duration; the same instant written with another offset
is no change); S14 for any other change the SIU carries; S15 cancelled, S26 no-show, both only after
something was sent; nothing when nothing the SIU carries changed; a cancel or no-show of an appointment
never sent sends nothing; booked again after a cancel or no-show is a new S12 (synthetic data)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.transforms.test_fhir_to_v2 import APPOINTMENT, SETTINGS, appointment
from transforms.fhir_to_v2.convert import convert
from transforms.fhir_to_v2.outbound import ALREADY_CLOSED, NEVER_SENT, UNCHANGED, Sent, decide


def last_sent(res: dict[str, Any] | None, message: str) -> Sent | None:
    if res is None:
        return None
    out = convert(res, SETTINGS)
    return Sent(out.state, out.content, out.timing, message)


MOVED = {"start": "2026-12-11T17:00:00Z", "end": "2026-12-11T17:30:00Z"}
NO_TIMES = {"start": None, "end": None, "minutesDuration": None}


@pytest.mark.parametrize(
    ("now", "before", "expected"),
    [
        pytest.param(APPOINTMENT, None, ("S12", ""), id="new"),
        pytest.param(appointment(status="proposed"), None, ("S12", ""), id="new-proposed"),
        pytest.param(appointment(**MOVED), (APPOINTMENT, "S12"), ("S13", ""), id="moved"),
        pytest.param(
            appointment(**MOVED, comment="x"), (APPOINTMENT, "S12"), ("S13", ""), id="moved-and-noted"
        ),
        pytest.param(
            appointment(end="2026-12-10T17:45:00Z"), (APPOINTMENT, "S12"), ("S13", ""), id="end-only"
        ),
        pytest.param(appointment(minutesDuration=45), (APPOINTMENT, "S12"), ("S13", ""), id="duration-only"),
        pytest.param(appointment(), (appointment(**NO_TIMES), "S12"), ("S13", ""), id="time-given-later"),
        pytest.param(
            appointment(start="2026-12-10T09:00:00-08:00", end="2026-12-10T09:30:00-08:00"),
            (APPOINTMENT, "S12"),
            (None, UNCHANGED),
            id="same-instant-other-offset",
        ),
        pytest.param(appointment(comment="other"), (APPOINTMENT, "S12"), ("S14", ""), id="comment"),
        pytest.param(appointment(status="arrived"), (APPOINTMENT, "S12"), ("S14", ""), id="status-arrived"),
        pytest.param(appointment(serviceType=[]), (APPOINTMENT, "S12"), ("S14", ""), id="service-removed"),
        pytest.param(
            appointment(meta={"versionId": "7", "lastUpdated": "2026-12-05T00:00:00Z"}),
            (APPOINTMENT, "S12"),
            (None, UNCHANGED),
            id="new-version-nothing-carried",
        ),
        pytest.param(
            appointment(description="not in SIU"), (APPOINTMENT, "S12"), (None, UNCHANGED), id="description"
        ),
        pytest.param(
            appointment(comment="other"),
            (appointment(comment="other"), "S14"),
            (None, UNCHANGED),
            id="same-as-s14",
        ),
        pytest.param(appointment(status="cancelled"), (APPOINTMENT, "S12"), ("S15", ""), id="cancel"),
        pytest.param(
            appointment(status="cancelled"), (appointment(**MOVED), "S13"), ("S15", ""), id="cancel-after-s13"
        ),
        pytest.param(appointment(status="noshow"), (APPOINTMENT, "S12"), ("S26", ""), id="noshow"),
        pytest.param(appointment(status="cancelled"), None, (None, NEVER_SENT), id="cancel-never-sent"),
        pytest.param(appointment(status="noshow"), None, (None, NEVER_SENT), id="noshow-never-sent"),
        pytest.param(
            appointment(status="cancelled", cancelationReason={"text": "x"}),
            (appointment(status="cancelled"), "S15"),
            (None, ALREADY_CLOSED),
            id="cancel-again",
        ),
        pytest.param(
            appointment(status="cancelled"),
            (appointment(status="noshow"), "S26"),
            (None, ALREADY_CLOSED),
            id="cancel-after-noshow",
        ),
        pytest.param(
            APPOINTMENT, (appointment(status="cancelled"), "S15"), ("S12", ""), id="booked-after-cancel"
        ),
        pytest.param(
            APPOINTMENT, (appointment(status="noshow"), "S26"), ("S12", ""), id="booked-after-noshow"
        ),
    ],
)
def test_which_message_a_version_sends(
    now: dict[str, Any], before: tuple[dict[str, Any], str] | None, expected: tuple[str | None, str]
) -> None:
    prev = last_sent(*before) if before is not None else None
    out = convert(now, SETTINGS)
    message, reason = decide(out, prev)
    assert (message, reason) == expected
    if message is not None:
        assert message in out.variants  # the payload for the chosen trigger is there
