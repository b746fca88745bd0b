"""Logging setup: structlog, JSON in production, readable in a terminal.

What Sluice logs about a message is its id, channel, type, control id and outcome,
never names, identifiers, dates of birth or message content.  Header values are logged
only once validated (:mod:`engine.redact`); in the console format every string value is
printed as its ``repr``, control characters escaped, so a logged value can never start a
fake line or drive the terminal (JSON escapes them itself).  Worker processes log with the
engine's settings (:func:`current`, passed to them at start).
"""

from __future__ import annotations

import logging
import sys

import structlog

from engine import logflood

_current: tuple[str, str] = ("console", "info")
# Whether debug lines are written (structlog's default, before configure(), writes everything).  A hot
# path that would log a line per message at debug reads this first, so it builds no fields for nothing.
DEBUG = True


def configure(fmt: str = "auto", level: str = "info") -> None:
    global _current, DEBUG
    lvl = getattr(logging, level.upper(), logging.INFO)
    DEBUG = lvl <= logging.DEBUG
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    _current = (fmt, level)
    renderer: structlog.types.Processor
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        logflood.CONTROL,  # repeated lines rate-limited and summarised (issue #12)
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()  # JSON escapes control characters itself
    else:
        # repr every string value: control characters come out escaped (by default the console
        # renderer prints a string without spaces or quotes as it is, an ESC sequence included)
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(), repr_native_str=True)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def current() -> tuple[str, str]:
    """The format (``json`` or ``console``, ``auto`` resolved) and level :func:`configure` last set."""
    return _current
