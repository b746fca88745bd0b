"""The errors of a configuration being checked (``sluice check``), all of them rather than the first.

Loading for ``sluice run`` stops at the first :class:`ConfigError`, as it always has.  ``sluice check``
passes a :class:`Problems`: each independent part (a channel file, and inside it the source, each route,
each transform step, ...) is read through :func:`attempt`, which keeps that part's error and goes on with
a stand-in value, so one broken channel file does not hide the errors of the next.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from engine.errors import ConfigError

T = TypeVar("T")


class Problems:
    """Errors kept while checking; ``broken_destinations`` are destinations whose own section failed
    (a route naming one is not reported again as naming an unknown destination)."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []
        self.broken_destinations: set[str] = set()

    def add(self, exc: ConfigError) -> None:
        self.errors.append(exc)

    def attempt(self, fn: Callable[[], T], fallback: T) -> T:
        try:
            return fn()
        except ConfigError as exc:
            self.add(exc)
            return fallback

    def by_file(self, default_file: str, order: Sequence[str] = ()) -> dict[str, list[ConfigError]]:
        """The errors grouped by file: the files in ``order`` first (routes.yaml, then the channel files as
        loaded; ``x.yaml + channel_overrides`` counts as ``x.yaml``), then the others as first reported.
        An error without a file is counted under ``default_file``, routes.yaml."""
        out: dict[str, list[ConfigError]] = {}
        for exc in self.errors:
            out.setdefault(exc.file or default_file, []).append(exc)
        rank = {f: i for i, f in enumerate(order)}
        firsts = list(out)

        def where(file: str) -> tuple[int, int]:
            return rank.get(file.split(" + ")[0], len(rank)), firsts.index(file)

        return {f: out[f] for f in sorted(out, key=where)}

    def summary(self, default_file: str) -> str:
        """``3 errors in 2 files``."""
        n, files = len(self.errors), len(self.by_file(default_file))
        return f"{n} error{'' if n == 1 else 's'} in {files} file{'' if files == 1 else 's'}"


def attempt(problems: Problems | None, fn: Callable[[], T], fallback: T) -> T:
    """``fn()``; when checking (``problems`` given), a ConfigError is kept and ``fallback`` returned."""
    if problems is None:
        return fn()
    return problems.attempt(fn, fallback)


def report(problems: Problems | None, exc: ConfigError) -> None:
    """Raise ``exc``; when checking, keep it and go on."""
    if problems is None:
        raise exc
    problems.add(exc)
