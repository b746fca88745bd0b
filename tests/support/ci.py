"""Whether the tests run in CI, and what a missing service (PostgreSQL, RabbitMQ, the FHIR server) does then.

CI systems set ``CI`` to ``true``, ``1``, ``yes`` or their own name; any non-empty value other than
``false`` or ``0`` (any case) counts.  In CI a test that needs a service fails when the service is
missing; on a developer's machine it is skipped.  This is the one definition every conftest uses.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NoReturn

import pytest

NOT_CI = ("", "false", "0")


def in_ci(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``CI`` is set to anything but empty, ``false`` or ``0``."""
    env = os.environ if environ is None else environ
    return env.get("CI", "").strip().lower() not in NOT_CI


IN_CI = in_ci()


def service_unavailable(reason: str) -> NoReturn:
    """Fail in CI (services are required there); skip on a developer machine without them."""
    if in_ci():
        pytest.fail(f"{reason} (CI={os.environ.get('CI', '')!r}: services are required in CI)", pytrace=False)
    pytest.skip(reason)
