"""`sluice generate` (engine/synthetic.py): deterministic, valid for the converter, the patients asked for."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from engine import synthetic
from engine.cli import main, split_messages
from engine.hl7 import parse
from transforms.convert import convert_report
from transforms.settings import ConvertSettings


@pytest.mark.parametrize("message_type", synthetic.supported())
def test_every_type_converts_without_warnings_and_validates(message_type: str) -> None:
    settings = ConvertSettings(
        derive_unknown_systems=True, validate=True
    )  # fhir.resources checks each resource
    for text in synthetic.generate(message_type, 3, patients=2, seed=5):
        msg = parse(text)
        assert f"{msg.message_type}^{msg.trigger}" == message_type
        report = convert_report(msg, settings)
        assert report.warnings == ()
        assert report.bundle["entry"]


def test_same_seed_same_bytes_other_seed_other_people() -> None:
    a = list(synthetic.generate("ADT^A01", 20, seed=7))
    assert a == list(synthetic.generate("ADT^A01", 20, seed=7))
    assert a != list(synthetic.generate("ADT^A01", 20, seed=8))
    assert len({parse(m).control_id for m in a}) == 20


def test_patients_bounds_the_distinct_mrns() -> None:
    msgs = [parse(m) for m in synthetic.generate("ORU^R01", 30, patients=4)]
    assert len({m["PID-3.1"] for m in msgs}) == 4
    assert len({m["PID-3.1"] for m in (parse(x) for x in synthetic.generate("ORU^R01", 30))}) == 30


def test_cli_writes_a_file_sluice_reads(tmp_path: Path) -> None:
    out = tmp_path / "s12.hl7"
    res = CliRunner().invoke(
        main, ["generate", "--type", "SIU^S12", "--count", "5", "--seed", "2", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert len(split_messages(out.read_bytes())) == 5
    stdout = CliRunner().invoke(main, ["generate", "--type", "siu^s12", "--count", "5", "--seed", "2"]).output
    assert stdout.replace("\n", "\r").encode() == out.read_bytes()


def test_an_unsupported_type_lists_the_supported_ones() -> None:
    res = CliRunner().invoke(main, ["generate", "--type", "ORM^O01"])
    assert res.exit_code == 2
    assert "cannot generate 'ORM^O01'" in res.output and "ADT^A01" in res.output


def test_generated_messages_are_accepted_and_processed_by_a_running_engine(tmp_path: Path) -> None:
    """Real sockets and store: generated ADT, ORU and SIU sent with `sluice send`, every one AA and processed."""
    from engine import store as st
    from tests.support.engine import EngineProcess, fhir_channel, free_port, write_config
    from tests.support.polling import wait_for

    port = free_port()
    cfg = write_config(
        tmp_path,
        channels={"c": fhir_channel(port, "out", types=("ADT", "ORU", "SIU"))},
        destinations={"out": {"kind": "file", "directory": str(tmp_path / "out"), "fsync": False}},
    )
    files = []
    for n, t in enumerate(("ADT^A01", "ADT^A03", "ORU^R01", "SIU^S12", "SIU^S26")):
        f = tmp_path / f"m{n}.hl7"
        res = CliRunner().invoke(
            main, ["generate", "--type", t, "--count", "4", "--patients", "2", "--out", str(f)]
        )
        assert res.exit_code == 0, res.output
        files.append(str(f))
    with EngineProcess(cfg, port):
        res = CliRunner().invoke(main, ["send", *files, "--to", f"127.0.0.1:{port}"])
        assert res.exit_code == 0, res.output
        assert res.output.count("\tAA\t") == 20
        s = st.Store(f"sqlite:///{tmp_path}/sluice.db")
        try:
            wait_for(
                lambda: sorted({m.status for m in s.list_messages(limit=100)}) == [st.PROCESSED],
                what="every generated message processed",
            )
            assert len(s.list_messages(limit=100)) == 20
        finally:
            s.close()
