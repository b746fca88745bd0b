"""Channel tests (engine/channeltest.py) and `sluice test`: the shipped suites pass, a broken expectation
fails with a readable diff and exit 1, --update writes goldens, a bad test file says what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli import main

ROOT = Path(__file__).resolve().parents[2]

A01 = (
    "MSH|^~\\&|EHR|CLINIC|SLUICE|HOSP|20250310083000||ADT^A01^ADT_A01|T-A01|P|2.5.1\n"
    "PID|1||MRN1^^^CLINIC^MR||Testperson^Alex||19800101|F\n"
    "PV1|1|I|4N^401^A^NORTH||||||||||||||||V1^^^CLINIC^VN|||||||||||||||||||||||||20250310082500\n"
)
A03 = (
    "MSH|^~\\&|EHR|CLINIC|SLUICE|HOSP|20250312110000||ADT^A03^ADT_A03|T-A03|P|2.5.1\n"
    "PID|1||MRN1^^^CLINIC^MR||Testperson^Alex||19800101|F\n"
    "PV1|1|I|4N^401^A^NORTH||||||||||||||||V1^^^CLINIC^VN|||||||||||||||||||||||||20250310082500|20250312104500\n"
)
S15 = (
    "MSH|^~\\&|EHR|CLINIC|SLUICE|HOSP|20250312110000||SIU^S15^SIU_S15|T-S15|P|2.5.1\n"
    "SCH|A1^CLINIC|A1^CLINIC|||||ROUTINE|FOLLOWUP|30|MIN|^^30^20250320093000^20250320100000|||||||||||||||Cancelled\n"
    "PID|1||MRN1^^^CLINIC^MR||Testperson^Alex||19800101|F\n"
)


def project(tmp_path: Path, channel_extra: str = "", tests: str = "") -> Path:
    (tmp_path / "channels").mkdir()
    (tmp_path / "routes.yaml").write_text(
        "store: sqlite:///var/t.db\nchannels: channels/*.yaml\n"
        "destinations:\n  out: {kind: file, directory: var/out}\n"
    )
    (tmp_path / "channels" / "clinic.yaml").write_text(
        "name: clinic\nsource: {port: 0}\naccept:\n  types: {ADT: [], SIU: []}\n"
        "transform:\n  - hl7-to-fhir: {derive_unknown_systems: true}\n"
        "routes:\n  - destination: out\n" + channel_extra
    )
    (tmp_path / "channels" / "a01.hl7").write_text(A01)
    (tmp_path / "channels" / "a03.hl7").write_text(A03)
    (tmp_path / "channels" / "clinic_test.yaml").write_text(tests)
    return tmp_path / "routes.yaml"


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["test", *args])
    return res.exit_code, res.output


def test_the_demo_channel_suite_passes() -> None:
    code, out = run("--config", str(ROOT / "routes.yaml"))
    assert code == 0, out
    for case in ("registration", "admit then discharge", "final result then corrected result",
                 "booked, rescheduled, cancelled", "booked then no-show"):  # fmt: skip
        assert f"ok   allscripts: {case}" in out
    assert "0 failed" in out


def test_a_lifecycle_checks_the_final_state(tmp_path: Path) -> None:
    cfg = project(
        tmp_path,
        tests="channel: clinic\ncases:\n  - name: admit, discharge\n    input: [a01.hl7, a03.hl7]\n"
        "    expect:\n      ack: AA\n      status: processed\n      fhir:\n"
        "        - \"Encounter.where(identifier.value = 'V1').status = 'finished'\"\n"
        '        - "Encounter.count() = 1"\n        - "Patient.count() = 1"\n',
    )
    code, out = run("--config", str(cfg))
    assert code == 0, out
    assert "1 passed, 0 failed" in out


def test_a_failing_case_says_which_case_which_message_expected_and_got(tmp_path: Path) -> None:
    cfg = project(
        tmp_path,
        tests="channel: clinic\ncases:\n  - name: admit only\n    input: [a01.hl7]\n"
        "    expect:\n      ack: AE\n      status: filtered\n      fhir:\n"
        "        - \"Encounter.status = 'finished'\"\n",
    )
    code, out = run("--config", str(cfg))
    assert code == 1
    assert "FAIL clinic: admit only" in out
    assert (
        "status of message 1 (a01.hl7#1)" in out
        and "expected: filtered" in out
        and "got:      processed" in out
    )
    assert "ack of message 1 (a01.hl7#1)" in out and "expected: AE" in out and "got:      AA" in out
    assert "fhir: Encounter.status = 'finished'" in out and "got:      [False]" in out
    assert "0 passed, 1 failed" in out


def test_inline_hl7_and_an_error_acknowledged_after_processing(tmp_path: Path) -> None:
    """ack: after-processing: the ACK reflects processing (here AE 204: a cancellation of an appointment
    never booked, with cancel_before_book: error), and nothing reaches the target."""
    cfg = project(
        tmp_path,
        tests="channel: clinic\ncases:\n  - name: cancel before book\n    hl7: |\n"
        + "".join(f"      {line}\n" for line in S15.splitlines())
        + "    expect:\n      ack: AE\n      status: error\n      fhir: ['Appointment.empty()']\n",
    )
    path = tmp_path / "channels" / "clinic.yaml"
    path.write_text(
        path.read_text()
        .replace("derive_unknown_systems: true}", "derive_unknown_systems: true, cancel_before_book: error}")
        .replace("name: clinic\n", "name: clinic\nack: after-processing\n")
    )
    code, out = run("--config", str(cfg), "-v")
    assert code == 0, out
    assert "error, ACK AE: 204" in out


def test_update_writes_the_golden_then_a_change_shows_as_a_diff(tmp_path: Path) -> None:
    cfg = project(
        tmp_path,
        tests="channel: clinic\ncases:\n  - name: admit\n    input: [a01.hl7]\n"
        "    expect:\n      golden: expected/admit.json\n",
    )
    code, out = run("--config", str(cfg))
    assert code == 1 and "does not exist (run `sluice test --update` to write it)" in out
    code, out = run("--config", str(cfg), "--update")
    assert code == 0 and "(golden updated)" in out and "1 golden file(s) written" in out
    golden = tmp_path / "channels" / "expected" / "admit.json"
    assert '"Encounter"' in golden.read_text()
    assert run("--config", str(cfg))[0] == 0
    golden.write_text(golden.read_text().replace('"in-progress"', '"planned"'))
    code, out = run("--config", str(cfg))
    assert code == 1
    assert '-      "status": "planned",' in out and '+      "status": "in-progress",' in out


@pytest.mark.parametrize(
    ("tests", "message"),
    [
        pytest.param("channel: clinic\ncases:\n  - name: x\n    input: [nope.hl7]\n", "file 'nope.hl7' not found",
                     id="missing-input"),
        pytest.param("channel: clinic\ncases:\n  - name: x\n    input: [a01.hl7]\n    expect: {acks: AA}\n",
                     "cases[0].expect.acks", id="unknown-key"),
        pytest.param("channel: clinic\ncases:\n  - name: x\n    input: [a01.hl7]\n    expect: {status: done}\n",
                     "unknown status 'done'", id="bad-status"),
        pytest.param("channel: clinic\ncases:\n  - name: x\n    input: [a01.hl7]\n    expect: {ack: [AA, AA]}\n",
                     "2 codes for 1 messages", id="ack-count"),
        pytest.param("channel: other\ncases:\n  - name: x\n    input: [a01.hl7]\n",
                     "write `channel: clinic`", id="wrong-channel"),
    ],
)  # fmt: skip
def test_a_bad_test_file_says_what_to_fix(tmp_path: Path, tests: str, message: str) -> None:
    code, out = run("--config", str(project(tmp_path, tests=tests)))
    assert code == 1
    assert message in out and "clinic_test.yaml" in out


def test_a_named_channel_without_tests_is_an_error(tmp_path: Path) -> None:
    cfg = project(tmp_path, tests="channel: clinic\ncases:\n  - name: x\n    input: [a01.hl7]\n")
    (tmp_path / "channels" / "clinic_test.yaml").unlink()
    code, out = run("--config", str(cfg), "clinic")
    assert code == 1 and "has no test file" in out
    code, out = run("--config", str(cfg), "nosuch")
    assert code == 1 and "no channel named 'nosuch'" in out


def test_the_example_channels_pass_their_tests_and_check() -> None:
    """examples/: three channels the demo config does not load (docs/testing-channels.md)."""
    code, out = run("--config", str(ROOT / "examples" / "routes.yaml"))
    assert code == 0, out
    for channel in ("allscripts-adt", "lab-results", "scheduling"):
        assert f"ok   {channel}: " in out
    res = CliRunner().invoke(main, ["check", "--config", str(ROOT / "examples" / "routes.yaml")])
    assert res.exit_code == 0, res.output
