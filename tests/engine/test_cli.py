"""`sluice convert` and `sluice check` against real configs (convert: compared with what the engine delivers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from engine.cli import main
from tests.support.engine import ROOT, EngineProcess, basic_channel, free_port, write_config
from tests.support.polling import wait_for

SAMPLES = Path(__file__).parent / "samples"
PLUGINS = ROOT / "tests" / "support" / "plugins"

# A step of the user's own, after hl7-to-fhir: convert must run every step, not only the converter.
STAMP_STEP = """
import dataclasses

import orjson


def stamp(work):
    bundle = orjson.loads(work.payload)
    bundle["meta"] = {"tag": [{"system": "urn:example:site", "code": "north"}]}
    return dataclasses.replace(work, payload=orjson.dumps(bundle))
"""


def chicago_channel(port: int) -> dict[str, Any]:
    """Non-default settings everywhere convert used to ignore: the channel's site_tz (the step gives
    none), identifier systems, an inline code map, no Provenance, a user step, a route filter."""
    return {
        "source": {"host": "127.0.0.1", "port": port},
        "accept": {"types": {"ADT": "*", "ORU": "*"}},
        "site_tz": "America/Chicago",
        "transform": [
            {
                "hl7-to-fhir": {
                    "identifier_systems": {"NORTHCLINIC": "urn:oid:2.16.840.1.113883.3.999.1"},
                    "code_maps": {
                        "OBX-3": {
                            "2093-3": {"system": "urn:example:lab", "code": "CHOL", "display": "Cholesterol"}
                        }
                    },
                    "provenance": False,
                }
            },
            "convert_test_stamp:stamp",
        ],
        "routes": [{"destination": "out", "filter": {"field": "MSH-9.1", "in": ["ADT", "ORU"]}}],
    }


def test_convert_channel_prints_exactly_what_the_engine_delivers(tmp_path: Path) -> None:
    port, other_port = free_port(), free_port()
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path,
        channels={
            # the first channel (the default of convert) is a plain one: --channel must pick the other
            "a-plain": basic_channel(other_port),
            "b-chicago": chicago_channel(port),
        },
        destinations={
            "out": {"kind": "file", "directory": str(out), "pattern": "{control_id}.{ext}", "fsync": False}
        },
        processing={"workers": 1},  # the engine converts in a worker process
    )
    (tmp_path / "transforms").mkdir()
    (tmp_path / "transforms" / "convert_test_stamp.py").write_text(STAMP_STEP)
    samples = [str(SAMPLES / "adt_a01.hl7"), str(SAMPLES / "oru_r01.hl7")]
    with EngineProcess(cfg, port):
        res = CliRunner().invoke(main, ["send", *samples, "--to", f"127.0.0.1:{port}"])
        assert res.exit_code == 0, res.output
        delivered = [out / "DEMO0001.json", out / "DEMO0002.json"]
        wait_for(lambda: all(p.exists() for p in delivered), what="the engine's delivered bundles")
    engine_bytes = [p.read_bytes() for p in delivered]

    res = CliRunner().invoke(main, ["convert", *samples, "--config", str(cfg), "--channel", "b-chicago"])
    assert res.exit_code == 0, res.output
    assert res.stdout_bytes.splitlines() == engine_bytes

    text = res.stdout
    # March 2025 after the DST change: Chicago is -05:00; the old convert printed Los Angeles (-07:00)
    assert '"issued":"2025-03-14T10:10:00-05:00"' in text and "-07:00" not in text
    assert "urn:oid:2.16.840.1.113883.3.999.1" in text and '"code":"CHOL"' in text
    assert '"Provenance"' not in text and "urn:example:site" in text

    pretty = CliRunner().invoke(
        main, ["convert", samples[0], "--config", str(cfg), "--channel", "b-chicago", "--pretty"]
    )
    assert pretty.exit_code == 0, pretty.output
    assert json.loads(pretty.stdout) == json.loads(engine_bytes[0]) and '\n  "entry": [' in pretty.stdout


def test_convert_reports_what_the_channel_would_not_deliver(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        channels={
            "labs": {
                **basic_channel(free_port()),
                "accept": {"types": {"ORU": ["R01"]}},
                "filter": {"field": "OBX-3.1", "equals": "no-such-code"},
            },
            "adt": {**basic_channel(free_port()), "require": ["PID-18"]},
        },
        destinations={"out": {"kind": "file", "directory": str(tmp_path / "out")}},
    )
    base = ["convert", "--config", str(cfg)]
    rejected = CliRunner().invoke(main, [*base, "--channel", "labs", str(SAMPLES / "adt_a01.hl7")])
    assert rejected.exit_code == 1 and rejected.stdout == ""
    assert "rejected: the channel answers AR 200: message type ADT is not accepted" in rejected.stderr

    filtered = CliRunner().invoke(main, [*base, "--channel", "labs", str(SAMPLES / "oru_r01.hl7")])
    assert filtered.exit_code == 0 and filtered.stdout == ""
    assert "filtered: filtered by the channel filter; nothing is delivered" in filtered.stderr

    missing = CliRunner().invoke(main, [*base, "--channel", "adt", str(SAMPLES / "adt_a01.hl7")])
    assert missing.exit_code == 1 and missing.stdout == ""
    assert "error: the channel answers AE 101: required field PID-18 is missing" in missing.stderr

    # the passthrough channel delivers the HL7 as received; --pretty prints a segment a line
    raw = (SAMPLES / "adt_a01.hl7").read_bytes()
    passed = CliRunner().invoke(
        main,
        [
            "convert",
            "--config",
            str(write_passthrough(tmp_path / "p")),
            "--pretty",
            str(SAMPLES / "adt_a01.hl7"),
        ],
    )
    assert passed.exit_code == 0, passed.output
    assert passed.stdout_bytes == raw.replace(b"\r", b"\n").rstrip(b"\n") + b"\n"

    unknown = CliRunner().invoke(main, [*base, "--channel", "nope", str(SAMPLES / "adt_a01.hl7")])
    assert unknown.exit_code == 1 and "no channel named 'nope'" in unknown.output


def write_passthrough(directory: Path) -> Path:
    return write_config(
        directory,
        channels={"p": basic_channel(free_port())},
        destinations={"out": {"kind": "file", "directory": str(directory / "out")}},
    )


def test_convert_without_a_config_uses_the_plain_converter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no routes.yaml here
    res = CliRunner().invoke(main, ["convert", str(SAMPLES / "adt_a01.hl7")])
    assert res.exit_code == 0, res.output
    bundle = json.loads(res.stdout)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    assert '"recorded":"2025-03-14T08:30:00-07:00"' in res.stdout  # the default zone, Los Angeles
    # asking for a channel without a config is an error, not a silent default
    res = CliRunner().invoke(main, ["convert", "--channel", "x", str(SAMPLES / "adt_a01.hl7")])
    assert res.exit_code == 1 and "config file not found" in res.output


def test_convert_splits_an_fhs_bhs_batch_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #14: `sluice convert` takes the FHS/BHS batch files `sluice conformance` takes, with or without a
    channel (the channel's intake splits it, as the engine does), one Bundle a message."""
    one = (SAMPLES / "adt_a01.hl7").read_bytes().replace(b"\n", b"\r").rstrip(b"\r")
    two = one.replace(b"DEMO0001", b"DEMO0002")
    batch = tmp_path / "batch.hl7"
    batch.write_bytes(b"FHS|^~\\&|EHR|NORTH\rBHS|^~\\&|EHR|NORTH\r" + one + b"\r" + two + b"\rBTS|2\rFTS|1\r")
    monkeypatch.chdir(tmp_path)  # no routes.yaml: the plain converter
    res = CliRunner().invoke(main, ["convert", str(batch)])
    assert res.exit_code == 0, res.output
    bundles = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(bundles) == 2 and all(b["type"] == "transaction" for b in bundles)
    cfg = write_config(
        tmp_path,
        channels={
            "c": {
                **basic_channel(free_port()),
                "transform": [{"hl7-to-fhir": {"derive_unknown_systems": True}}],
            }
        },
        destinations={"out": {"kind": "file", "directory": str(tmp_path / "o")}},
    )
    res = CliRunner().invoke(main, ["convert", "--config", str(cfg), str(batch)])
    assert res.exit_code == 0, res.output
    assert [json.loads(line) for line in res.stdout.splitlines()] == bundles


