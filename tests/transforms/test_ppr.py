"""PPR^PC1-PC3 → Condition (problem list) and Goal: golden files, one resource per problem through its
lifecycle (added, resolved, deleted), located errors (synthetic data)."""

from __future__ import annotations

from typing import Any

import pytest

from engine.errors import ConversionError, MessageRejected
from tests.transforms.conftest import (
    assert_golden,
    golden_settings,
    load,
    msg,
    resources,
    validate_resources,
)
from transforms.convert import _convert

PROBLEM = "Condition?identifier=urn:oid:2.16.840.1.113883.19.10|PRB-1001"
GOAL = "Goal?identifier=urn:oid:2.16.840.1.113883.19.11|GOL-2001"
MSH = "MSH|^~\\&|SYNEHR|SYNTH CLINIC|SLUICE|SLUICE|20250401103000||PPR^{}|C1|P|2.5.1"
PID = "PID|1||MRN900001^^^HOSP^MR||TESTPERSON^ALEXANDRA||19700115|F"


@pytest.mark.parametrize("name", ["ppr_pc1", "ppr_pc2", "ppr_pc3"])
def test_golden(name: str) -> None:
    result = _convert(load(name), golden_settings())
    validate_resources(result.bundle)
    got = {
        "bundle": result.bundle,
        "guards": [list(g) for g in result.guards],
        "events": dict(result.events),
        "warnings": list(result.warnings),
    }
    assert_golden(name, got)


def _by_url(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["request"]["url"]: e for e in bundle["entry"] if e["request"]["method"] == "PUT"}


def _status(res: dict[str, Any], element: str) -> str | None:
    concept = res.get(element)
    return concept["coding"][0]["code"] if concept else None


def test_lifecycle_writes_the_same_condition_and_goal() -> None:
    added, resolved, deleted = (
        _convert(load(n), golden_settings()) for n in ("ppr_pc1", "ppr_pc2", "ppr_pc3")
    )
    for r in (added, resolved, deleted):
        assert PROBLEM in _by_url(r.bundle)
    cond = _by_url(added.bundle)[PROBLEM]["resource"]
    assert _status(cond, "clinicalStatus") == "active" and _status(cond, "verificationStatus") == "confirmed"
    assert cond["category"][0]["coding"][0]["code"] == "problem-list-item"
    assert cond["onsetDateTime"] == "2024-09-01" and cond["note"][0]["text"] == "Diet counselling started."
    goal = _by_url(added.bundle)[GOAL]
    assert goal["resource"]["addresses"] == [{"reference": _by_url(added.bundle)[PROBLEM]["fullUrl"]}]
    assert goal["resource"]["lifecycleStatus"] == "active"
    assert goal["resource"]["target"] == [{"dueDate": "2025-10-01"}]
    cond = _by_url(resolved.bundle)[PROBLEM]["resource"]
    assert _status(cond, "clinicalStatus") == "resolved" and cond["abatementDateTime"].startswith(
        "2025-09-01"
    )
    cond = _by_url(deleted.bundle)[PROBLEM]["resource"]
    assert _status(cond, "verificationStatus") == "entered-in-error" and "clinicalStatus" not in cond
    assert _by_url(deleted.bundle)[GOAL]["resource"]["lifecycleStatus"] == "entered-in-error"
    # a deletion outranks the add: a late resend of PC1 goes to review instead of resurrecting the problem
    assert dict(deleted.guards)[PROBLEM] > dict(added.guards)[PROBLEM]


def test_the_patient_is_a_conditional_create() -> None:
    b = _convert(load("ppr_pc1"), golden_settings()).bundle
    (patient,) = [e for e in b["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert patient["request"]["method"] == "POST"


def test_problem_without_instance_id_is_keyed_by_patient_and_code() -> None:
    one = _convert(msg(MSH.format("PC1"), PID, "PRB|AD|20250401|44054006^Diabetes^SCT"), golden_settings())
    two = _convert(msg(MSH.format("PC3"), PID, "PRB|DE|20250402|44054006^Diabetes^SCT"), golden_settings())
    assert one.events["problem_fallback_key"] == 1
    assert [e["request"]["url"] for e in resources_entries(one.bundle)] == [
        e["request"]["url"] for e in resources_entries(two.bundle)
    ]


def resources_entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Condition"]


def test_bad_optional_date_is_dropped_with_a_located_warning() -> None:
    r = _convert(
        msg(MSH.format("PC1"), PID, "PRB|AD|20060315076|44054006^Diabetes^SCT|P1"), golden_settings()
    )
    (cond,) = resources(r.bundle, "Condition")
    assert "recordedDate" not in cond
    assert r.warnings and r.warnings[0].startswith("PRB-2")


def test_located_errors() -> None:
    with pytest.raises(ConversionError) as ei:
        _convert(msg(MSH.format("PC1"), PID, "PRB|AD|20250401||P1"), golden_settings())
    assert ei.value.hl7_error == "101" and str(ei.value.location) == "PRB-3"
    with pytest.raises(ConversionError) as ei:
        _convert(msg(MSH.format("PC1"), PID), golden_settings())
    assert ei.value.location is not None
    with pytest.raises(MessageRejected) as er:
        _convert(msg(MSH.format("PC4"), PID), golden_settings())
    assert er.value.hl7_error == "201"
