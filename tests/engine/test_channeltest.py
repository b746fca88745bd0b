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


def test_a_test_file_named_after_no_channel_fails_instead_of_never_running(tmp_path: Path) -> None:
    tests = "channel: clinic\ncases:\n  - name: x\n    input: [a01.hl7]\n"
    cfg = project(tmp_path, tests=tests)
    (tmp_path / "channels" / "first_test.yaml").write_text(tests)
    code, out = run("--config", str(cfg))
    assert code == 1
    assert "first_test.yaml: is no channel's test file, so its cases never run" in out
    assert "rename it, or move its cases into the channel's test file (clinic_test.yaml)" in out
    assert "ok   clinic: x" in out and "1 passed, 1 failed" in out
    assert run("--config", str(cfg), "clinic")[0] == 0  # a named channel runs its own file only
    (tmp_path / "channels" / "clinic_test.yaml").unlink()
    code, out = run("--config", str(cfg))
    assert code == 1 and "has a test file" in out and "first_test.yaml: is no channel's test file" in out


def test_the_example_channels_pass_their_tests_and_check() -> None:
    """examples/: three channels the demo config does not load (docs/testing-channels.md)."""
    code, out = run("--config", str(ROOT / "examples" / "routes.yaml"))
    assert code == 0, out
    for channel in ("allscripts-adt", "lab-results", "scheduling"):
        assert f"ok   {channel}: " in out
    res = CliRunner().invoke(main, ["check", "--config", str(ROOT / "examples" / "routes.yaml")])
    assert res.exit_code == 0, res.output


# ----------------------------------------------------------------------------- write-back channels
APPT = """\
{"resourceType": "Appointment", "id": "a1", "meta": {"versionId": "%s"}, "status": "%s",
 "identifier": [{"system": "urn:portal:appointment", "value": "PA-7"}],
 "start": "%s", "end": "2026-12-10T18:00:00Z",
 "participant": [{"actor": {"reference": "Patient/p1", "display": "Testperson, Alex"}}]}
"""


def writeback_project(
    tmp_path: Path, tests: str, source: str = "{kind: http, host: 127.0.0.1, port: 18443}"
) -> Path:
    """A write-back channel (FHIR in, SIU out to an MLLP destination never contacted) with three Appointment
    versions as files: booked (v1), moved (v2), cancelled (v3)."""
    (tmp_path / "channels" / "fhir").mkdir(parents=True)
    (tmp_path / "routes.yaml").write_text(
        "store: sqlite:///var/t.db\nchannels: channels/*.yaml\n"
        "destinations:\n  ehr: {kind: mllp, host: 127.0.0.1, port: 9, payload: output}\n"
    )
    (tmp_path / "channels" / "portal.yaml").write_text(
        f"name: portal\nsource: {source}\n"
        "transform:\n  - fhir-to-hl7: {sending_facility: PORTAL, placer_system: 'urn:portal:appointment'}\n"
        "routes:\n  - destination: ehr\n"
    )
    fhir = tmp_path / "channels" / "fhir"
    (fhir / "booked.json").write_text(APPT % ("1", "booked", "2026-12-10T17:30:00Z"))
    (fhir / "moved.json").write_text(APPT % ("2", "booked", "2026-12-10T17:00:00Z"))
    (fhir / "cancelled.yaml").write_text(
        "resourceType: Bundle\ntype: collection\nentry:\n  - resource:\n"
        + "".join(f"      {line}\n" for line in _yaml_of(APPT % ("3", "cancelled", "2026-12-10T17:00:00Z")))
    )
    (tmp_path / "channels" / "portal_test.yaml").write_text(tests)
    return tmp_path / "routes.yaml"


def _yaml_of(text: str) -> list[str]:
    import json

    import yaml

    return yaml.safe_dump(json.loads(text), sort_keys=False).splitlines()


LIFECYCLE = """\
channel: portal
cases:
  - name: lifecycle
    input: [fhir/booked.json, fhir/moved.json, fhir/cancelled.yaml]
    expect:
      status: processed
      hl7:
        - {MSH-9: SIU^S12, SCH-1: PA-7, TQ1-7: 20261210093000-0800}
        - SIU^S13
        - {MSH-9: SIU^S15^SIU_S12, SCH-25: CANCELLED}
      golden: expected/lifecycle.hl7
"""


