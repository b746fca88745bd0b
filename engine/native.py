"""Compiled or pure: which build of the hot modules this process runs.

``setup.py`` compiles the HL7 parser and the HL7 → FHIR mappers with mypyc when it can and writes a
``_native.json`` beside them with the SHA-256 of each compiled source.  This module runs first (from
``engine/__init__.py``) and decides once per process, all or nothing:

* compiled, when every listed source on disk still has the hash it was compiled from;
* pure Python otherwise: no compiled build, ``SLUICE_PURE_PYTHON=1`` in the environment, or a source
  edited since the build (a developer's checkout runs its edits, never a stale extension; it says so
  once on stderr, with the command that recompiles).

All or nothing because compiled modules call each other directly: a compiled ``transforms.convert``
would keep calling the compiled ``transforms.adt`` even if ``adt.py`` had been loaded from source.
Outputs are identical either way (tests/engine/test_native.py converts the golden messages under both).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

PACKAGES = ("engine", "transforms", "transforms.fhir_to_v2")
"""Packages that may hold compiled modules (``setup.py`` lists the modules)."""

PURE_ENV = "SLUICE_PURE_PYTHON"

COMPILED: bool = False
"""True when this process runs the compiled modules."""

REASON: str = "not checked"
"""Why the process runs what it runs (shown by ``sluice --version`` and logged at start-up)."""


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Load the listed modules from their ``.py`` sources, ahead of the extension modules beside them."""

    def __init__(self, sources: dict[str, Path]):
        self.sources = sources

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        src = self.sources.get(fullname)
        if src is None:
            return None
        return importlib.util.spec_from_file_location(fullname, src)


def _package_dir(name: str) -> Path | None:
    if name == "engine":
        return Path(__file__).resolve().parent
    if "." in name:  # a sub-package: its folder under the parent's (located, nothing imported)
        parent, _, child = name.rpartition(".")
        base = _package_dir(parent)
        return base / child if base is not None and (base / child).is_dir() else None
    try:
        spec = importlib.util.find_spec(name)  # a top-level package: located, not imported
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _compiled_extension(directory: Path, module: str) -> bool:
    return any((directory / (module + suffix)).exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def _pure_requested(environ: Mapping[str, str]) -> bool:
    return environ.get(PURE_ENV, "") not in ("", "0")


def decide(
    directories: Mapping[str, Path | None] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[bool, str, dict[str, Path]]:
    """(compiled?, reason, sources of the compiled modules) for this installation and environment.

    ``directories`` maps package name to its folder (default: where ``PACKAGES`` are installed)."""
    if directories is None:
        directories = {package: _package_dir(package) for package in PACKAGES}
    environ = os.environ if environ is None else environ
    sources: dict[str, Path] = {}
    stale: list[str] = []
    missing: list[str] = []
    for package, directory in directories.items():
        if directory is None or not (directory / "_native.json").exists():
            continue
        try:
            modules: dict[str, str] = json.loads((directory / "_native.json").read_text())["modules"]
        except (OSError, ValueError, KeyError, TypeError):
            stale.append(f"{package}/_native.json")
            continue
        for module, digest in modules.items():
            src = directory / f"{module}.py"
            sources[f"{package}.{module}"] = src
            if not _compiled_extension(directory, module):
                missing.append(f"{package}/{module}")
            elif not src.exists() or hashlib.sha256(src.read_bytes()).hexdigest() != digest:
                stale.append(f"{package}/{module}.py")
    if not sources:
        return False, "pure Python (installed without the compiled modules)", sources
    if _pure_requested(environ):
        return False, f"pure Python ({PURE_ENV} is set)", sources
    if missing:
        return False, f"pure Python (compiled module missing: {', '.join(missing)})", sources
    if stale:
        return False, f"pure Python (changed since compiled: {', '.join(stale)})", sources
    return True, f"compiled with mypyc ({len(sources)} modules)", sources


def install() -> None:
    """Decide once per process; route imports to the sources unless the compiled build is usable."""
    global COMPILED, REASON
    if REASON != "not checked":
        return
    COMPILED, REASON, sources = decide()
    if COMPILED or not sources:
        return
    sys.meta_path.insert(0, _SourceFinder(sources))
    if not _pure_requested(os.environ):  # a compiled build that cannot be used: tell the developer
        print(
            f"sluice: {REASON}; running the slower pure-Python modules. "
            "Run `pip install -e .` again to recompile.",
            file=sys.stderr,
        )
