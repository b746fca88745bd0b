"""One channel file (``channels/<name>.yaml``) → a :class:`ChannelConfig`, and the map files its
transform steps name."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from engine import overlays
from engine.config.model import (
    ACK_MODES,
    DEFAULT_TYPES,
    DEFAULT_VERSIONS,
    ChannelConfig,
    DedupeConfig,
    DestinationConfig,
    RetentionConfig,
    RouteConfig,
    SourceConfig,
)
from engine.config.problems import Problems, attempt
from engine.config.reader import _read_yaml, _Section
from engine.config.sources import _source
from engine.errors import ConfigError
from engine.hl7 import parse_path
from engine.suggest import did_you_mean

# order_by of a FHIR source: Type.element.element... (the subset of FHIRPath engine/sources/resources.py reads)
_FHIR_PATH = re.compile(r"^[A-Z][A-Za-z]*(\.[a-z][A-Za-z0-9]*)+$")


def _types(sec_value: Any, file: str, key: str) -> dict[str, tuple[str, ...]]:
    if sec_value is None:
        return dict(DEFAULT_TYPES)
    out: dict[str, tuple[str, ...]] = {}
    if isinstance(sec_value, list):
        for t in sec_value:
            t = str(t).upper()
            out[t] = DEFAULT_TYPES.get(t, ())
        return out
    if isinstance(sec_value, Mapping):
        for t, triggers in sec_value.items():
            if triggers in (None, "*", "any"):
                out[str(t).upper()] = ()
            elif isinstance(triggers, list):
                out[str(t).upper()] = tuple(str(x).upper() for x in triggers)
            else:
                raise ConfigError("triggers must be a list or '*'", file=file, key=f"{key}.{t}")
        return out
    raise ConfigError("expected a list of types or a map of type → triggers", file=file, key=key)


def _check_path(p: str, file: str, key: str) -> str:
    try:
        parse_path(p)
    except ValueError as exc:
        raise ConfigError(str(exc), file=file, key=key) from exc
    return p


def load_channel(
    path: Path,
    destinations: Mapping[str, DestinationConfig],
    overrides: Mapping[str, Any] | None = None,
    problems: Problems | None = None,
) -> ChannelConfig:
    """One channel file; ``overrides`` maps channel names to a partial channel merged over the file
    (``channel_overrides`` of an environment, engine/overlays.py).

    ``problems`` given (``sluice check``): the error of each independent part (source, accept, each route,
    dedupe, ...) is kept there and the part read as its default, so every error of the file is reported;
    a file that is not YAML or not a mapping still raises."""
    file = str(path)
    data = _read_yaml(path)
    if overrides and isinstance(data, Mapping):
        override = overrides.get(str(data.get("name") or path.stem))
        if override is not None:
            data = overlays.deep_merge(data, override)
            file = f"{file} + channel_overrides"
    sec = _Section(data, file, "")
    name = attempt(problems, lambda: sec.text("name"), None) or path.stem
    source = attempt(problems, lambda: _source(sec.sub("source")), SourceConfig(port=0))
    accepted: _Accepted = (dict(DEFAULT_TYPES), DEFAULT_VERSIONS, ("P", "T", "D"))
    types, versions, pids = attempt(problems, lambda: _accept(sec.sub("accept")), accepted)
    site_tz = attempt(problems, lambda: _site_tz(sec), "America/Los_Angeles")
    nothing: list[Any] = []
    routes: list[RouteConfig] = []
    for i, r in enumerate(attempt(problems, lambda: sec.items("routes"), nothing)):
        route = attempt(problems, partial(_route, i, r, file, destinations, problems), None)
        if route is not None:
            routes.append(route)
    order_by = attempt(problems, lambda: _order_by(sec, source), None)
    require: list[str] = []
    for i, x in enumerate(attempt(problems, lambda: sec.items("require"), nothing)):
        checked = attempt(problems, partial(_check_path, str(x), file, f"require[{i}]"), None)
        if checked is not None:
            require.append(checked)
    dedupe = attempt(problems, lambda: _dedupe(sec.sub("dedupe")), DedupeConfig())
    retention = attempt(problems, lambda: _retention(sec.sub("retention")), RetentionConfig())
    transform = attempt(problems, lambda: sec.items("transform"), nothing)
    validate = attempt(problems, lambda: _validate(sec, file), "off")
    ch = ChannelConfig(
        name=name,
        file=str(path),
        source=source,
        types=types,
        versions=versions,
        processing_ids=pids,
        site_tz=site_tz,
        ack=attempt(problems, lambda: sec.text("ack", "on-commit", choices=ACK_MODES), "on-commit"),
        require=tuple(require),
        filter=sec.get("filter"),
        transform=tuple(transform),
        routes=tuple(routes),
        order_by=order_by,
        dedupe=dedupe,
        retention=retention,
        batch=attempt(problems, lambda: sec.text("batch", "accept", choices=("accept", "reject")), "accept"),
        enabled=attempt(problems, lambda: sec.flag("enabled", True), True),
        validate=validate,
        strictness=attempt(
            problems, lambda: sec.text("strictness", "lenient", choices=("lenient", "strict")), "lenient"
        ),
    )
    attempt(problems, sec.done, None)
    return ch


_Accepted = tuple[dict[str, tuple[str, ...]], tuple[str, ...], tuple[str, ...]]


def _accept(accept: _Section) -> _Accepted:
    """``accept:``: message type → triggers, versions, processing ids."""
    types = _types(accept.get("types"), accept.file, "accept.types")
    versions = tuple(str(v) for v in accept.items("versions")) or DEFAULT_VERSIONS
    pids = tuple(str(v).upper() for v in accept.items("processing_ids")) or ("P", "T", "D")
    accept.done()
    return types, versions, pids


def _site_tz(sec: _Section) -> str:
    site_tz: str = sec.text("site_tz", "America/Los_Angeles")
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(site_tz)
    except Exception as exc:
        raise ConfigError(
            f"unknown time zone {site_tz!r}",
            file=sec.file,
            key="site_tz",
            hint="use an IANA name like America/New_York",
        ) from exc
    return site_tz


def _route(
    i: int, r: Any, file: str, destinations: Mapping[str, DestinationConfig], problems: Problems | None
) -> RouteConfig | None:
    """``routes[i]``: a destination name, or ``{destination, filter}``; None (checking) for a route to a
    destination whose own section is broken (that error is reported there)."""
    rs = _Section(r if isinstance(r, Mapping) else {"destination": r}, file, f"routes[{i}]")
    dest = rs.text("destination")
    if dest not in destinations:
        if problems is not None and dest in problems.broken_destinations:
            return None
        known = ", ".join(sorted(destinations)) or "none defined"
        raise ConfigError(
            f"unknown destination {dest!r}",
            file=file,
            key=f"routes[{i}].destination",
            hint=f"define it under destinations: in routes.yaml (known: {known})",
        )
    route = RouteConfig(dest, rs.get("filter"))
    rs.done()
    return route


def _order_by(sec: _Section, source: SourceConfig) -> str | None:
    order_by: str | None = sec.text("order_by")
    if order_by and source.kind == "mllp":
        _check_path(order_by, sec.file, "order_by")
    elif order_by and not _FHIR_PATH.match(order_by):
        raise ConfigError(
            f"order_by {order_by!r} is not a FHIRPath of element names",
            file=sec.file,
            key="order_by",
            hint="a FHIR source orders by a path such as Appointment.participant.actor.reference",
        )
    return order_by


def _dedupe(ds: _Section) -> DedupeConfig:
    dedupe = DedupeConfig(
        enabled=ds.flag("enabled", True),
        window_days=ds.number("window_days", 7.0),
        on_conflict=ds.text("on_conflict", "reject", choices=("reject", "accept")),
    )
    ds.done()
    return dedupe


def _retention(rt: _Section) -> RetentionConfig:
    retention = RetentionConfig(
        bodies_days=rt.number("bodies_days", None), rows_days=rt.number("rows_days", None)
    )
    rt.done()
    return retention


def _validate(sec: _Section, file: str) -> str:
    validate = "off"
    if sec.get("validate") is not False:  # YAML reads a bare `off` as false
        validate = sec.text("validate", "off", choices=("off", "structure"))
    if validate == "structure":
        from engine.validation import require_hl7apy

        require_hl7apy(file)
    return validate


def referenced_files(transform: Any, base: Path) -> tuple[tuple[str, str], ...]:
    """(path, BLAKE2b of the bytes) of every map file a channel's transform steps name: each text value
    ending in .csv/.yaml/.yml that resolves as the steps resolve a map (transforms/settings.py)."""
    import hashlib

    from transforms.settings import resolve_map_path

    refs: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, str):
            if v.lower().endswith((".csv", ".yaml", ".yml")):
                refs.append(v)
        elif isinstance(v, Mapping):
            for x in v.values():
                walk(x)
        elif isinstance(v, list | tuple):
            for x in v:
                walk(x)

    walk(transform)
    out: dict[str, str] = {}
    for ref in refs:
        path = resolve_map_path(ref, base)
        if path is None:
            continue  # a missing map is the step's error to report, with its key
        try:
            out[str(path)] = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
        except OSError:
            continue
    return tuple(sorted(out.items()))


def _converts(transform: Any) -> bool:
    """Whether a channel's transform steps include ``hl7-to-fhir``."""
    return any(s == "hl7-to-fhir" or (isinstance(s, Mapping) and "hl7-to-fhir" in s) for s in transform or ())


