"""The fhir-edits step end to end (issue #14): a real engine process converts an MDM discharge summary and
delivers the Bundle with the analyst's edits applied; a bad selector stops `sluice check` naming the channel."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from click.testing import CliRunner

from engine.cli import main
from engine.client import MLLPClient, parse_ack
from tests.support.engine import EngineProcess, fhir_channel, free_port, write_config
from tests.support.polling import wait_for

SAMPLE = Path(__file__).resolve().parents[1] / "transforms" / "messages" / "mdm_t02.hl7"
HTML = "<p>Patient admitted with <b>synthetic</b> complaint.<br>Discharged home.</p>" + "y" * 2500

EDITS = [
    {
        "select": "DocumentReference.where(type.coding.code = 'DS').content.attachment.data",
        "strip-html": True,
        "truncate": 2000,
    },
    {"select": "Patient.birthDate", "remove": True},
]


def send(port: int, payload: bytes) -> str:
    import asyncio

    async def go() -> str:
        async with MLLPClient("127.0.0.1", port) as c:
            return parse_ack(await c.send(payload)).code

    return asyncio.run(go())


def test_edits_apply_in_the_engine(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "out"
    channel = fhir_channel(port, "out", types=("MDM",))
    channel["transform"] = [
        {"hl7-to-fhir": {"derive_unknown_systems": True, "strip_html": False}},
        {"fhir-edits": {"edits": EDITS}},
    ]
    cfg = write_config(
        tmp_path,
        channels={"docs": channel},
        destinations={
            "out": {"kind": "file", "directory": str(out), "pattern": "{control_id}.{ext}", "fsync": False}
        },
        processing={"workers": 1},  # the step runs in a worker process
    )
    raw = SAMPLE.read_bytes().replace(b"Patient admitted with synthetic complaint.", HTML.encode())
    with EngineProcess(cfg, port):
        assert send(port, raw) == "AA"
        path = wait_for(lambda: next(out.glob("MDM0001.*"), None), what="the delivered bundle")
    bundle = json.loads(Path(path).read_bytes())
    (doc,) = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DocumentReference"]
    text = base64.b64decode(doc["content"][0]["attachment"]["data"]).decode()
    assert text.startswith("Patient admitted with synthetic complaint.\nDischarged home.")
    assert "<" not in text and len(text) == 2000
    (patient,) = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert "birthDate" not in patient


def test_a_bad_selector_is_a_config_error_at_load(tmp_path: Path) -> None:
    channel = fhir_channel(free_port(), "out", types=("MDM",))
    channel["transform"] = [
        {"hl7-to-fhir": {}},
        {"fhir-edits": {"edits": [{"select": "Patient..name", "remove": True}]}},
    ]
    cfg = write_config(
        tmp_path,
        channels={"docs": channel},
        destinations={"out": {"kind": "file", "directory": str(tmp_path / "o")}},
    )
    res = CliRunner().invoke(main, ["check", "--config", str(cfg)])
    assert res.exit_code != 0
    assert "channel 'docs', step fhir-edits (transform[1]), edit 1" in res.output
    assert "is not a valid FHIRPath expression" in res.output
