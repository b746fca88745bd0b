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

DUMP = """
import sys, orjson
from pathlib import Path
import engine.native, transforms.adt
from engine.hl7 import parse
from transforms.convert import convert
from transforms.settings import DEMO_SETTINGS
out = {"reason": engine.native.REASON, "adt_file": transforms.adt.__file__, "bundles": {}}
for p in sys.argv[1:]:
    try:
        out["bundles"][p] = orjson.dumps(convert(parse(Path(p).read_text()), DEMO_SETTINGS)).decode()
    except Exception as exc:
        out["bundles"][p] = f"{type(exc).__name__}: {exc}"
print(orjson.dumps(out).decode())
"""


def _dump(**env: str) -> dict[str, Any]:
    """Convert the golden messages in a fresh interpreter with ``env`` added: build, reason, bundles."""
    proc = subprocess.run(
        [sys.executable, "-c", DUMP, *map(str, MESSAGES)],
        cwd=ROOT,
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def test_ci_runs_the_compiled_build() -> None:
    if not IN_CI:
        pytest.skip("only CI insists on the compiled build (a developer's edited checkout runs pure Python)")
    assert native.COMPILED, f"CI=true needs the compiled build that `pip install` makes: {native.REASON}"
    import transforms.adt

    assert transforms.adt.__file__ is not None
    assert not transforms.adt.__file__.endswith(".py")


def test_pure_build_converts_identically() -> None:
    assert MESSAGES
    pure = _dump(SLUICE_PURE_PYTHON="1")
    assert "pure Python" in pure["reason"]
    assert pure["adt_file"].endswith("adt.py")
    # the same golden messages in the installed build (compiled when the build is) give the same bytes
    installed = _dump(SLUICE_PURE_PYTHON="0")
    assert installed["reason"] == native.REASON
    assert pure["bundles"] == installed["bundles"]


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
