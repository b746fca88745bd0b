"""The fhir-edits step (transforms/edits.py): declarative post-conversion edits selected with FHIRPath (issue #14)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.errors import ConfigError
from engine.pipeline import StageContext, Work
from engine.stages import build_pipeline
from tests.transforms.conftest import load, resources

SUMMARY = (
    "<p>Patient admitted with <b>synthetic</b> complaint.<br/>Discharged home &amp; well.</p>" + "x" * 3000
)


def ctx(tmp_path: Path) -> StageContext:
    return StageContext(channel="docs", base_dir=tmp_path, config_file=str(tmp_path / "channels/docs.yaml"))


def mdm_with_html() -> Any:
    text = load("mdm_t02").text.replace(
        "Patient admitted with synthetic complaint.", SUMMARY.replace("&", "\\T\\")
    )
    from engine.hl7 import parse

    return parse(text)


def run(tmp_path: Path, edits: list[dict[str, Any]], message: Any = None) -> tuple[dict[str, Any], Work]:
    steps = (
        {"hl7-to-fhir": {"derive_unknown_systems": True, "strip_html": False}},
        {"fhir-edits": {"edits": edits}},
    )
    pipe = build_pipeline(None, steps, ctx(tmp_path))
    msg = message if message is not None else mdm_with_html()
    out = pipe.run(Work(message=msg, raw=b"", payload=b"", content_type="x-application/hl7-v2+er7"))
    assert out is not None
    return orjson.loads(out.payload), out


def note(bundle: dict[str, Any]) -> str:
    (doc,) = resources(bundle, "DocumentReference")
    return base64.b64decode(doc["content"][0]["attachment"]["data"]).decode()


def test_discharge_summary_strip_html_and_truncate(tmp_path: Path) -> None:
    """The seed's "discharge_summary_note → strip HTML tags; truncate at 2,000 chars"."""
    before, _ = run(tmp_path, [{"select": "DocumentReference.id", "set": "x"}])  # (an unrelated edit)
    assert "<b>synthetic</b>" in note(before)
    bundle, out = run(
        tmp_path,
        [
            {
                "select": "DocumentReference.where(type.coding.code = 'DS').content.attachment.data",
                "strip-html": True,
                "truncate": 2000,
            }
        ],
    )
    text = note(bundle)
    assert text.startswith("Patient admitted with synthetic complaint.\nDischarged home & well.")
    assert "<" not in text and len(text) == 2000
    assert out.facts["events"]["edit_applied"] == 1  # one element changed
    # a selector that matches nothing changes nothing
    same, _ = run(
        tmp_path,
        [
            {
                "select": "DocumentReference.where(type.coding.code = 'OP').content.attachment.data",
                "truncate": 5,
            }
        ],
    )
    assert len(note(same)) > 2000


def test_remove_set_and_map(tmp_path: Path) -> None:
    (tmp_path / "doc-types.csv").write_text(
        "local_code,system,code,display\nDS,http://loinc.org,18842-5,Discharge summary\n"
    )
    bundle, _ = run(
        tmp_path,
        [
            {"select": "Patient.birthDate", "remove": True},
            {"select": "Patient.name.where(use = 'official').given", "set": "ANON"},
            {"select": "DocumentReference.type.coding", "map": "doc-types.csv"},
            {"select": "Patient.name.first().family", "map": "doc-types.csv"},  # no hit: kept
        ],
    )
    (patient,) = resources(bundle, "Patient")
    assert "birthDate" not in patient
    (doc,) = resources(bundle, "DocumentReference")
    assert doc["type"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "18842-5",
        "display": "Discharge summary",
    }
    assert patient["name"][0]["family"] == "TESTPERSON"


def test_remove_a_whole_repetition_and_an_emptied_list(tmp_path: Path) -> None:
    bundle, _ = run(tmp_path, [{"select": "Patient.identifier.where(system != 'x')", "remove": True}])
    (patient,) = resources(bundle, "Patient")
    assert "identifier" not in patient  # FHIR allows no empty array


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        pytest.param(
            {"select": "Patient.name.where(", "truncate": 3},
            "is not a valid FHIRPath expression",
            id="syntax",
        ),
        pytest.param(
            {"select": "Patient.name.count()", "remove": True}, "is not supported in an edit", id="function"
        ),
        pytest.param({"select": "Patient.name", "shout": True}, "unknown operation 'shout'", id="operation"),
        pytest.param({"select": "Patient.name", "truncate": "ten"}, "is not a length", id="truncate"),
        pytest.param({"select": "Observation.code.coding", "map": "nowhere.csv"}, "not found", id="map file"),
        pytest.param({"select": "Patient"}, "selects whole resources", id="whole resource"),
        pytest.param({"truncate": 3}, "'select' is missing", id="no select"),
    ],
)
def test_a_bad_edit_is_a_config_error_naming_channel_step_and_what(
    tmp_path: Path, edit: dict[str, Any], says: str
) -> None:
    with pytest.raises(ConfigError) as ei:
        build_pipeline(
            None,
            ({"fhir-edits": {"edits": [{"select": "Patient.gender", "set": "unknown"}, edit]}},),
            ctx(tmp_path),
        )
    text = str(ei.value)
    assert "channel 'docs'" in text and "step fhir-edits (transform[0])" in text and "edit 2" in text
    assert says in text
    assert "transform[0].fhir-edits.edits[1]" in text


def test_an_edited_bundle_keeps_long_decimals_digit_for_digit(tmp_path: Path) -> None:
    """A number past a float's digits is written back exactly when the edit changes the Bundle (issue #12)."""
    from engine.hl7 import parse

    long_value = "123456789012345678901234567890.50"
    msg = parse(
        "MSH|^~\\&|LAB|NORTH|EHR|HOSP|20250101120000||ORU^R01^ORU_R01|C1|P|2.5.1\r"
        "PID|1||MRN1^^^NORTH^MR||Doe^Jane||19800101|F\r"
        "OBR|1|PL1|FL1^LAB|2093-3^Cholesterol^LN|||20250101110000\r"
        f"OBX|1|NM|2093-3^Cholesterol^LN||{long_value}|mg/dL|||||F\r"
    )
    _, out = run(tmp_path, [{"select": "Patient.birthDate", "remove": True}], message=msg)
    assert out.facts["events"]["edit_applied"] == 1
    assert f'"value":{long_value},'.encode() in out.payload
