"""Runner tests on a temporary corpus of synthetic files (BOM, CRLF, CR, multi-message, garbage)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conformance import runner
from conformance.runner import Summary, main, run, split_messages, validate_bundle
from engine.errors import ConversionError, Location, MessageRejected
from engine.hl7 import Message

MSH = "MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101120000||{type}|{ctl}|P|2.5"
PID = "PID|1||{mrn}^^^HOSP^MR||TESTPERSON^ALEX||19800203|F"


def message(mrn: str = "MRN001", mtype: str = "ADT^A01^ADT_A01", ctl: str = "C1", sep: str = "\r") -> str:
    return MSH.format(type=mtype, ctl=ctl) + sep + PID.format(mrn=mrn) + sep


def fake_convert(msg: Message, settings: Any) -> dict[str, Any]:
    """A stand-in converter: Patient from PID; behaviour steered by the MRN."""
    if msg.message_type not in ("ADT", "ORU", "SIU"):
        raise MessageRejected("unsupported message type", code="200", location=Location("MSH", 1, 9))
    mrn = msg["PID-3.1"]
    if mrn == "BOOM":
        raise KeyError("a converter bug")
    if mrn == "WRAPPED":
        try:
            raise IndexError("list index out of range")
        except IndexError as exc:
            raise ConversionError("internal conversion error (IndexError)", code="207") from exc
    if mrn == "NOLOC":
        raise ConversionError("something is wrong somewhere")
    if mrn == "BADDATE":
        raise ConversionError("invalid date", code="102", location=Location("PID", 1, 7))
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "id": "p1",
        "identifier": [{"system": "urn:oid:1.2.3.4", "value": mrn}],
        "name": [{"family": msg["PID-5.1"], "given": [msg["PID-5.2"]]}],
        "birthDate": "1980-02-03",
        "gender": "female",
    }
    if mrn == "INVALID":
        patient["birthDate"] = "1980-13-45"
    if mrn == "EMPTY":
        patient["name"] = [{"family": ""}]
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:0b7d8a57-0000-5000-8000-000000000001",
                "resource": patient,
                "request": {"method": "PUT", "url": f"Patient?identifier=urn:oid:1.2.3.4|{mrn}"},
            }
        ],
    }


def by_name(summary: Summary) -> dict[str, runner.MessageResult]:
    return {r.name: r for r in summary.results}


def test_split_messages_handles_bom_newlines_batches_and_blank_lines() -> None:
    two = ("\ufeff" + message("A", sep="\r\n") + "\r\n\r\n" + message("B", sep="\r\n")).encode()
    parts = split_messages(two)
    assert len(parts) == 2
    assert parts[0].startswith(b"MSH|") and b"\n" not in parts[0] and parts[0].endswith(b"\r")
    assert split_messages(message("A", sep="\n").encode()) == [message("A").encode()]
    batch = ("FHS|^~\\&\rBHS|^~\\&\r" + message("A") + message("B") + "BTS|2\rFTS|1\r").encode()
    assert [p.count(b"PID") for p in split_messages(batch)] == [1, 1]
    assert split_messages(b"not hl7 at all\nsecond line\n") == [b"not hl7 at all\rsecond line\r"]


def test_run_on_a_temp_corpus(tmp_path: Path) -> None:
    (tmp_path / "bom_crlf.hl7").write_bytes(b"\xef\xbb\xbf" + message("BOM1", sep="\r\n").encode())
    (tmp_path / "lf.txt").write_bytes(message("LF1", sep="\n").encode())
    (tmp_path / "cr.er7").write_bytes(message("CR1").encode())
    (tmp_path / "multi.hl7").write_bytes((message("M1") + "\n\n" + message("M2") + message("M3")).encode())
    (tmp_path / "garbage.hl7").write_bytes(b"\x00\x01 this is not an HL7 message \xff\n")
    (tmp_path / "notes.txt").write_text("just some notes, not a message\n")
    (tmp_path / "noext").write_bytes(message("NOEXT").encode())
    (tmp_path / "vxu.hl7").write_bytes(message("V1", mtype="VXU^V04^VXU_V04").encode())
    (tmp_path / "baddate.hl7").write_bytes(message("BADDATE").encode())
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "deep.hl7v2").write_bytes(message("DEEP").encode())

    report = tmp_path / "out" / "report.md"
    report.parent.mkdir()
    summary = run(tmp_path, report=report, convert_fn=fake_convert)
    results = by_name(summary)

    for name in (
        "bom_crlf.hl7",
        "lf.txt",
        "cr.er7",
        "multi.hl7#1",
        "multi.hl7#2",
        "multi.hl7#3",
        "noext",
        "sub/deep.hl7v2",
    ):
        assert results[name].outcome == "valid", (name, results[name].detail, results[name].problems)
    assert results["multi.hl7#2"].count == 3
    assert results["bom_crlf.hl7"].message_type == "ADT^A01"
    assert results["garbage.hl7"].outcome == "error"
    assert results["garbage.hl7"].location.startswith("MSH")
    assert results["vxu.hl7"].outcome == "unsupported"
    assert results["baddate.hl7"].outcome == "error" and results["baddate.hl7"].location == "PID-7"
    assert ("notes.txt", "not HL7 (does not start with MSH/FHS/BHS)") in summary.skipped
    assert "notes.txt" not in results
    assert summary.ok
    text = report.read_text()
    assert "# Sluice conformance report" in text and "garbage.hl7" in text and "PID-7" in text


def test_crashes_invalid_and_unlocated_errors_are_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for mrn in ("BOOM", "WRAPPED", "NOLOC", "INVALID", "EMPTY", "FINE"):
        (tmp_path / f"{mrn.lower()}.hl7").write_bytes(message(mrn).encode())
    summary = run(tmp_path, convert_fn=fake_convert)
    results = by_name(summary)
    assert results["boom.hl7"].outcome == "CRASH"
    assert any("KeyError" in line for line in results["boom.hl7"].problems)
    assert results["wrapped.hl7"].outcome == "CRASH"  # the converter's AE 207 safety net hides a bug
    assert "IndexError" in results["wrapped.hl7"].detail
    assert results["noloc.hl7"].outcome == "UNLOCATED"
    assert results["invalid.hl7"].outcome == "INVALID"
    assert any("birthDate" in p for p in results["invalid.hl7"].problems)
    assert results["empty.hl7"].outcome == "INVALID"
    assert results["fine.hl7"].outcome == "valid"
    assert not summary.ok
    assert {r.name for r in summary.failures} == {
        "boom.hl7",
        "wrapped.hl7",
        "noloc.hl7",
        "invalid.hl7",
        "empty.hl7",
    }


def test_scoring_against_expected_bundle(tmp_path: Path) -> None:
    (tmp_path / "expected").mkdir()
    (tmp_path / "ADT-X.hl7").write_bytes(message("MRN9").encode())
    expected = fake_convert(__import__("engine.hl7", fromlist=["parse"]).parse(message("MRN9")), None)
    expected["entry"][0]["resource"]["gender"] = "male"
    expected["entry"][0]["fullUrl"] = "urn:uuid:something-else"
    (tmp_path / "expected" / "ADT-X-expected.json").write_text(json.dumps(expected))
    summary = run(tmp_path, convert_fn=fake_convert)
    (result,) = summary.results
    assert result.score is not None
    assert result.expected == "expected/ADT-X-expected.json"
    assert result.score.compared - result.score.agreeing == 1
    (diff,) = result.score.diffs
    assert diff.path.endswith(".gender") and diff.ours == "female" and diff.expected == "male"
    total = runner.totals(summary)
    assert total.diffs[0].file == "ADT-X.hl7"


def test_converts_as_a_default_channel_utf8_fallback_and_warnings_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """UTF-8 bytes under MSH-18 ASCII (the IG's own ORM/OML test messages) convert, as a channel with the
    shipped defaults (source.utf8_fallback) converts them, with a charset_fallback warning; a bad date in a
    field that is not a key is dropped (strictness lenient) with a located warning; both counted."""
    head = "MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101120000||ADT^A01^ADT_A01|{ctl}|P|2.5||||||ASCII"
    pid = "PID|1||MRN{n}^^^HOSP^MR||TESTPERSON^{given}||{dob}|F"
    zoe = "ZO\u00cb"
    (tmp_path / "utf8.hl7").write_bytes(
        f"{head.format(ctl='U1')}\r{pid.format(n=1, given=zoe, dob='19800203')}".encode()
    )
    (tmp_path / "baddate.hl7").write_bytes(
        f"{head.format(ctl='B1')}\r{pid.format(n=2, given='ZOE', dob='1980x')}".encode()
    )
    latin1 = f"{head.format(ctl='L1')}\r{pid.format(n=3, given=zoe, dob='19800203')}"
    (tmp_path / "latin1.hl7").write_bytes(latin1.encode("latin-1"))
    summary = run(tmp_path)
    results = by_name(summary)
    assert results["utf8.hl7"].outcome == "valid", results["utf8.hl7"].detail
    assert [k for k, _t in results["utf8.hl7"].warnings] == ["charset_fallback"]
    assert "MSH-18" in results["utf8.hl7"].warnings[0][1]
    assert results["baddate.hl7"].outcome == "valid", results["baddate.hl7"].detail
    assert [k for k, _t in results["baddate.hl7"].warnings] == ["field_dropped"]
    assert results["baddate.hl7"].warnings[0][1].startswith("PID-7")
    # bytes that are not UTF-8 under a declared ASCII stay a located rejection
    assert results["latin1.hl7"].outcome == "error" and results["latin1.hl7"].location == "MSH-18"
    assert summary.warning_kinds == {"charset_fallback": 1, "field_dropped": 1}
    runner.print_table(summary)
    out = capsys.readouterr().out
    assert "2 warning(s) on 2 converted message(s), by kind: charset_fallback 1, field_dropped 1" in out
    report = runner.render_markdown(summary)
    assert "| baddate.hl7 | ADT^A01 | field_dropped | PID-7:" in report


def test_main_exit_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(runner, "_default_convert", lambda: fake_convert)
    good = tmp_path / "good"
    good.mkdir()
    (good / "a.hl7").write_bytes(message("A1").encode())
    (good / "junk.hl7").write_bytes(b"junk\n")
    report = tmp_path / "r.md"
    assert main([str(good), "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "a.hl7" in out and "1 valid" in out and "1 error" in out
    assert report.is_file()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "b.hl7").write_bytes(message("BOOM").encode())
    assert main([str(bad)]) == 1
    assert "CRASH" in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 2


def test_validate_bundle_checks_bundle_rules() -> None:
    ok = fake_convert(__import__("engine.hl7", fromlist=["parse"]).parse(message("Z")), None)
    assert validate_bundle(ok) == []
    dup = json.loads(json.dumps(ok))
    dup["entry"].append(dup["entry"][0])
    assert any("bdl-7" in p for p in validate_bundle(dup))
    dangling = json.loads(json.dumps(ok))
    dangling["entry"][0]["resource"]["generalPractitioner"] = [{"reference": "urn:uuid:not-in-bundle"}]
    assert any("does not resolve" in p for p in validate_bundle(dangling))
    norequest = json.loads(json.dumps(ok))
    del norequest["entry"][0]["request"]
    assert any("bdl-3" in p for p in validate_bundle(norequest))
    assert validate_bundle([]) != []
    backwards = json.loads(json.dumps(ok))
    backwards["entry"][0]["resource"]["name"] = [
        {
            "family": "Sample",
            "period": {"start": "2025-03-10T17:55:01-07:00", "end": "2025-03-10T17:55:00-07:00"},
        }
    ]
    assert [p for p in validate_bundle(backwards) if "per-1" in p] == [
        "entry[0] Patient.name[0].period: period ends before it starts (per-1)"
    ]


def _scored_corpus(tmp_path: Path) -> Path:
    """One message whose reference differs in gender (unexplained) and in an identifier system that is an MS
    placeholder for the authority PID-3 names (explained)."""
    corpus = tmp_path / "corpus"
    (corpus / "expected").mkdir(parents=True)
    (corpus / "ADT-Y.hl7").write_bytes(message("MRN7").encode())
    expected = fake_convert(__import__("engine.hl7", fromlist=["parse"]).parse(message("MRN7")), None)
    patient = expected["entry"][0]["resource"]
    patient["gender"] = "male"
    patient["identifier"][0]["system"] = "http://example.com/v2-to-fhir-converter/Identifier/HOSP"
    (corpus / "expected" / "ADT-Y-expected.json").write_text(json.dumps(expected))
    return corpus


def test_diffs_list_every_differing_field_with_its_explanation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(runner, "_default_convert", lambda: fake_convert)
    corpus = _scored_corpus(tmp_path)
    report = tmp_path / "r.md"
    assert main([str(corpus), "--diffs", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    diffs = [line for line in out.splitlines() if line.startswith("DIFF ")]
    assert diffs == [
        "DIFF ADT-Y.hl7  Patient[MRN7].identifier[MRN7].system  sluice='urn:oid:1.2.3.4'  "
        "expected='http://example.com/v2-to-fhir-converter/Identifier/HOSP'  "
        "explained (ms-placeholder): MS placeholder system: PID-3 gives 'MRN7' with the name 'HOSP'",
        "DIFF ADT-Y.hl7  Patient[MRN7].gender  sluice='female'  expected='male'  unexplained",
    ]
    # raw (every compared field) beside the explained figure, and what each rule excused: 6 fields compared
    # (identifier value and system, family, given, birthDate, gender), 4 agree, 1 explained
    assert "raw 4/6 = 66.7% of every compared field; explained 4/5 = 80.0% (1 explained" in out
    assert "ms-placeholder 1, xtn-cp-mobile 0" in out
    text = report.read_text()
    assert "**raw: 4 / 6 = 66.7%**" in text and "**explained: 4 / 5 = 80.0%**" in text
    assert "| ms-placeholder | 1 |" in text and "| xtn-cp-mobile | 0 |" in text
    assert "| **total** | **1** | |" in text
    # without --diffs, no DIFF lines
    assert main([str(corpus)]) == 0
    assert "DIFF " not in capsys.readouterr().out


def test_cli_conformance_passes_diffs_and_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from engine.cli import main as cli

    monkeypatch.setattr(runner, "_default_convert", lambda: fake_convert)
    corpus = _scored_corpus(tmp_path)
    report = tmp_path / "cli.md"
    result = CliRunner().invoke(cli, ["conformance", str(corpus), "--diffs", "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert (
        "DIFF ADT-Y.hl7  Patient[MRN7].gender  sluice='female'  expected='male'  unexplained" in result.output
    )
    assert report.is_file()
    result = CliRunner().invoke(cli, ["conformance", str(corpus)])
    assert result.exit_code == 0 and "DIFF " not in result.output


def test_cli_conformance_without_the_validate_extra_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without fhir.resources every bundle would be INVALID: exit 2 naming the extra, before converting."""
    import sys

    from click.testing import CliRunner

    from engine.cli import main as cli

    converted: list[str] = []

    def spy(msg: Message, settings: Any) -> dict[str, Any]:
        converted.append(msg.control_id)
        return fake_convert(msg, settings)

    monkeypatch.setattr(runner, "_default_convert", lambda: spy)
    monkeypatch.setitem(sys.modules, "fhir.resources.R4B", None)  # import fails as in an install without it
    corpus = _scored_corpus(tmp_path)
    result = CliRunner().invoke(cli, ["conformance", str(corpus)])
    assert result.exit_code == 2
    assert "install sluice[validate]" in result.output and "INVALID" not in result.output
    assert converted == []
