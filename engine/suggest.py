"""Spelling suggestions for every "unknown ..." error: options, commands, choices, config keys,
channel names (no I/O).  One rule everywhere: the closest known word by difflib, if it is close enough."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import click

CUTOFF = 0.6


def closest(word: str, known: Iterable[str], *, cutoff: float = CUTOFF) -> str | None:
    """The known word closest to ``word`` (case-insensitive), or None when none is close."""
    words = [k for k in known if k]
    by_lower = {k.lower(): k for k in words}
    found = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=cutoff)
    if not found:
        # an option typed without its dashes' partner, or a prefix: "--chan" → "--channel"
        prefixed = [k for k in words if k.lower().startswith(word.lower()) and len(word) >= 3]
        return prefixed[0] if len(prefixed) == 1 else None
    return by_lower[found[0]]


def did_you_mean(word: str, known: Iterable[str], *, cutoff: float = CUTOFF) -> str:
    """``"did you mean 'x'?"`` or an empty string."""
    best = closest(word, known, cutoff=cutoff)
    return f"did you mean {best!r}?" if best is not None else ""


class Choice(click.Choice):
    """A click choice whose error also suggests the closest value, as unknown options do."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as exc:
            guess = did_you_mean(str(value), [str(c) for c in self.choices])
            if not guess:
                raise
            raise click.BadParameter(f"{exc.message} ({guess})", ctx=ctx, param=param) from None
