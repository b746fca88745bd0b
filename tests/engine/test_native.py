"""engine.native: the compiled (mypyc) and pure-Python builds of the hot modules.

The suite runs whatever build is installed; under CI=true that must be the compiled one (what a
`pip install` ships).  These tests prove the pure build gives the very same output, and that a stale or
missing compiled module is never used."""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine import native
from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = sorted((ROOT / "tests" / "transforms" / "messages").glob("*.hl7"))

# Each message's outcome, by kind: a Bundle (its bytes), a located error (what the sender must fix: type,
# HL7 code, location, text) or an internal error (a converter bug; the builds must agree and neither may
# have one).  A plain string per outcome would let two builds failing the same way compare equal.
DUMP = """
import sys, orjson
from pathlib import Path
import engine.native, transforms.adt
from engine import exactjson
from engine.errors import InternalConversionError, SluiceError
from engine.hl7 import parse
from transforms.convert import convert
from transforms.settings import DEMO_SETTINGS
out = {"reason": engine.native.REASON, "adt_file": transforms.adt.__file__, "outcomes": {}}
for p in sys.argv[1:]:
    try:
        bundle = exactjson.dumps(convert(parse(Path(p).read_text()), DEMO_SETTINGS)).decode()  # as the step does
        outcome = {"kind": "bundle", "bundle": bundle}
    except InternalConversionError as exc:
        cause = exc.__cause__
        outcome = {"kind": "internal error", "error": str(exc), "cause": f"{type(cause).__name__}: {cause}"}
    except SluiceError as exc:
        kind = "located error" if exc.location is not None else "unlocated error"
        outcome = {"kind": kind, "type": type(exc).__name__, "code": exc.hl7_error, "ack": exc.ack_code,
                   "location": str(exc.location), "error": str(exc)}
    except Exception as exc:  # outside the safety net (parse, orjson): a bug as well
        outcome = {"kind": "internal error", "error": f"{type(exc).__name__}: {exc}"}
    out["outcomes"][p] = outcome
print(orjson.dumps(out).decode())
"""

# Besides the golden messages (all convert): a located error of each family, and the inputs the conversion
# fuzz once broke on (tests/fuzz/test_convert_fuzz.py REGRESSIONS: numbers past 64 bits, control characters),
# so the compiled build is held to the same outcome on its error and clean-up paths.
H = "MSH|^~\\&|EHR|NORTH|SL|HOSP|20250314083000||{t}|N{n}|P|2.5.1\r"
ERRORS = {
    "unsupported_type": H.format(t="MDM^T02", n=1) + "PID|1||MRN1^^^NORTH^MR\r",
    "unsupported_trigger": H.format(t="ADT^A43^ADT_A43", n=2) + "EVN|A43\rPID|1||MRN1^^^NORTH^MR\r",
    # a bad date in a key field (SCH-11: a booked Appointment needs its start; one in PID-7 or MSH-7 is dropped
    # under lenient, one in a DT result's OBX-5 kept as text)
    "bad_date": H.format(t="SIU^S12^SIU_S12", n=3)
    + "SCH|APT1^EHR||||||||||^^30^20251340090000|||||||||||||Booked\rPID|1||MRN1^^^NORTH^MR||Doe^J||19800101\r",
    "no_pid": H.format(t="ADT^A01^ADT_A01", n=4) + "EVN|A01|20250314\r",
    "no_obr": H.format(t="ORU^R01^ORU_R01", n=5) + "PID|1||MRN1^^^NORTH^MR\r",
}


def _inputs(tmp_path: Path) -> list[Path]:
    from tests.fuzz.test_convert_fuzz import REGRESSIONS

    extra = {**ERRORS, **{f"fuzz_regression_{i}": text for i, text in enumerate(REGRESSIONS)}}
    paths = list(MESSAGES)
    for name, text in extra.items():
        path = tmp_path / f"{name}.hl7"
        path.write_bytes(text.encode("utf-8"))
        paths.append(path)
    return paths