def test_a_write_back_case_feeds_resources_and_checks_the_hl7_sent(tmp_path: Path) -> None:
    cfg = writeback_project(tmp_path, LIFECYCLE)
    code, out = run("--config", str(cfg), "--update", "-v")
    assert code == 0, out
    assert "message 1 fhir/booked.json: processed, sent SIU^S12" in out
    assert "message 3 fhir/cancelled.yaml: processed, sent SIU^S15" in out
    golden = tmp_path / "channels" / "expected" / "lifecycle.hl7"
    text = golden.read_text()
    # every message sent, MSH-7 and MSH-10 masked, one blank line between messages
    assert text.count("MSH|^~\\&|SLUICE|PORTAL|||*||SIU^") == 3 and "|*|P|2.5.1" in text
    assert [m.split("\n")[0].split("|")[8] for m in text.strip().split("\n\n")] == [
        "SIU^S12^SIU_S12", "SIU^S13^SIU_S12", "SIU^S15^SIU_S12",
    ]  # fmt: skip
    assert run("--config", str(cfg))[0] == 0
    golden.write_text(text.replace("RGS|1|D", "RGS|1|A"))
    code, out = run("--config", str(cfg))
    assert code == 1 and "golden: the HL7 sent differs" in out and "+RGS|1|D" in out


def test_what_was_sent_and_what_was_not_fail_readably(tmp_path: Path) -> None:
    tests = """\
channel: portal
cases:
  - name: wrong expectations
    input: [fhir/booked.json, fhir/booked.json, fhir/moved.json]
    fhir:
      - {resourceType: Appointment, id: a2, status: cancelled, identifier: [{system: "urn:portal:appointment", value: PA-8}]}
    expect:
      status: [processed, processed, processed, filtered]
      hl7: [{SCH-1: PA-70}, SIU^S12, SIU^S14, SIU^S15]
"""
    code, out = run("--config", str(writeback_project(tmp_path, tests)))
    assert code == 1
    assert (
        "hl7 of message 1 (fhir/booked.json): SCH-1\n           expected: PA-70\n           got:      PA-7^"
        in out
    )
    # the same version again: the source stores it once
    assert (
        "status of message 2 (fhir/booked.json)\n           expected: processed\n           got:      duplicate"
        in out
    )
    assert (
        "hl7 of message 2 (fhir/booked.json)\n           expected: MSH-9: SIU^S12\n           got:      nothing sent (duplicate)"
        in out
    )
    assert (
        "hl7 of message 3 (fhir/moved.json): MSH-9\n           expected: SIU^S14\n           got:      SIU^S13^SIU_S12"
        in out
    )
    # a cancel of an appointment never sent: nothing, and the reason says why
    assert (
        "hl7 of message 4 (fhir#1)\n           expected: MSH-9: SIU^S15\n           got:      nothing sent (filtered)"
        in out
    )
    assert "reason:   write-back: cancelled, no-show or deleted before anything was sent" in out


def test_nothing_sent_expectations_and_an_unpolled_type(tmp_path: Path) -> None:
    tests = """\
channel: portal
cases:
  - name: unchanged and never sent
    fhir:
      - fhir/cancelled.yaml
      - fhir/booked.json
      - {resourceType: Appointment, id: a1, meta: {versionId: "9"}, status: booked, identifier: [{system: "urn:portal:appointment", value: PA-7}], start: "2026-12-10T17:30:00Z", end: "2026-12-10T18:00:00Z", participant: [{actor: {reference: Patient/p1, display: "Testperson, Alex"}}], priority: 3}
      - {resourceType: Patient, id: p1}
    expect:
      status: [filtered, processed, filtered, rejected]
      hl7: [nothing, SIU^S12, nothing, nothing]
"""
    source = "{kind: fhir-poll, base_url: 'http://127.0.0.1:18089/fhir', resources: [Appointment]}"
    code, out = run("--config", str(writeback_project(tmp_path, tests, source)), "-v")
    assert code == 0, out
    assert (
        "message 3 fhir#3: filtered, sent nothing: write-back: nothing the HL7 message carries changed" in out
    )
    assert "the channel's fhir-poll source takes Appointment, not Patient" in out


def test_the_shipped_write_back_channel_is_tested_though_disabled() -> None:
    code, out = run("--config", str(ROOT / "routes.yaml"), "portal-appointments")
    assert code == 0, out
    for case in ("booked, rescheduled, cancelled", "an update that changes nothing the SIU carries sends nothing",
                 "a cancel of an appointment never sent sends nothing", "booked then no-show"):  # fmt: skip
        assert f"ok   portal-appointments: {case}" in out


