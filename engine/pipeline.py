"""The channel pipeline: filter → transform steps, as a short pure loop.

The stage contract is one sentence (Benthos'): a step takes a :class:`Work` and
returns a new one, or ``None`` when the message is filtered; an exception marks
the message failed with a reason, it is never dropped.  No I/O happens here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.hl7 import Message


@dataclass(frozen=True)
class Work:
    """A message moving through a channel's steps."""

    message: Message
    raw: bytes
    payload: bytes  # current output; starts as the raw HL7 bytes
    content_type: str
    meta: Mapping[str, str] = field(default_factory=dict)
    # Facts a step tells the engine, e.g. ``{"guards": [(key, rank)], "requires": [key]}``
    facts: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageContext:
    """What a step factory may know about its channel."""

    channel: str
    base_dir: Path
    config_file: str
    site_tz: str = "UTC"
    # the channel's ``strictness`` (lenient | strict): what a transform does with a bad non-key value
    strictness: str = "lenient"
    # Where the stage sits in the channel file (``filter.all[1]``, ``transform[0]``): the ``key`` of a
    # ConfigError the factory raises.
    key: str = ""


Step = Callable[[Work], "Work | None"]
Predicate = Callable[[Message], bool]


@dataclass(frozen=True)
class Pipeline:
    filter: Predicate | None
    steps: tuple[Step, ...]

    def accepts(self, message: Message) -> bool:
        return self.filter is None or bool(self.filter(message))

    def run(self, work: Work) -> Work | None:
        """Run the filter and every step; ``None`` means filtered."""
        if not self.accepts(work.message):
            return None
        out = work
        for step in self.steps:
            nxt = step(out)
            if nxt is None:
                return None
            out = nxt
        return out