def accept_warnings(ch: ChannelConfig) -> list[str]:
    """What ``sluice check`` warns about in ``accept.types`` (never an error: a sender may use local codes):
    a message type that is not in HL7 table 0076 and not converted, a trigger that is not in table 0003,
    and, on a channel with an ``hl7-to-fhir`` step, a type or trigger the converter has no mapping for
    (DEFAULT_TYPES is the converter's list: what an ``accept`` without ``types`` accepts)."""
    from engine import redact

    out: list[str] = []
    converts = _converts(ch.transform)
    for mtype, triggers in ch.types.items():
        where = f"{ch.file}: accept.types.{mtype}"
        known = DEFAULT_TYPES.get(mtype)
        if known is None and mtype not in redact.MESSAGE_TYPES:
            # the types the converter maps first: ADX is more likely ADT than ARD
            guess = did_you_mean(mtype, DEFAULT_TYPES) or did_you_mean(mtype, sorted(redact.MESSAGE_TYPES))
            out.append(
                f"{where}: message type {mtype!r} is not an HL7 message type (table 0076)"
                + (f" ({guess})" if guess else "")
                + "; messages of that type are accepted as written"
            )
        elif known is None and converts:
            out.append(
                f"{where}: the hl7-to-fhir step has no mapping for message type {mtype!r}, so such messages "
                f"fail it (it converts {', '.join(sorted(DEFAULT_TYPES))})"
            )
        for trigger in triggers:
            if trigger not in redact.TRIGGERS:
                guess = _trigger_guess(trigger, known or sorted(redact.TRIGGERS))
                out.append(
                    f"{where}: trigger {trigger!r} of {mtype} is not an HL7 trigger event (table 0003)"
                    + (f" ({guess})" if guess else "")
                    + "; messages with it are accepted as written"
                )
            elif known is not None and trigger not in known and converts:
                out.append(
                    f"{where}: the hl7-to-fhir step has no mapping for {mtype}^{trigger}, so such messages "
                    f"fail it (it converts {mtype} {', '.join(known)})"
                )
    return out


_LOOKALIKES = str.maketrans({"L": "1", "I": "1", "O": "0", "S": "5"})


def _trigger_guess(trigger: str, known: Sequence[str]) -> str:
    """``did you mean 'A01'?`` for ``A0L``: a letter typed for the digit it looks like (l/I → 1, O → 0,
    S → 5) after the first character, else the closest known code."""
    fixed = trigger[:1] + trigger[1:].translate(_LOOKALIKES)
    if fixed != trigger and fixed in known:
        return f"did you mean {fixed!r}?"
    return did_you_mean(trigger, known)
