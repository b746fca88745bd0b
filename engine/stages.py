"""Built-in filters and transform steps, and the builder that turns channel YAML into a Pipeline.

Filters are declarative::

    filter:
      all:
        - {field: MSH-9.1, in: [ADT, ORU]}
        - {field: PV1-2, equals: I}
        - not: {field: PID-3.1, regex: "^TEST"}
        - {field: PID-3, exists: true}
        - any: [...]
        - {python: mypkg.filters:only_inpatients}
        - {my_filter: argument}     # a plugin's @registry.filter_("my_filter")

Built-in filters register with the same decorator as a plugin's, so both go through one path.

Transform steps are a list of registered names (with options) or ``module:function`` refs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson

from engine import registry
from engine.destinations.base import CONTENT_HL7, CONTENT_JSON
from engine.errors import ConfigError
from engine.hl7 import parse_path
from engine.pipeline import Pipeline, Predicate, StageContext, Step, Work

if TYPE_CHECKING:
    from engine.config.problems import Problems


def build_filter(spec: Any, ctx: StageContext, key: str = "filter") -> Predicate | None:
    """A predicate from a filter spec; ConfigError naming the key path on mistakes.

    Every filter, built-in or a plugin's, is a factory registered with ``@registry.filter_(name)``
    and called as ``factory(argument, ctx)`` (``ctx.key`` is the spec's key path).  A spec names
    its filter: ``{name: argument}``; a field condition ``{field: ..., equals: ...}`` is the filter
    ``field`` with the whole mapping as its argument; a ``"module:function"`` string is ``python``.
    """
    if spec is None:
        return None
    name: Any = None
    arg: Any = spec
    if isinstance(spec, str) and ":" in spec:
        name = "python"
    elif not isinstance(spec, Mapping):
        raise ConfigError("a filter must be a mapping or 'module:function'", file=ctx.config_file, key=key)
    elif "field" in spec:
        name = "field"
    elif len(spec) == 1:
        ((name, arg),) = spec.items()
    factory = registry.FILTERS.get(name)
    if factory is None:
        raise ConfigError(
            f"unknown filter {dict(spec)!r}",
            file=ctx.config_file,
            key=key,
            hint="use all/any/not, {field: ..., equals|in|regex|exists: ...}, or {python: module:function}",
        )
    pred: Predicate = factory(arg, replace(ctx, key=key))
    return pred


# ---------------------------------------------------------------------------
# built-in filters


def _conditions(op: str, arg: Any, ctx: StageContext) -> list[Predicate]:
    if not isinstance(arg, list) or not arg:
        raise ConfigError(
            f"'{op}' needs a non-empty list of conditions", file=ctx.config_file, key=f"{ctx.key}.{op}"
        )
    parts = [build_filter(a, ctx, f"{ctx.key}.{op}[{i}]") for i, a in enumerate(arg)]
    return [p for p in parts if p is not None]


@registry.filter_("all")
def all_of(arg: Any, ctx: StageContext) -> Predicate:
    """``all: [conditions]``: every condition holds."""
    preds = _conditions("all", arg, ctx)
    return lambda m: all(p(m) for p in preds)


@registry.filter_("any")
def any_of(arg: Any, ctx: StageContext) -> Predicate:
    """``any: [conditions]``: at least one condition holds."""
    preds = _conditions("any", arg, ctx)
    return lambda m: any(p(m) for p in preds)


@registry.filter_("not")
def not_(arg: Any, ctx: StageContext) -> Predicate:
    """``not: condition``."""
    inner = build_filter(arg, ctx, f"{ctx.key}.not")
    if inner is None:
        raise ConfigError("'not' needs a condition", file=ctx.config_file, key=f"{ctx.key}.not")
    return lambda m: not inner(m)


@registry.filter_("python")
def python(arg: Any, ctx: StageContext) -> Predicate:
    """``python: module:function``: a function(message) -> bool, looked up next to routes.yaml."""
    fn = registry.import_from_string(str(arg), [ctx.base_dir])
    if not callable(fn):
        raise ConfigError(f"{fn!r} is not callable")
    return fn


_OPS = ("equals", "in", "regex", "exists", "not_equals")


@registry.filter_("field")
def field(spec: Mapping[str, Any], ctx: StageContext) -> Predicate:
    """``{field: PATH, equals|not_equals|in|regex|exists: ...}``: a condition on one field's text."""
    key = ctx.key
    path = str(spec["field"])
    try:
        parse_path(path)
    except ValueError as exc:
        raise ConfigError(str(exc), file=ctx.config_file, key=f"{key}.field") from exc
    ops = [k for k in spec if k != "field"]
    if len(ops) != 1 or ops[0] not in _OPS:
        raise ConfigError(
            f"a field condition needs exactly one of {', '.join(_OPS)}",
            file=ctx.config_file,
            key=key,
            hint="e.g. {field: MSH-9.1, in: [ADT, ORU]}",
        )
    op = ops[0]
    arg = spec[op]
    if op == "equals":
        want = str(arg)
        return lambda m: m[path] == want
    if op == "not_equals":
        want = str(arg)
        return lambda m: m[path] != want
    if op == "in":
        if not isinstance(arg, list):
            raise ConfigError("'in' needs a list", file=ctx.config_file, key=f"{key}.in")
        values = {str(a) for a in arg}
        return lambda m: m[path] in values
    if op == "regex":
        try:
            rx = re.compile(str(arg))
        except re.error as exc:
            raise ConfigError(
                f"bad regular expression: {exc}", file=ctx.config_file, key=f"{key}.regex"
            ) from exc
        return lambda m: rx.search(m[path]) is not None
    want_exists = bool(arg)  # exists
    return lambda m: bool(m[path].strip()) == want_exists


def build_step(spec: Any, ctx: StageContext, key: str) -> Step:
    """One transform step from its spec: ``name``, ``{name: {options}}`` or ``module:function``."""
    options: Mapping[str, Any] = {}
    if isinstance(spec, Mapping) and len(spec) == 1:
        ((name, opts),) = spec.items()
        options = opts or {}
        if not isinstance(options, Mapping):
            raise ConfigError("step options must be a mapping", file=ctx.config_file, key=f"{key}.{name}")
    elif isinstance(spec, str):
        name = spec
    else:
        raise ConfigError(
            "a step is a name, {name: {options}} or 'module:function'", file=ctx.config_file, key=key
        )
    name = str(name)
    if name in registry.TRANSFORMS:
        return registry.TRANSFORMS[name](options, replace(ctx, key=key))
    if ":" in name:
        try:
            fn = registry.import_from_string(name, [ctx.base_dir, ctx.base_dir / "transforms"])
        except ConfigError as exc:  # located: the channel file and the step
            if exc.file:
                raise
            raise ConfigError(exc.message, file=ctx.config_file, key=key, hint=exc.hint) from exc
        if not callable(fn):
            raise ConfigError(f"{name} is not callable", file=ctx.config_file, key=key)
        if options:
            return lambda w: fn(w, options)
        return fn
    known = ", ".join(sorted(registry.TRANSFORMS))
    raise ConfigError(
        f"unknown transform step {name!r}", file=ctx.config_file, key=key, hint=f"built-in steps: {known}"
    )


def build_pipeline(
    filter_spec: Any, steps: tuple[Any, ...], ctx: StageContext, problems: Problems | None = None
) -> Pipeline:
    """The channel's filter and transform steps; with ``problems`` (``sluice check``) the filter and each
    step are built on their own and every error is kept there (the pipeline is then only for reporting)."""
    registry.load_builtins()
    if problems is None:
        return Pipeline(
            filter=build_filter(filter_spec, ctx),
            steps=tuple(build_step(s, ctx, f"transform[{i}]") for i, s in enumerate(steps)),
        )
    built = [
        problems.attempt(partial(build_step, s, ctx, f"transform[{i}]"), None) for i, s in enumerate(steps)
    ]
    return Pipeline(
        filter=problems.attempt(partial(build_filter, filter_spec, ctx), None),
        steps=tuple(step for step in built if step is not None),
    )


# ---------------------------------------------------------------------------
# built-in steps


@registry.transform("passthrough")
def passthrough(options: Mapping[str, Any], ctx: StageContext) -> Step:
    """Deliver the HL7 message unchanged."""
    if options:
        raise ConfigError("passthrough takes no options", file=ctx.config_file, key=ctx.key or "transform")

    def step(work: Work) -> Work:
        return replace(work, payload=work.raw, content_type=CONTENT_HL7)

    return step


@registry.transform("hl7-to-json")
def hl7_to_json(options: Mapping[str, Any], ctx: StageContext) -> Step:
    """A plain JSON view of the message: ``{"segments": [{"name": "PID", "fields": [...]}, ...]}``."""
    if options:
        raise ConfigError("hl7-to-json takes no options", file=ctx.config_file, key=ctx.key or "transform")

    def step(work: Work) -> Work:
        segs = [
            {"name": s.name, "fields": [s.value(i) for i in range(1, len(s.fields))]} for s in work.message
        ]
        doc = {
            "type": work.message.message_type,
            "trigger": work.message.trigger,
            "control_id": work.message.control_id,
            "version": work.message.version,
            "segments": segs,
        }
        return replace(work, payload=orjson.dumps(doc), content_type=CONTENT_JSON)

    return step
