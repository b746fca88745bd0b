"""The README's two-minute demo: the shipped channel (channels/allscripts.yaml) converts the shipped sample
ADT^A01 into a Bundle with the Patient, the Encounter and its attending Practitioner, linked together."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from engine.cli import main
from tests.support.engine import ROOT

SAMPLE = Path(__file__).parent / "samples" / "adt_a01.hl7"


def _demo_bundle(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.chdir(ROOT)  # the demo is run from the checkout: ./routes.yaml loads channels/allscripts.yaml
    res = CliRunner().invoke(main, ["convert", "--channel", "allscripts", str(SAMPLE)])
    assert res.exit_code == 0, res.output
    bundle: dict[str, Any] = json.loads(res.stdout)
    return bundle


def test_demo_bundle_has_patient_encounter_and_attending(monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = _demo_bundle(monkeypatch)
    by_type: dict[str, list[dict[str, Any]]] = {}
    full_url: dict[int, str] = {}
    for entry in bundle["entry"]:
        res = entry["resource"]
        by_type.setdefault(res["resourceType"], []).append(res)
        full_url[id(res)] = entry["fullUrl"]

    [patient] = by_type["Patient"]
    assert any(
        i.get("system") == "urn:sluice:authority:NORTHCLINIC" and i["value"] == "MRN100234"
        for i in patient["identifier"]
    )

    [encounter] = by_type["Encounter"]
    assert encounter["subject"] == {"reference": full_url[id(patient)]}
    assert encounter["status"] == "in-progress" and encounter["class"]["code"] == "IMP"
    assert [i["value"] for i in encounter["identifier"]] == ["V100234"]  # PV1-19 visit number
    assert encounter["period"] == {"start": "2025-03-14T08:25:00-07:00"}  # PV1-44, site zone Los Angeles
    assert encounter["location"], "PV1-3 → Encounter.location"

    [practitioner] = by_type["Practitioner"]
    assert practitioner["identifier"][0]["value"] == "1234567893"
    assert practitioner["name"][0]["family"] == "Carer"
    [attender] = [
        p for p in encounter["participant"] if p["type"][0]["coding"][0]["code"] == "ATND"
    ]  # PV1-7 attending doctor
    assert attender["individual"]["reference"] == full_url[id(practitioner)]
