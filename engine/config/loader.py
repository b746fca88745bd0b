"""``load``: routes.yaml (with its environment overlay) and its channels → a frozen :class:`Config`."""

from __future__ import annotations

import glob
import os
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from engine import overlays
from engine.alerts.config import AlertsConfig, parse_alerts
from engine.config.admin import _admin
from engine.config.channels import load_channel, referenced_files
from engine.config.destinations import _destination
from engine.config.model import (
    AdminConfig,
    ChannelConfig,
    Config,
    DestinationConfig,
    LimitsConfig,
    LoggingConfig,
    SourceConfig,
)
from engine.config.problems import Problems, attempt, report
from engine.config.reader import _read_yaml, _Section
from engine.config.settings import _limits, _log_flood, _resolve_sqlite, _store_encryption
from engine.errors import ConfigError

ENV_PREFIX = "SLUICE_"


def load(
    path: str | Path = "routes.yaml",
    overrides: Mapping[str, Any] | None = None,
    *,
    env: str | None = None,
    problems: Problems | None = None,
) -> Config:
    """Load routes.yaml (plus the overlay of ``env``, or of ``SLUICE_ENV``) and its channels.

    ``overrides`` (from CLI flags) and ``SLUICE_STORE``, ``SLUICE_HOST``, ``SLUICE_PORT``,
    ``SLUICE_LOG_FORMAT``, ``SLUICE_LOG_LEVEL``, ``SLUICE_NODE_ID`` win over the file.
    ``host``/``port`` overrides apply to the first channel (the demo case).

    The first error raises, unless ``problems`` is given (``sluice check``): then each section of
    routes.yaml, each destination and each channel file is read on its own, its errors kept in
    ``problems`` (a channel file that cannot be read at all stands in as a disabled, empty channel of its
    file's name), and the returned config is only good for reporting.  A routes.yaml that cannot be read
    as a mapping still raises.
    """
    p = Path(path)
    file = str(p)
    if not p.exists():
        raise ConfigError(
            "config file not found", file=file, hint="run sluice from the project folder or pass --config"
        )
    base = p.resolve().parent
    env_name = (env if env is not None else os.environ.get(ENV_PREFIX + "ENV")) or None
    sec = _Section(_with_overlay(p, env_name), file if not env_name else f"{file} + {env_name} overlay", "")
    environ = os.environ
    ov = dict(overrides or {})
    file_store = attempt(
        problems, lambda: sec.text("store", "sqlite:///var/sluice.db"), "sqlite:///var/sluice.db"
    )
    store_url = ov.get("store") or environ.get(ENV_PREFIX + "STORE") or file_store
    store_url = _resolve_sqlite(store_url, base)
    store_encryption = attempt(problems, lambda: _store_encryption(sec.sub("store_encryption"), base), None)
    dsec = attempt(problems, lambda: sec.sub("destinations"), _Section({}, sec.file, "destinations"))
    destinations: dict[str, DestinationConfig] = {}
    for name in list(dsec.data):
        dest = attempt(problems, partial(lambda n: _destination(n, dsec.sub(n)), str(name)), None)
        if dest is not None:
            destinations[str(name)] = dest
        elif problems is not None:
            problems.broken_destinations.add(str(name))
    dsec.used.update(dsec.data)
    logging = attempt(problems, lambda: _logging(sec.sub("logging")), LoggingConfig())
    limits = attempt(problems, lambda: _limits(sec.sub("limits")), LimitsConfig())
    admin = attempt(
        problems,
        lambda: _admin(
            sec.sub("admin"), base, ov.get("admin_port") or environ.get(ENV_PREFIX + "ADMIN_PORT")
        ),
        AdminConfig(),
    )
    nothing: list[Any] = []
    plugin_paths = tuple(
        (base / str(x)).resolve() for x in attempt(problems, lambda: sec.items("plugin_paths"), nothing)
    )
    plugins = tuple(str(x) for x in attempt(problems, lambda: sec.items("plugins"), nothing))
    patterns = sec.get("channels", "channels/*.yaml")
    if isinstance(patterns, str):
        patterns = [patterns]
    files: list[Path] = []
    for pat in patterns:
        matched = sorted(glob.glob(str(base / str(pat))))
        files.extend(Path(m) for m in matched if not m.endswith("_test.yaml"))
    default_workers = max(1, os.cpu_count() or 1)  # niced: they use the CPU the listener leaves
    workers = attempt(
        problems, lambda: _workers(sec.sub("processing"), default_workers, file), default_workers
    )
    pid_text = attempt(problems, lambda: sec.text("pid_file", "var/sluice.pid"), "var/sluice.pid")
    pid_file = str((base / pid_text).resolve()) if pid_text else None
    file_node = attempt(problems, lambda: sec.text("node_id", "node-1"), "node-1")
    node_id = environ.get(ENV_PREFIX + "NODE_ID") or file_node
    # read once the channels are known (rules name them)
    alerts_sec = attempt(problems, lambda: sec.sub("alerts"), _Section({}, sec.file, "alerts"))
    no_overrides: Mapping[str, Any] = {}
    channel_overrides = attempt(problems, lambda: _channel_overrides(sec), no_overrides)
    attempt(problems, sec.done, None)
    channels: list[ChannelConfig] = []
    for f in files:
        ch = attempt(problems, partial(load_channel, f, destinations, channel_overrides, problems), None)
        # a file that cannot be read at all (checking): a disabled stand-in, so rules naming it stay quiet
        channels.append(ch or ChannelConfig(f.stem, str(f), SourceConfig(port=0), {}, enabled=False))
    channels = [replace(ch, files=referenced_files(ch.transform, base)) for ch in channels]
    unknown = sorted(set(map(str, channel_overrides)) - {c.name for c in channels})
    if unknown:
        report(
            problems,
            ConfigError(
                f"channel_overrides names no channel {unknown[0]!r}",
                file=sec.file,
                key=f"channel_overrides.{unknown[0]}",
                hint=f"known channels: {', '.join(c.name for c in channels)}",
            ),
        )
    if not channels:
        raise ConfigError(
            f"no channel files match {patterns}", file=file, key="channels", hint="add channels/<name>.yaml"
        )
    for n in _repeated(c.name for c in channels):
        report(
            problems,
            ConfigError(
                f"two channels are named {n!r}",
                file=file,
                key="channels",
                hint="channel names must be unique",
            ),
        )
    host = ov.get("host") or environ.get(ENV_PREFIX + "HOST")
    port = ov.get("port") or environ.get(ENV_PREFIX + "PORT")
    if host or port:
        first = channels[0]
        src = replace(
            first.source, host=host or first.source.host, port=int(port) if port else first.source.port
        )
        channels[0] = replace(first, source=src)
    for hp in _repeated((c.source.host, c.source.port) for c in channels if c.enabled and c.source.port):
        report(
            problems,
            ConfigError(
                f"two channels listen on {hp[0]}:{hp[1]}", file=file, hint="give each channel its own port"
            ),
        )
    return Config(
        file=file,
        base_dir=base,
        store_url=store_url,
        channels=tuple(channels),
        destinations=destinations,
        logging=logging,
        admin=admin,
        plugin_paths=plugin_paths,
        plugins=plugins,
        node_id=node_id,
        processing_workers=int(environ.get(ENV_PREFIX + "PROCESSING_WORKERS") or workers),
        alerts=attempt(problems, lambda: parse_alerts(alerts_sec, channels, destinations), AlertsConfig()),
        limits=limits,
        store_encryption=store_encryption,
        pid_file=pid_file,
        overrides=ov,
        env=env_name,
    )


