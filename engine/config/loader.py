"""``load``: routes.yaml (with its environment overlay) and its channels → a frozen :class:`Config`."""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine import overlays
from engine.alerts.config import parse_alerts
from engine.config.admin import _admin
from engine.config.channels import load_channel, referenced_files
from engine.config.destinations import _destination
from engine.config.model import Config, DestinationConfig, LoggingConfig
from engine.config.reader import _read_yaml, _Section
from engine.config.settings import _limits, _log_flood, _resolve_sqlite, _store_encryption
from engine.errors import ConfigError

ENV_PREFIX = "SLUICE_"


def load(
    path: str | Path = "routes.yaml", overrides: Mapping[str, Any] | None = None, *, env: str | None = None
) -> Config:
    """Load routes.yaml (plus the overlay of ``env``, or of ``SLUICE_ENV``) and its channels.

    ``overrides`` (from CLI flags) and ``SLUICE_STORE``, ``SLUICE_HOST``, ``SLUICE_PORT``,
    ``SLUICE_LOG_FORMAT``, ``SLUICE_LOG_LEVEL``, ``SLUICE_NODE_ID`` win over the file.
    ``host``/``port`` overrides apply to the first channel (the demo case).
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
    file_store = sec.text("store", "sqlite:///var/sluice.db")
    store_url = ov.get("store") or environ.get(ENV_PREFIX + "STORE") or file_store
    store_url = _resolve_sqlite(store_url, base)
    store_encryption = _store_encryption(sec.sub("store_encryption"), base)
    dsec = sec.sub("destinations")
    destinations: dict[str, DestinationConfig] = {}
    for name in list(dsec.data):
        destinations[str(name)] = _destination(str(name), dsec.sub(str(name)))
    dsec.used.update(dsec.data)
    lsec = sec.sub("logging")
    file_format = lsec.text("format", "auto", choices=("auto", "json", "console"))
    file_level = lsec.text("level", "info")
    logging = LoggingConfig(
        format=environ.get(ENV_PREFIX + "LOG_FORMAT") or file_format,
        level=environ.get(ENV_PREFIX + "LOG_LEVEL") or file_level,
        flood=_log_flood(lsec.sub("flood")),
    )
    lsec.done()
    limits = _limits(sec.sub("limits"))
    admin = _admin(sec.sub("admin"), base, ov.get("admin_port") or environ.get(ENV_PREFIX + "ADMIN_PORT"))
    plugin_paths = tuple((base / str(x)).resolve() for x in sec.items("plugin_paths"))
    plugins = tuple(str(x) for x in sec.items("plugins"))
    patterns = sec.get("channels", "channels/*.yaml")
    if isinstance(patterns, str):
        patterns = [patterns]
    files: list[Path] = []
    for pat in patterns:
        matched = sorted(glob.glob(str(base / str(pat))))
        files.extend(Path(m) for m in matched if not m.endswith("_test.yaml"))
    psec = sec.sub("processing")
    default_workers = max(1, os.cpu_count() or 1)  # niced: they use the CPU the listener leaves
    workers = psec.integer("workers", default_workers)
    psec.done()
    if workers < 0:
        raise ConfigError("processing.workers must be 0 or more", file=file, key="processing.workers")
    pid_text = sec.text("pid_file", "var/sluice.pid")
    pid_file = str((base / pid_text).resolve()) if pid_text else None
    file_node = sec.text("node_id", "node-1")
    node_id = environ.get(ENV_PREFIX + "NODE_ID") or file_node
    alerts_sec = sec.sub("alerts")  # read once the channels are known (rules name them)
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
    sec.done()
    channels = [load_channel(f, destinations, channel_overrides) for f in files]
    channels = [replace(ch, files=referenced_files(ch.transform, base)) for ch in channels]
    unknown = sorted(set(map(str, channel_overrides)) - {c.name for c in channels})
    if unknown:
        raise ConfigError(
            f"channel_overrides names no channel {unknown[0]!r}",
            file=sec.file,
            key=f"channel_overrides.{unknown[0]}",
            hint=f"known channels: {', '.join(c.name for c in channels)}",
        )
    if not channels:
        raise ConfigError(
            f"no channel files match {patterns}", file=file, key="channels", hint="add channels/<name>.yaml"
        )
    names = [c.name for c in channels]
    for n in names:
        if names.count(n) > 1:
            raise ConfigError(
                f"two channels are named {n!r}",
                file=file,
                key="channels",
                hint="channel names must be unique",
            )
    host = ov.get("host") or environ.get(ENV_PREFIX + "HOST")
    port = ov.get("port") or environ.get(ENV_PREFIX + "PORT")
    if host or port:
        first = channels[0]
        src = replace(
            first.source, host=host or first.source.host, port=int(port) if port else first.source.port
        )
        channels[0] = replace(first, source=src)
    ports = [(c.source.host, c.source.port) for c in channels if c.enabled and c.source.port]
    for hp in ports:
        if ports.count(hp) > 1:
            raise ConfigError(
                f"two channels listen on {hp[0]}:{hp[1]}", file=file, hint="give each channel its own port"
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
        alerts=parse_alerts(alerts_sec, channels, destinations),
        limits=limits,
        store_encryption=store_encryption,
        pid_file=pid_file,
        overrides=ov,
        env=env_name,
    )


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
