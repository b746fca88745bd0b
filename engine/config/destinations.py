"""The ``destinations:`` of routes.yaml: kind, retry, on_failure and lanes (the kind's own options are
checked when the destination is built, engine/destinations/)."""

from __future__ import annotations

from engine.config.model import FAILURE_POLICIES, DestinationConfig, RetryConfig
from engine.config.reader import _Section
from engine.errors import ConfigError


def _retry(sec: _Section) -> RetryConfig:
    r = RetryConfig(
        max_attempts=sec.integer("max_attempts", 5),
        backoff=sec.number("backoff", 2.0),
        max_backoff=sec.number("max_backoff", 300.0),
        jitter=sec.number("jitter", 0.2),
    )
    sec.done()
    if r.max_attempts < 1:
        raise ConfigError("max_attempts must be at least 1", file=sec.file, key=sec.key("max_attempts"))
    return r


def _destination(name: str, sec: _Section) -> DestinationConfig:
    kind = sec.text("kind")
    if not kind:
        raise ConfigError("missing 'kind'", file=sec.file, key=sec.key("kind"), hint="e.g. kind: file")
    retry = _retry(sec.sub("retry"))
    on_failure = sec.text("on_failure", "block", choices=FAILURE_POLICIES)
    lanes = sec.integer("lanes", 4)
    options = {k: v for k, v in sec.data.items() if k not in ("kind", "retry", "on_failure", "lanes")}
    return DestinationConfig(name, kind, options, retry, on_failure, lanes)