def _logging(lsec: _Section) -> LoggingConfig:
    """``logging:``; the SLUICE_LOG_FORMAT and SLUICE_LOG_LEVEL variables win over the file."""
    environ = os.environ
    file_format = lsec.text("format", "auto", choices=("auto", "json", "console"))
    file_level = lsec.text("level", "info")
    logging = LoggingConfig(
        format=environ.get(ENV_PREFIX + "LOG_FORMAT") or file_format,
        level=environ.get(ENV_PREFIX + "LOG_LEVEL") or file_level,
        flood=_log_flood(lsec.sub("flood")),
    )
    lsec.done()
    return logging


def _workers(psec: _Section, default: int, file: str) -> int:
    workers = psec.integer("workers", default)
    psec.done()
    if workers < 0:
        raise ConfigError("processing.workers must be 0 or more", file=file, key="processing.workers")
    return workers


def _channel_overrides(sec: _Section) -> Mapping[str, Any]:
    channel_overrides = sec.get("channel_overrides") or {}
    if not isinstance(channel_overrides, Mapping) or not all(
        isinstance(v, Mapping) for v in channel_overrides.values()
    ):
        raise ConfigError(
            "expected a mapping of channel name → channel settings",
            file=sec.file,
            key="channel_overrides",
            hint="e.g. channel_overrides: {adt: {source: {port: 2600}}}",
        )
    return channel_overrides


def _with_overlay(path: Path, env: str | None) -> Any:
    """routes.yaml's data, with ``routes.<env>.yaml`` deep-merged over it when ``env`` is given."""
    data = _read_yaml(path)
    if not env:
        return data
    if not overlays.valid_env(env):
        raise ConfigError(
            f"environment name {env!r} is not usable",
            key="env",
            hint="use letters, digits, '-' and '_' (e.g. prod); check --env or SLUICE_ENV",
        )
    op = overlays.overlay_path(path, env)
    if not op.exists():
        raise ConfigError(
            f"no overlay file for environment {env!r}",
            file=str(op),
            hint=f"create {op.name} beside {path.name}, or check --env / SLUICE_ENV",
        )
    overlay = _read_yaml(op)
    if overlay is not None and not isinstance(overlay, Mapping):
        raise ConfigError(f"expected a mapping, got {type(overlay).__name__}", file=str(op))
    return overlays.deep_merge(data or {}, overlay or {})


_H = TypeVar("_H", bound=Hashable)


def _repeated(values: Iterable[_H]) -> list[_H]:
    """The values that occur more than once, each once, in the order first seen."""
    counts = Counter(values)
    return [v for v, n in counts.items() if n > 1]
