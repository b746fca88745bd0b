"""Build hook: compile the hot, pure modules with mypyc (everything else lives in pyproject.toml).

The HL7 parser and the HL7 → FHIR mappers are plain, fully typed Python; mypyc (part of mypy) compiles
them to C extensions, which makes a conversion about 2.5x cheaper (``bench/convert_bench.py`` measures
both builds; see bench/README.md and DEVELOPERS.md).  The build never fails for want of a compiler: without one, or
with ``SLUICE_PURE_PYTHON=1`` set, it installs the same modules as pure Python.

Each package with compiled modules gets a ``_native.json`` beside them listing the SHA-256 of every
compiled source; at import time ``engine.native`` uses the compiled modules only when the sources on
disk still match (an edited checkout silently runs its edits, in pure Python, and says so once).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent

# The modules compiled with mypyc: pure (no I/O), hot, and typed.  engine/native.py lists the packages.
COMPILED = [
    "engine/hl7.py",
    "transforms/bundle.py",
    "transforms/datatypes.py",
    "transforms/adt.py",
    "transforms/adt_events.py",
    "transforms/oru.py",
    "transforms/siu.py",
    "transforms/vxu.py",
    "transforms/mdm.py",
    "transforms/ppr.py",
    "transforms/dft.py",
    "transforms/orm.py",
    "transforms/orders.py",
    "transforms/oul.py",
    "transforms/ref.py",
    "transforms/rde.py",
    "transforms/convert.py",
    # FHIR → HL7 v2 (the fhir-to-hl7 step; a sub-package: its own _native.json)
    "transforms/fhir_to_v2/writer.py",
    "transforms/fhir_to_v2/outbound.py",
    "transforms/fhir_to_v2/siu.py",
    "transforms/fhir_to_v2/adt.py",
    "transforms/fhir_to_v2/orm.py",
    "transforms/fhir_to_v2/convert.py",
]


def _say(text: str) -> None:
    print(f"sluice build: {text}", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """Build the mypyc extensions if possible; on any compiler error install pure Python instead."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler, no headers, ...: the pure modules are still installed
            _say(f"could not compile the native modules ({exc}); installing pure Python (slower)")
            self._remove_outputs()
            return
        self._write_manifests()

    def _remove_outputs(self) -> None:
        for ext in self.extensions:
            path = Path(self.get_ext_fullpath(ext.name))
            if path.exists():
                path.unlink()

    def _write_manifests(self) -> None:
        by_package: dict[Path, dict[str, str]] = {}
        for source in COMPILED:
            package, module = source[: -len(".py")].rsplit("/", 1)
            out_dir = Path(self.get_ext_fullpath(f"{package.replace('/', '.')}.{module}")).parent
            digest = hashlib.sha256((ROOT / source).read_bytes()).hexdigest()
            by_package.setdefault(out_dir, {})[module] = digest
        for out_dir, modules in by_package.items():
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "_native.json").write_text(
                json.dumps({"modules": modules}, indent=1, sort_keys=True) + "\n"
            )


def ext_modules() -> list[Any]:
    if os.environ.get("SLUICE_PURE_PYTHON", "") not in ("", "0"):
        _say("SLUICE_PURE_PYTHON is set: installing pure Python")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        _say(f"mypyc is not available ({exc}); installing pure Python (slower)")
        return []
    cwd = os.getcwd()
    os.chdir(ROOT)  # mypyc wants paths relative to the project
    # The build environment has only the build requirements: imports of the runtime dependencies are
    # untyped there (Any), which may leave a `type: ignore` unused; the real type check is `mypy` in CI.
    flags = ["--ignore-missing-imports", "--no-warn-unused-ignores"]
    try:
        return list(mypycify([*flags, *COMPILED], opt_level="3", debug_level="0"))
    except (Exception, SystemExit) as exc:  # mypyc exits on a type error: never block the install for it
        _say(f"mypyc failed ({exc!r}); installing pure Python (slower)")
        return []
    finally:
        os.chdir(cwd)


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