def test_convert_says_what_it_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #14: a value left out under strictness lenient is said on stderr, located, without the value."""
    bad = tmp_path / "bad.hl7"
    bad.write_bytes((SAMPLES / "adt_a01.hl7").read_bytes().replace(b"19760412", b"19761341"))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["convert", str(bad)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["type"] == "transaction"
    assert "warning: PID-7: is not a valid HL7 date/time" in res.stderr and "[field_dropped]" in res.stderr
    assert "19761341" not in res.stderr


def test_convert_reads_ascii_under_an_unknown_msh18_as_the_engine_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An MSH-18 Sluice does not know on ASCII bytes: converted, with the charset_unknown warning on stderr, with a
    channel (its intake, as the engine) and without; bytes outside ASCII under it stay AE 103."""
    sample = (SAMPLES / "adt_a01.hl7").read_bytes()
    ascii_msg = tmp_path / "junk-msh18.hl7"
    ascii_msg.write_bytes(sample.replace(b"|P|2.5.1\r", b"|P|2.5.1||||||Quorthvexil\r", 1))
    latin = tmp_path / "junk-msh18-latin1.hl7"
    latin.write_bytes(ascii_msg.read_bytes().replace(b"Sampleton", "Sämpleton".encode("latin-1")))
    assert b"Quorthvexil" in ascii_msg.read_bytes() and b"\xe4" in latin.read_bytes()
    want = "MSH-18: the message declares a character set Sluice does not decode (invalid (11 characters))"
    monkeypatch.chdir(tmp_path)  # no routes.yaml: the plain converter
    cfg = write_config(
        tmp_path / "c",
        channels={
            "c": {
                **basic_channel(free_port()),
                "transform": [{"hl7-to-fhir": {"derive_unknown_systems": True}}],
            }
        },
        destinations={"out": {"kind": "file", "directory": str(tmp_path / "out")}},
    )
    for args in ([], ["--config", str(cfg)]):
        res = CliRunner().invoke(main, ["convert", *args, str(ascii_msg)])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["type"] == "transaction"
        assert f"warning: {want}" in res.stderr and "[charset_unknown]" in res.stderr
        assert "QUORTHVEXIL" not in res.stderr.upper()
        res = CliRunner().invoke(main, ["convert", *args, str(latin)])
        assert res.exit_code == 1 and res.stdout == ""
        assert (
            "103" in res.stderr
            and "unsupported character set in MSH-18: invalid (11 characters)" in res.stderr
        )
        assert "QUORTHVEXIL" not in res.stderr.upper()


def test_check_loads_plugins(tmp_path: Path) -> None:
    """A destination kind from a plugin is known to `check`, as it is to `run`."""
    cfg = write_config(
        tmp_path,
        channels={"c": basic_channel(free_port())},
        destinations={"out": {"kind": "recorder", "log": str(tmp_path / "log.txt")}},
    )
    cfg.write_text(cfg.read_text() + f"plugin_paths: [{PLUGINS}]\nplugins: [sluice_test_recorder]\n")
    res = CliRunner().invoke(main, ["check", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "destination out: recorder" in res.output


def test_check_accepts_mllp_rate_limit(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        channels={"c": basic_channel(free_port())},
        destinations={
            "out": {"kind": "mllp", "host": "127.0.0.1", "port": 1, "rate_limit": 5, "concurrency": 2}
        },
    )
    res = CliRunner().invoke(main, ["check", "--config", str(cfg)])
    assert res.exit_code == 0, res.output


def test_convert_reports_a_failure_once_without_engine_log_lines(tmp_path: Path) -> None:
    bad = tmp_path / "bad.hl7"
    bad.write_bytes(
        b"MSH|^~\\&|ALLSCRIPTS|NORTHCLINIC|SLUICE|HOSP|20250314083000||ADT^A01^ADT_A01|BAD1|P|2.5.1\r"
        b"EVN|A01|20250314083000\rPID|1||^^^NORTHCLINIC^MR||Sampleton^Jordan\rPV1|1|I\r"
    )
    res = CliRunner().invoke(main, ["convert", str(bad), "--config", str(ROOT / "routes.yaml")])
    assert res.exit_code == 1
    assert f"{bad}#1: error 101: PID-3" in res.output
    assert "processing_failed" not in res.output  # the analyst sees the reason, not a log line beside it


# --------------------------------------------------------------------------- check: every error at once


def _check(cfg: Path) -> Any:
    return CliRunner().invoke(main, ["check", "--config", str(cfg)])


def test_check_reports_the_errors_of_two_broken_channel_files(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        channels={
            "a": basic_channel(free_port(), transform=["no-such-step"]),
            "b": basic_channel(free_port(), routes=[{"destination": "nowhere"}]),
        },
        destinations={"out": {"kind": "file", "directory": str(tmp_path / "out")}},
    )
    res = _check(cfg)
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("config error: ")]
    assert lines == [
        f"config error: {tmp_path / 'channels' / 'a.yaml'}: transform[0]: unknown transform step 'no-such-step' "
        "(built-in steps: fhir-edits, fhir-to-hl7, hl7-to-fhir, hl7-to-json, passthrough)",
        f"config error: {tmp_path / 'channels' / 'b.yaml'}: routes[0].destination: unknown destination 'nowhere' "
        "(define it under destinations: in routes.yaml (known: out))",
    ]
    assert "Error: 2 errors in 2 files" in res.output
    assert "ok:" not in res.output


def test_check_with_one_broken_and_one_good_channel_reports_one_error(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        channels={
            "good": basic_channel(free_port()),
            "bad": basic_channel(free_port(), dedupe={"window_dayz": 3}),
        },
        destinations={"out": {"kind": "file", "directory": str(tmp_path / "out")}},
    )
    res = _check(cfg)
    assert res.exit_code != 0
    errors = [line for line in res.output.splitlines() if line.startswith("config error: ")]
    assert len(errors) == 1 and "bad.yaml: dedupe.window_dayz: unknown key 'window_dayz'" in errors[0]
    assert "Error: 1 error in 1 file" in res.output


def test_check_reports_each_section_and_step_of_one_file(tmp_path: Path) -> None:
    """Source, a route and two transform steps of one file are independent: each error is its own line;
    a channel file that is not YAML is one error of its own and the others are still checked."""
    ch = basic_channel(
        99999,
        site_tz="Mars/Olympus_Mons",
        transform=["no-such-step", {"hl7-to-fhir": {"unmapped_codes": "explode"}}],
        routes=[{"destination": "out", "filter": {"fieldd": "MSH-9.1"}}],
    )
    cfg = write_config(
        tmp_path,
        channels={"lab": ch, "adt": basic_channel(free_port())},
        destinations={"out": {"kind": "file", "directory": str(tmp_path / "out")}},
    )
    (tmp_path / "channels" / "broken.yaml").write_text("name: broken\nsource: [\n")
    res = _check(cfg)
    assert res.exit_code == 1
    errors = [line for line in res.output.splitlines() if line.startswith("config error: ")]
    lab = [e for e in errors if "lab.yaml" in e]
    assert [e.split(": ")[2] for e in lab] == [
        "source.port",
        "site_tz",
        "transform[0]",
        "transform[1].hl7-to-fhir.unmapped_codes",
        "routes[0].filter",
    ], errors
    assert any("broken.yaml: invalid YAML at line 3" in e for e in errors)
    assert not any("adt.yaml" in e for e in errors)
    assert "Error: 6 errors in 2 files" in res.output


def test_run_still_stops_at_the_first_error(tmp_path: Path) -> None:
    from engine import config
    from engine.errors import ConfigError

    cfg = write_config(
        tmp_path,
        channels={
            "a": basic_channel(free_port(), transform=["no-such-step"], dedupe={"window_dayz": 3}),
            "b": basic_channel(free_port(), routes=[{"destination": "nowhere"}]),
        },
        destinations={"out": {"kind": "file", "directory": str(tmp_path / "out")}},
    )
    with pytest.raises(ConfigError, match="window_dayz"):
        config.load(cfg)
    res = CliRunner().invoke(main, ["run", "--config", str(cfg)])
    assert res.exit_code == 1 and "config error:" in res.output and "window_dayz" in res.output
    assert "nowhere" not in res.output


def test_check_reports_a_broken_destination_once_and_still_checks_the_channels(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        channels={"a": basic_channel(free_port()), "b": basic_channel(free_port(), batch="maybe")},
        destinations={"out": {"kind": "file", "directory": str(tmp_path / "out"), "lanes": "many"}},
    )
    res = _check(cfg)
    assert res.exit_code == 1
    errors = [line for line in res.output.splitlines() if line.startswith("config error: ")]
    assert len(errors) == 2, errors
    assert f"{cfg}: destinations.out.lanes: expected a whole number, got 'many'" in errors[0]
    assert "b.yaml: batch: 'maybe' is not allowed" in errors[1]  # a's route to `out` is not reported again
    assert "Error: 2 errors in 2 files" in res.output
