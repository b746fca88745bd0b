"""One channel file (``channels/<name>.yaml``) → a :class:`ChannelConfig`, and the map files its
transform steps name."""

from __future__ import annotations

import re
from collections.abc import Mapping
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
)
from engine.config.reader import _read_yaml, _Section
from engine.config.sources import _source
from engine.errors import ConfigError
from engine.hl7 import parse_path

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
    path: Path, destinations: Mapping[str, DestinationConfig], overrides: Mapping[str, Any] | None = None
) -> ChannelConfig:
    """One channel file; ``overrides`` maps channel names to a partial channel merged over the file
    (``channel_overrides`` of an environment, engine/overlays.py)."""
    file = str(path)
    data = _read_yaml(path)
    if overrides and isinstance(data, Mapping):
        override = overrides.get(str(data.get("name") or path.stem))
        if override is not None:
            data = overlays.deep_merge(data, override)
            file = f"{file} + channel_overrides"
    sec = _Section(data, file, "")
    name = sec.text("name") or path.stem
    source = _source(sec.sub("source"))
    accept = sec.sub("accept")
    types = _types(accept.get("types"), file, "accept.types")
    versions = tuple(str(v) for v in accept.items("versions")) or DEFAULT_VERSIONS
    pids = tuple(str(v).upper() for v in accept.items("processing_ids")) or ("P", "T", "D")
    accept.done()
    site_tz = sec.text("site_tz", "America/Los_Angeles")
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(site_tz)
    except Exception as exc:
        raise ConfigError(
            f"unknown time zone {site_tz!r}",
            file=file,
            key="site_tz",
            hint="use an IANA name like America/New_York",
        ) from exc
    routes: list[RouteConfig] = []
    for i, r in enumerate(sec.items("routes")):
        rs = _Section(r if isinstance(r, Mapping) else {"destination": r}, file, f"routes[{i}]")
        dest = rs.text("destination")
        if dest not in destinations:
            known = ", ".join(sorted(destinations)) or "none defined"
            raise ConfigError(
                f"unknown destination {dest!r}",
                file=file,
                key=f"routes[{i}].destination",
                hint=f"define it under destinations: in routes.yaml (known: {known})",
            )
        routes.append(RouteConfig(dest, rs.get("filter")))
        rs.done()
    order_by = sec.text("order_by")
    if order_by and source.kind == "mllp":
        _check_path(order_by, file, "order_by")
    elif order_by and not _FHIR_PATH.match(order_by):
        raise ConfigError(
            f"order_by {order_by!r} is not a FHIRPath of element names",
            file=file,
            key="order_by",
            hint="a FHIR source orders by a path such as Appointment.participant.actor.reference",
        )
    require = tuple(_check_path(str(p), file, f"require[{i}]") for i, p in enumerate(sec.items("require")))
    ds = sec.sub("dedupe")
    dedupe = DedupeConfig(
        enabled=ds.flag("enabled", True),
        window_days=ds.number("window_days", 7.0),
        on_conflict=ds.text("on_conflict", "reject", choices=("reject", "accept")),
    )
    ds.done()
    rt = sec.sub("retention")
    retention = RetentionConfig(
        bodies_days=rt.number("bodies_days", None), rows_days=rt.number("rows_days", None)
    )
    rt.done()
    transform = sec.items("transform")
    validate = "off"
    if sec.get("validate") is not False:  # YAML reads a bare `off` as false
        validate = sec.text("validate", "off", choices=("off", "structure"))
    if validate == "structure":
        from engine.validation import require_hl7apy

        require_hl7apy(file)
    ch = ChannelConfig(
        name=name,
        file=str(path),
        source=source,
        types=types,
        versions=versions,
        processing_ids=pids,
        site_tz=site_tz,
        ack=sec.text("ack", "on-commit", choices=ACK_MODES),
        require=require,
        filter=sec.get("filter"),
        transform=tuple(transform),
        routes=tuple(routes),
        order_by=order_by,
        dedupe=dedupe,
        retention=retention,
        batch=sec.text("batch", "accept", choices=("accept", "reject")),
        enabled=sec.flag("enabled", True),
        validate=validate,
        strictness=sec.text("strictness", "lenient", choices=("lenient", "strict")),
    )
    sec.done()
    return ch


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
