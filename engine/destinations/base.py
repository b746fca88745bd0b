"""The destination contract.

A destination takes one :class:`Outbound` and either returns (delivered) or
raises :class:`engine.errors.DeliveryError` (``retryable`` decides between
retry-with-backoff and dead-letter).  Queueing, retries, backoff, ordering,
concurrency and rate limits live in the delivery worker, not here, so a new
kind is one registered class with ``start``/``deliver``/``close``.

A delivery made of several requests (a FHIR bundle split into transactions) may keep its progress across
retries and engine restarts: a kind that sets ``keeps_progress`` gets the state it saved last in
:attr:`Outbound.progress` and saves new state with :meth:`Destination.save_progress`; the delivery worker
writes it through the committer (durable before ``save_progress`` returns) and forgets it once the delivery
is delivered or dead-lettered.  Kinds that do not set it pay nothing: no progress is read or written.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from engine.errors import ConfigError

CONTENT_HL7 = "x-application/hl7-v2+er7"
CONTENT_FHIR = "application/fhir+json"
CONTENT_JSON = "application/json"


@dataclass(frozen=True)
class Outbound:
    """One message on its way to one destination."""

    message_id: int
    channel: str
    destination: str
    control_id: str
    message_type: str
    trigger: str
    raw: bytes  # the original HL7 v2 bytes as received
    payload: bytes  # the channel's output for this destination (FHIR JSON, HL7, JSON ...)
    content_type: str
    attempt: int = 1
    meta: Mapping[str, str] = field(default_factory=dict)
    delivery_id: int = 0  # the delivery row (0 = not from the store, e.g. a direct call in a test)
    # What this delivery saved with Destination.save_progress on an earlier attempt (None = nothing);
    # filled only for kinds with keeps_progress.
    progress: Mapping[str, Any] | None = None


# Records a delivery's progress durably (the delivery worker's, through the committer).
ProgressSink = Callable[[Outbound, Mapping[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class DestinationContext:
    """What a destination may know about the engine around it."""

    base_dir: Path  # directory of routes.yaml; relative paths resolve against it
    config_file: str = "routes.yaml"


class Destination:
    """Base class.  Subclasses set ``kind`` and ``options`` (allowed option keys → default)."""

    kind: ClassVar[str] = ""
    # allowed keys of this kind's options, with defaults (None = required)
    options: ClassVar[Mapping[str, Any]] = {}
    # A kind may also define ``async deliver_many(items) -> list[str | BaseException | None]``: several
    # items in one call, in order, stopping at the first failure (later items None = not attempted).
    # With batch_across_keys the delivery worker passes rows of different order keys in one call.
    batch_across_keys: ClassVar[bool] = False
    # A kind whose delivery is several requests sets this to keep its progress between attempts (and engine
    # restarts): Outbound.progress then carries the state saved last, save_progress stores a new one.
    keeps_progress: ClassVar[bool] = False
    progress_sink: ProgressSink | None = None  # set by the delivery worker when keeps_progress

    def __init__(self, name: str, options: Mapping[str, Any], ctx: DestinationContext):
        self.name = name
        self.ctx = ctx
        self.opts = self.check_options(name, options, ctx)

    @classmethod
    def check_options(cls, name: str, options: Mapping[str, Any], ctx: DestinationContext) -> dict[str, Any]:
        """Unknown keys and missing required keys are config errors naming the key path."""
        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)} for a {cls.kind} destination",
                file=ctx.config_file,
                key=f"destinations.{name}",
                hint=f"allowed: {', '.join(sorted(cls.options)) or 'none'}",
            )
        out: dict[str, Any] = {}
        for key, default in cls.options.items():
            if key in options:
                out[key] = options[key]
            elif default is None:
                raise ConfigError(
                    f"missing required option {key!r} for a {cls.kind} destination",
                    file=ctx.config_file,
                    key=f"destinations.{name}.{key}",
                )
            else:
                out[key] = default
        return out

    async def start(self) -> None:
        """Open connections, declare exchanges...  Called once before the first delivery."""

    async def deliver(self, item: Outbound) -> str:
        """Deliver one item; return a short non-PHI detail (a path, an ACK code, a status)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections.  Called once at shutdown."""

    async def save_progress(self, item: Outbound, state: Mapping[str, Any]) -> None:
        """Record how far ``item``'s delivery got (JSON-serialisable ``state``, no PHI): a later attempt of
        the same delivery, in this process or after a restart, finds it in ``Outbound.progress``.  Durable
        once this returns; a no-op without a sink (a direct call, or a kind without keeps_progress)."""
        if self.progress_sink is not None:
            await self.progress_sink(item, state)


def secret(spec: Any, *, what: str, ctx: DestinationContext, key: str) -> str:
    """Resolve a secret from ``{env: NAME}`` or ``{file: path}``; literal strings are refused.

    Secrets never live in YAML committed to git.
    """
    if isinstance(spec, Mapping):
        if set(spec) == {"env"}:
            value = os.environ.get(str(spec["env"]))
            if value is None:
                raise ConfigError(
                    f"{what}: environment variable {spec['env']} is not set",
                    file=ctx.config_file,
                    key=key,
                    hint=f"export {spec['env']}=... before starting sluice",
                )
            return value
        if set(spec) == {"file"}:
            path = Path(str(spec["file"]))
            if not path.is_absolute():
                path = ctx.base_dir / path
            try:
                return path.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"{what}: cannot read secret file {path}: {exc}", file=ctx.config_file, key=key
                ) from exc
    raise ConfigError(
        f"{what} must come from the environment or a file, not from the YAML",
        file=ctx.config_file,
        key=key,
        hint="write {env: VARIABLE_NAME} or {file: /run/secrets/name}",
    )
