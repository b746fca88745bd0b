"""Reading a YAML mapping with its file and key path: the typed accessors every section goes through,
the unknown-key check, sizes (``16MiB``) and YAML files read with a located error.

``RECORDER`` is the schema recorder (engine/schema.py): set it on this module (``engine.config.reader``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from engine.errors import ConfigError
from engine.suggest import did_you_mean

# The schema recorder (engine/schema.py): while set, every key read is noted with its kind, default and
# choices, so the channel reference is generated from the loader itself.  None (the normal case): no cost.
RECORDER: dict[tuple[str, str], dict[str, Any]] | None = None


def _note(
    sec: _Section, k: str, kind: str, default: Any = None, choices: tuple[str, ...] | None = None
) -> None:
    if RECORDER is not None:
        entry = RECORDER.setdefault((sec.file, sec.key(k)), {"kind": "any", "default": None, "choices": None})
        if kind != "any":
            entry.update(kind=kind, default=default, choices=choices)


class _Section:
    """A mapping being read, remembering its file and key path for errors."""

    def __init__(self, data: Any, file: str, path: str):
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping, got {type(data).__name__}", file=file, key=path or None)
        self.data = data
        self.file = file
        self.path = path
        self.used: set[str] = set()

    def key(self, k: str) -> str:
        return f"{self.path}.{k}" if self.path else k

    def get(self, k: str, default: Any = None) -> Any:
        self.used.add(k)
        if RECORDER is not None:
            _note(self, k, "any")
        return self.data.get(k, default)

    def has(self, k: str) -> bool:
        return k in self.data

    def text(self, k: str, default: str | None = None, *, choices: tuple[str, ...] | None = None) -> Any:
        if RECORDER is not None:
            _note(self, k, "text", default, choices)
        v = self.get(k, default)
        if v is None:
            return None
        if not isinstance(v, str | int | float) or isinstance(v, bool):
            raise ConfigError(f"expected text, got {type(v).__name__}", file=self.file, key=self.key(k))
        v = str(v)
        if choices and v not in choices:
            raise ConfigError(
                f"{v!r} is not allowed",
                file=self.file,
                key=self.key(k),
                hint=f"use one of: {', '.join(choices)}",
            )
        return v

    def integer(self, k: str, default: int) -> int:
        if RECORDER is not None:
            _note(self, k, "integer", default)
        v = self.get(k, default)
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, str):
                try:
                    return _size(v)
                except ValueError:
                    pass
            raise ConfigError(f"expected a whole number, got {v!r}", file=self.file, key=self.key(k))
        return v

    def number(self, k: str, default: float | None) -> Any:
        if RECORDER is not None:
            _note(self, k, "number", default)
        v = self.get(k, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"expected a number, got {v!r}", file=self.file, key=self.key(k))
        return float(v)

    def flag(self, k: str, default: bool) -> bool:
        if RECORDER is not None:
            _note(self, k, "boolean", default)
        v = self.get(k, default)
        if not isinstance(v, bool):
            raise ConfigError(f"expected true or false, got {v!r}", file=self.file, key=self.key(k))
        return v

    def items(self, k: str) -> list[Any]:
        if RECORDER is not None:
            _note(self, k, "list", [])
        v = self.get(k, [])
        if v is None:
            return []
        if not isinstance(v, list):
            raise ConfigError(f"expected a list, got {type(v).__name__}", file=self.file, key=self.key(k))
        return v

    def sub(self, k: str) -> _Section:
        if RECORDER is not None:
            _note(self, k, "mapping")
        return _Section(self.get(k), self.file, self.key(k))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            allowed = ", ".join(sorted(self.used))
            guess = did_you_mean(str(unknown[0]), sorted(self.used))
            raise ConfigError(
                f"unknown key {unknown[0]!r}"
                + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""),
                file=self.file,
                key=self.key(unknown[0]),
                hint=f"{guess or 'check the spelling'}; allowed here: {allowed}",
            )


def _size(v: str) -> int:
    s = v.strip().upper().replace(" ", "")
    for suffix, mult in (
        ("KIB", 1024),
        ("MIB", 1024**2),
        ("GIB", 1024**3),
        ("KB", 1000),
        ("MB", 1000**2),
        ("B", 1),
    ):
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * mult)
    return int(s)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file: {exc.strerror}", file=str(path), hint="check the path"
        ) from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        line = ""
        if mark is not None and 0 <= mark.line < len(text.splitlines()):
            line = f": {text.splitlines()[mark.line].rstrip()!r}"
        raise ConfigError(
            f"invalid YAML{where}{line}: {getattr(exc, 'problem', exc)}",
            file=str(path),
            hint="check the indentation there and on the line above: keys of one mapping start in the same "
            "column, indented with spaces (no tabs); quote a value that holds ': ' or starts with a special "
            "character",
        ) from exc
