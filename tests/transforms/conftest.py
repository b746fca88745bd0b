"""Shared fixtures for the HL7 v2 → FHIR conversion tests (synthetic data only)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from engine.hl7 import Message, parse
from transforms.settings import ConvertSettings

HERE = Path(__file__).resolve().parent
MESSAGES = HERE / "messages"
EXPECTED = HERE / "expected"

IDENTIFIER_SYSTEMS = {
    "HOSP": "urn:oid:2.16.840.1.113883.19.5",
    "VISITS": "urn:oid:2.16.840.1.113883.19.6",
    "GOODHOSP": "urn:oid:2.16.840.1.113883.19.7",
    "PAYERS": "urn:oid:2.16.840.1.113883.19.8",
}


def golden_settings(**kw: Any) -> ConvertSettings:
    """The strict settings the golden files were made with (no derived systems)."""
    base: dict[str, Any] = {"site_tz": "America/Los_Angeles", "identifier_systems": IDENTIFIER_SYSTEMS}
    base.update(kw)
    return ConvertSettings(**base)


@pytest.fixture
def settings() -> ConvertSettings:
    return golden_settings()


def load(name: str) -> Message:
    return parse((MESSAGES / f"{name}.hl7").read_text(encoding="utf-8"))


def msg(*segments: str) -> Message:
    return parse("\r".join(segments) + "\r")


def validate_resources(bundle: dict[str, Any]) -> None:
    """Every entry's resource and the Bundle itself must be valid FHIR R4 (fhir.resources R4B)."""
    from fhir.resources.R4B import get_fhir_model_class

    for entry in bundle["entry"]:
        res = entry["resource"]
        get_fhir_model_class(res["resourceType"]).parse_obj(res)
        assert entry["fullUrl"].startswith("urn:uuid:")
        assert entry["request"]["method"] in ("PUT", "POST")
    get_fhir_model_class("Bundle").parse_obj(bundle)


def resources(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def entry_by_url(bundle: dict[str, Any], full_url: str) -> dict[str, Any]:
    for e in bundle["entry"]:
        if e["fullUrl"] == full_url:
            return e
    raise KeyError(full_url)


def assert_golden(name: str, got: dict[str, Any]) -> None:
    """``got`` equals the golden file ``expected/<name>.json``; ``SLUICE_REGEN_GOLDEN=1`` rewrites it first (review
    the diff before committing)."""
    path = EXPECTED / f"{name}.json"
    if os.environ.get("SLUICE_REGEN_GOLDEN") == "1":
        path.write_text(
            json.dumps(got, indent=1, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8"
        )
    assert path.exists(), f"missing golden file {path.name}: run with SLUICE_REGEN_GOLDEN=1 and review it"
    assert json.loads(json.dumps(got)) == json.loads(path.read_text(encoding="utf-8"))