@pytest.mark.parametrize(
    ("case", "message"),
    [
        pytest.param("    fhir: [fhir/booked.json]\n    expect: {hl7: [SIU^S12, SIU^S13]}\n", "2 items for 1 messages",
                     id="hl7-count"),
        pytest.param("    fhir: [fhir/booked.json]\n    expect: {hl7: [{SCH1: x}]}\n", "bad HL7 path 'SCH1'",
                     id="hl7-path"),
        pytest.param("    fhir: [fhir/booked.json]\n    expect: {ack: AA}\n", "a FHIR resource is not acknowledged",
                     id="ack-of-fhir"),
        pytest.param("    fhir: [{resourceType: Appointment, status: booked}]\n", "without an id", id="no-id"),
        pytest.param("    fhir: [fhir/nope.json]\n", "file 'fhir/nope.json' not found", id="missing-file"),
        pytest.param("    fhir: [42]\n", "each item is a FHIR resource", id="not-a-resource"),
    ],
)  # fmt: skip
def test_a_bad_write_back_case_says_what_to_fix(tmp_path: Path, case: str, message: str) -> None:
    cfg = writeback_project(tmp_path, "channel: portal\ncases:\n  - name: x\n" + case)
    code, out = run("--config", str(cfg))
    assert code == 1
    assert message in out and "portal_test.yaml" in out


def test_hl7_expectations_on_an_hl7_channel(tmp_path: Path) -> None:
    """An HL7 passthrough channel's output is checked the same way (field checks on what it sends)."""
    tests = "channel: clinic\ncases:\n  - name: x\n    input: [a01.hl7]\n    expect:\n      hl7: [{MSH-9: ADT^A01, PID-3.1: MRN1}]\n"
    cfg = project(tmp_path, tests=tests)
    clinic = tmp_path / "channels" / "clinic.yaml"
    clinic.write_text(
        clinic.read_text().replace("  - hl7-to-fhir: {derive_unknown_systems: true}\n", "  - passthrough\n")
    )
    code, out = run("--config", str(cfg), "-v")
    assert code == 0, out
    assert "message 1 a01.hl7#1: processed, ACK AA, sent ADT^A01" in out


def test_an_oml_order_channel_sends_nw_xo_ca_through_the_record_step(tmp_path: Path) -> None:
    """ServiceRequest → OML^O21 (order_message) on the engine's path: NW, XO for a change, nothing for a
    version the OML does not differ in, CA for the revocation; one placer number throughout."""
    (tmp_path / "channels").mkdir()
    (tmp_path / "routes.yaml").write_text(
        "store: sqlite:///var/t.db\nchannels: channels/*.yaml\n"
        "destinations:\n  lab: {kind: mllp, host: 127.0.0.1, port: 9, payload: output}\n"
    )
    (tmp_path / "channels" / "orders.yaml").write_text(
        "name: orders\nsource: {kind: http, host: 127.0.0.1, port: 18444, resources: [ServiceRequest]}\n"
        "transform:\n  - fhir-to-hl7: {placer_system: 'urn:portal:order', order_message: OML^O21}\n"
        "routes:\n  - destination: lab\n"
    )
    (tmp_path / "channels" / "orders_test.yaml").write_text(
        """\
channel: orders
cases:
  - name: ordered, held, touched, revoked
    fhir:
      - &new
        resourceType: ServiceRequest
        id: sr-1
        meta: {versionId: "1"}
        identifier: [{system: "urn:portal:order", value: ORD-5}]
        status: active
        intent: order
        code: {coding: [{system: "http://loinc.org", code: "2345-7", display: Glucose}]}
        subject: {reference: Patient/p1}
      - &held
        <<: *new
        meta: {versionId: "2"}
        status: on-hold
      - &touched
        <<: *held
        meta: {versionId: "3"}
        authoredOn: "2026-12-01"
        note: []
      - <<: *touched
        meta: {versionId: "4"}
        doNotPerform: false
      - <<: *new
        meta: {versionId: "5"}
        status: revoked
    expect:
      status: [processed, processed, processed, filtered, processed]
      hl7:
        - {MSH-9: OML^O21^OML_O21, ORC-1: NW, ORC-2: ORD-5, OBR-4: 2345-7^Glucose^LN}
        - {ORC-1: XO, ORC-5: HD}
        - {ORC-1: XO, ORC-9: "20261201"}
        - nothing
        - {ORC-1: CA, ORC-2: ORD-5, ORC-5: CA}
"""
    )
    code, out = run("--config", str(tmp_path / "routes.yaml"), "-v")
    assert code == 0, out
    assert (
        "message 1 fhir#1: processed, sent OML^O21" in out
        and "message 5 fhir#5: processed, sent OML^O21" in out
    )