def _dump(paths: list[Path], **env: str) -> dict[str, Any]:
    """Convert ``paths`` in a fresh interpreter with ``env`` added: build, reason, outcome per message."""
    proc = subprocess.run(
        [sys.executable, "-c", DUMP, *map(str, paths)],
        cwd=ROOT,
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def _kinds(outcomes: dict[str, dict[str, str]]) -> dict[str, str]:
    return {Path(p).stem: o["kind"] for p, o in outcomes.items()}


def test_ci_runs_the_compiled_build() -> None:
    if not IN_CI:
        pytest.skip("only CI insists on the compiled build (a developer's edited checkout runs pure Python)")
    assert native.COMPILED, f"CI=true needs the compiled build that `pip install` makes: {native.REASON}"
    import transforms.adt

    assert transforms.adt.__file__ is not None
    assert not transforms.adt.__file__.endswith(".py")


def test_pure_build_converts_identically(tmp_path: Path) -> None:
    assert MESSAGES
    paths = _inputs(tmp_path)
    pure = _dump(paths, SLUICE_PURE_PYTHON="1")
    assert "pure Python" in pure["reason"]
    assert pure["adt_file"].endswith("adt.py")
    # the same messages in the installed build (compiled when the build is) give the same outcomes
    installed = _dump(paths, SLUICE_PURE_PYTHON="0")
    assert installed["reason"] == native.REASON
    for build in (pure, installed):
        internal = {
            p: o for p, o in build["outcomes"].items() if o["kind"] not in ("bundle", "located error")
        }
        assert not internal, f"{build['reason']}: internal or unlocated errors: {internal}"
    kinds = _kinds(pure["outcomes"])
    assert all(kinds[p.stem] == "bundle" for p in MESSAGES), kinds  # the golden messages all convert
    assert all(kinds[name] == "located error" for name in ERRORS), kinds
    assert _kinds(installed["outcomes"]) == kinds
    assert installed["outcomes"] == pure["outcomes"]


def _fake_package(tmp_path: Path, source: str, compiled_from: str, with_extension: bool = True) -> Path:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "mod.py").write_text(source)
    if with_extension:
        (pkg / ("mod" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"not really an extension")
    digest = hashlib.sha256(compiled_from.encode()).hexdigest()
    (pkg / "_native.json").write_text(json.dumps({"modules": {"mod": digest}}))
    return pkg


def test_decide_uses_the_compiled_build_only_when_sources_match(tmp_path: Path) -> None:
    pkg = _fake_package(tmp_path, "x = 1\n", "x = 1\n")
    compiled, reason, sources = native.decide({"pkg": pkg}, environ={})
    assert compiled, reason
    assert sources == {"pkg.mod": pkg / "mod.py"}

    compiled, reason, _ = native.decide({"pkg": pkg}, environ={"SLUICE_PURE_PYTHON": "1"})
    assert not compiled and "SLUICE_PURE_PYTHON" in reason


def test_decide_refuses_an_edited_source(tmp_path: Path) -> None:
    pkg = _fake_package(tmp_path, "x = 2  # edited after the build\n", "x = 1\n")
    compiled, reason, sources = native.decide({"pkg": pkg}, environ={})
    assert not compiled
    assert "changed since compiled: pkg/mod.py" in reason
    assert sources == {"pkg.mod": pkg / "mod.py"}  # these are loaded from source instead


def test_decide_refuses_a_missing_extension(tmp_path: Path) -> None:
    pkg = _fake_package(tmp_path, "x = 1\n", "x = 1\n", with_extension=False)
    compiled, reason, _ = native.decide({"pkg": pkg}, environ={})
    assert not compiled and "compiled module missing: pkg/mod" in reason


def test_decide_without_a_compiled_build(tmp_path: Path) -> None:
    compiled, reason, sources = native.decide({"pkg": tmp_path, "gone": None}, environ={})
    assert (compiled, sources) == (False, {})
    assert "installed without the compiled modules" in reason


def test_source_finder_loads_the_py_file(tmp_path: Path) -> None:
    src = tmp_path / "sluice_native_probe.py"
    src.write_text("WHERE = 'source'\n")
    finder = native._SourceFinder({"sluice_native_probe": src})
    spec = finder.find_spec("sluice_native_probe", None)
    assert spec is not None and spec.origin == str(src)
    assert finder.find_spec("something_else", None) is None


# FHIR → HL7 v2 (transforms/fhir_to_v2, compiled too): the same resources give the same bytes (or the same
# error) in both builds, including values that are not what FHIR allows where the code reads them.
WRITE = """
import sys, json, orjson
import engine.native, transforms.fhir_to_v2.siu
from engine.errors import SluiceError
from transforms.fhir_to_v2.convert import convert
from transforms.fhir_to_v2.settings import WritebackSettings
from tests.transforms.test_fhir_to_v2 import APPOINTMENT
from tests.transforms.test_fhir_to_v2_orders import ORDER
settings = WritebackSettings(sending_facility="PORTAL", placer_system="urn:portal:appointment", charset="UNICODE UTF-8")
oml = WritebackSettings(sending_facility="PORTAL", placer_system="urn:portal:order", order_message="OML^O21")
patient = {"resourceType": "Patient", "id": "p1", "name": [{"family": "Testperson", "given": ["Alex"]}],
           "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.999.1", "value": "MRN1"}], "birthDate": "1980-02-29"}
order = {"resourceType": "ServiceRequest", "id": "s1", "status": "revoked", "code": {"coding": [{"system": "http://loinc.org", "code": "24323-8"}]}}
cases = {
    "booked": APPOINTMENT,
    "cancelled": {**APPOINTMENT, "status": "cancelled"},
    "patient": patient,
    "order": order,
    "bad_start": {**APPOINTMENT, "start": 20261210},
    "bad_participant": {**APPOINTMENT, "participant": ["Patient/p1"]},
    "bad_comment": {**APPOINTMENT, "comment": ["not", "text"]},
    "actor_text": {**APPOINTMENT, "participant": [{"actor": "Patient/p1"}]},
    "bad_identifier": {**APPOINTMENT, "identifier": [{"system": "urn:portal:appointment", "value": 7}]},
    "no_type": {"id": "x"},
    "oml": (ORDER, oml),
    "oml_bad_specimen": ({**ORDER, "specimen": [{"reference": "#spec1"}, "Specimen/x"]}, oml),
}
out = {"reason": engine.native.REASON, "siu_file": transforms.fhir_to_v2.siu.__file__, "outcomes": {}}
for name, case in cases.items():
    res, with_settings = case if isinstance(case, tuple) else (case, settings)
    try:
        o = convert(res, with_settings, now="2026-12-04T10:00:00Z")
        out["outcomes"][name] = {"kind": "ok", "key": o.key, "state": o.state, "content": o.content,
                                 "variants": {k: v.decode() for k, v in o.variants.items()}}
    except SluiceError as exc:
        out["outcomes"][name] = {"kind": "error", "type": type(exc).__name__, "error": str(exc)}
    except Exception as exc:
        out["outcomes"][name] = {"kind": "crash", "error": f"{type(exc).__name__}: {exc}"}
print(orjson.dumps(out).decode())
"""


def _write(**env: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", WRITE],
        cwd=ROOT,
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def test_pure_build_writes_hl7_identically() -> None:
    pure = _write(SLUICE_PURE_PYTHON="1")
    assert pure["siu_file"].endswith("siu.py")
    installed = _write(SLUICE_PURE_PYTHON="0")
    assert installed["reason"] == native.REASON
    for build in (pure, installed):
        crashes = {n: o for n, o in build["outcomes"].items() if o["kind"] == "crash"}
        assert not crashes, f"{build['reason']}: {crashes}"
    assert {n: o["kind"] for n, o in pure["outcomes"].items()} == {
        "booked": "ok",
        "cancelled": "ok",
        "patient": "ok",
        "order": "ok",
        "bad_start": "error",
        "bad_participant": "ok",
        "bad_comment": "ok",
        "actor_text": "error",
        "bad_identifier": "ok",
        "no_type": "error",
        "oml": "ok",
        "oml_bad_specimen": "ok",
    }
    assert installed["outcomes"] == pure["outcomes"]
