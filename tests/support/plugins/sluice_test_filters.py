"""A test plugin filter, registered exactly as a user's plugin would be (routes.yaml ``plugins:``),
with the decorator the built-in filters use.

In a channel: ``filter: {control_id_prefix: KEEP}`` accepts messages whose MSH-10 starts with
``KEEP``; a list accepts any of the prefixes.
"""

from __future__ import annotations

from typing import Any

from engine import registry
from engine.errors import ConfigError
from engine.hl7 import Message
from engine.pipeline import Predicate, StageContext

NOT_CALLABLE = "a filter reference must name a function"


@registry.filter_("control_id_prefix")
def control_id_prefix(arg: Any, ctx: StageContext) -> Predicate:
    prefixes = tuple(str(a) for a in arg) if isinstance(arg, list) else (str(arg),)
    if not all(prefixes):
        raise ConfigError("control_id_prefix needs a non-empty prefix", file=ctx.config_file, key=ctx.key)
    return lambda m: m.control_id.startswith(prefixes)


def inpatient(message: Message) -> bool:
    """A plain ``{python: module:function}`` filter."""
    return message["PV1-2"] == "I"
