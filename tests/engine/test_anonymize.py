"""`sluice anonymize` (engine/anonymize.py): consistent surrogates, per-patient date shifts, redaction,
structure kept, and a leak check that finds what is left (and never prints it)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from engine.cli import main, split_messages
from engine.hl7 import parse
from transforms.convert import convert_report
from transforms.settings import ConvertSettings

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "channels" / "samples" / "allscripts"
MULTI = ROOT / "tests" / "transforms" / "messages" / "oru_r01_multi.hl7"
A04 = ROOT / "tests" / "transforms" / "messages" / "adt_a04.hl7"


def anonymize(tmp_path: Path, *files: Path, key: str = "test-key") -> tuple[int, str, Path]:
    out = tmp_path / "out"
    res = CliRunner().invoke(
        main, ["anonymize", *map(str, files), "--out", str(out), "--key", key, "--force"]
    )
    return res.exit_code, res.output, out


def msgs(path: Path) -> list:
    return [parse(m.decode()) for m in split_messages(path.read_bytes())]


def test_same_patient_same_surrogates_across_files_and_intervals_kept(tmp_path: Path) -> None:
    files = [SAMPLES / "a01_admit.hl7", SAMPLES / "a03_discharge.hl7", SAMPLES / "s12_book_second.hl7",
             SAMPLES / "a04_register.hl7"]  # fmt: skip
    code, out, folder = anonymize(tmp_path, *files)
    assert code == 0, out
    assert "leak check: no original value found" in out
    (a01,), (a03,), (s12,), (a04,) = (msgs(folder / f.name) for f in files)
    orig01, orig03 = msgs(files[0])[0], msgs(files[1])[0]
    mrn = a01["PID-3.1"]
    assert mrn != orig01["PID-3.1"] and len(mrn) == len(orig01["PID-3.1"])
    assert a03["PID-3.1"] == s12["PID-3.1"] == mrn  # the same MRN in three files
    assert a04["PID-3.1"] != mrn  # another patient
    assert a01["PID-3.4"] == "NORTHCLINIC" and a01["PID-3.5"] == "MR"  # authority and type kept
    assert a01["PV1-19.1"] == a03["PV1-19.1"] != orig01["PV1-19.1"]
    assert a01["PID-5.1"] == a03["PID-5.1"] != orig01["PID-5.1"]
    assert a01["PID-7"] != orig01["PID-7"]
    # one shift per patient: the stay lasts as long, the time of day is kept
    assert a01["PV1-44"] != orig01["PV1-44"] and a01["PV1-44"][8:] == orig01["PV1-44"][8:]
    assert int(a03["PV1-45"][:8]) - int(a01["PV1-44"][:8]) == int(orig03["PV1-45"][:8]) - int(
        orig01["PV1-44"][:8]
    )
    assert a01["PID-11.4"] == "OR" and a01["PID-11.5"][:3] == orig01["PID-11.5"][:3]
    assert a01["PID-13.7"].startswith("55501")


def test_structure_escapes_and_other_fields_kept_free_text_redacted(tmp_path: Path) -> None:
    code, out, folder = anonymize(tmp_path, MULTI)
    assert code == 0, out
    before = MULTI.read_text().replace("\n", "\r").split("\r")
    after = (folder / MULTI.name).read_bytes().decode().split("\r")
    assert len(before) == len(after)
    for b, a in zip(before, after, strict=True):
        assert b[:3] == a[:3] and b.count("|") == a.count("|")
    (m,) = msgs(folder / MULTI.name)
    first = m.all("OBX")[0]
    assert m.all("OBX")[8][5] == "[redacted]"  # TX
    assert m.all("OBX")[9][5] == "[redacted]"  # FT (it held \H\ and \.br\ escapes)
    assert all(n[3] == "[redacted]" for n in m.all("NTE"))
    assert first[3] == "2345-7^Glucose^LN" and first[5] == "182"  # codes and values kept
    assert "\\" not in m.all("OBX")[9][5]
    kept = [line for line in after if line.startswith("OBX|2|SN")]
    assert kept and kept[0].split("|")[5] == "<^0.5"
    # still a message the converter takes
    assert convert_report(m, ConvertSettings(derive_unknown_systems=True)).bundle["entry"]


def test_the_same_key_gives_the_same_output_another_key_another(tmp_path: Path) -> None:
    _, _, one = anonymize(tmp_path / "1", A04, key="k")
    _, _, two = anonymize(tmp_path / "2", A04, key="k")
    _, _, three = anonymize(tmp_path / "3", A04, key="other")
    assert (one / A04.name).read_bytes() == (two / A04.name).read_bytes() != (three / A04.name).read_bytes()


def test_a_leak_is_reported_by_place_never_by_value(tmp_path: Path) -> None:
    leaky = tmp_path / "leaky.hl7"
    leaky.write_text(
        "MSH|^~\\&|LAB|CLINIC|SLUICE|HOSP|20250312101500||ORU^R01^ORU_R01|L1|P|2.5.1\r"
        "PID|1||MRN777^^^CLINIC^MR||Zebrafinch^Robin||19700101|F\r"
        "OBR|1|O1^CLINIC|F1^LAB|24331-1^Lipid panel^LN|||20250312090000\r"
        "OBX|1|ST|8251-1^Service comment^LN||called Zebrafinch at home re MRN777||||||F\r"
    )
    code, out, folder = anonymize(tmp_path, leaky)
    assert code == 1
    assert "leak: " in out and "segment 4 (OBX) holds the original value of PID-5 of leaky.hl7#1" in out
    assert "PID-3 of leaky.hl7#1" in out
    assert "Zebrafinch" not in out and "MRN777" not in out
    assert "Zebrafinch" not in (folder / "leaky.hl7").read_bytes().decode().split("\r")[1]


def test_an_existing_output_needs_force_and_a_junk_message_fails(tmp_path: Path) -> None:
    junk = tmp_path / "junk.hl7"
    junk.write_text("NOT A MESSAGE\r")
    out = tmp_path / "o"
    res = CliRunner().invoke(main, ["anonymize", str(junk), "--out", str(out)])
    assert res.exit_code == 1 and "cannot read this message" in res.output
    res = CliRunner().invoke(main, ["anonymize", str(junk), "--out", str(out)])
    assert res.exit_code == 2 and "use --force" in res.output


def test_a_batch_keeps_its_header_and_trailer_and_each_message_is_anonymized(tmp_path: Path) -> None:
    one = (SAMPLES / "a01_admit.hl7").read_text().strip().replace("\n", "\r")
    two = (SAMPLES / "a04_register.hl7").read_text().strip().replace("\n", "\r")
    batch = tmp_path / "batch.hl7"
    batch.write_text(
        "FHS|^~\\&|ALLSCRIPTS|NORTHCLINIC\rBHS|^~\\&|ALLSCRIPTS|NORTHCLINIC\r"
        + one
        + "\r"
        + two
        + "\rBTS|2\rFTS|1\r"
    )
    code, out, folder = anonymize(tmp_path, batch)
    assert code == 0, out
    lines = (folder / "batch.hl7").read_bytes().decode().split("\r")
    assert lines[:2] == ["FHS|^~\\&|ALLSCRIPTS|NORTHCLINIC", "BHS|^~\\&|ALLSCRIPTS|NORTHCLINIC"]
    assert lines[-3:] == ["BTS|2", "FTS|1", ""]
    pids = [line for line in lines if line.startswith("PID")]
    assert len(pids) == 2 and "MRN200202" not in pids[0] and "MRN200101" not in pids[1]
    assert "Synthetica" not in "\r".join(lines) and "Cohortson" not in "\r".join(lines)
