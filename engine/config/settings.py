"""The engine-wide sections of routes.yaml: ``limits``, ``logging.flood``, ``store_encryption`` and the
store URL (a relative SQLite path is read from routes.yaml's folder)."""

from __future__ import annotations

from pathlib import Path

from engine.config.model import LimitsConfig, LogFloodConfig, StoreEncryptionConfig
from engine.config.reader import _Section
from engine.errors import ConfigError


def _limits(sec: _Section) -> LimitsConfig:
    d = LimitsConfig()
    lim = LimitsConfig(
        inflight_bytes=sec.integer("inflight_bytes", d.inflight_bytes),
        connection_inflight_bytes=sec.integer("connection_inflight_bytes", d.connection_inflight_bytes),
        connection_frames=sec.integer("connection_frames", d.connection_frames),
        unsent_ack_bytes=sec.integer("unsent_ack_bytes", d.unsent_ack_bytes),
        batch_bytes=sec.integer("batch_bytes", d.batch_bytes),
    )
    sec.done()
    for k in ("inflight_bytes", "batch_bytes"):
        if getattr(lim, k) < 0:
            raise ConfigError(f"{k} must be 0 (no limit) or more", file=sec.file, key=f"limits.{k}")
    for k in ("connection_inflight_bytes", "connection_frames", "unsent_ack_bytes"):
        if getattr(lim, k) < 1:
            raise ConfigError(f"{k} must be at least 1", file=sec.file, key=f"limits.{k}")
    return lim


def _log_flood(sec: _Section) -> LogFloodConfig:
    d = LogFloodConfig()
    fl = LogFloodConfig(
        per_peer=sec.integer("per_peer", d.per_peer),
        per_kind=sec.integer("per_kind", d.per_kind),
        window=sec.number("window", d.window),
    )
    sec.done()
    if fl.per_peer < 0 or fl.per_kind < 0:
        raise ConfigError("per_peer and per_kind must be 0 (no limit) or more", file=sec.file, key=sec.path)
    if fl.window <= 0:
        raise ConfigError("window must be more than 0 seconds", file=sec.file, key=sec.key("window"))
    return fl


def _store_encryption(sec: _Section, base: Path) -> StoreEncryptionConfig | None:
    """``store_encryption: {key_file: PATH}`` or ``{env: NAME}``; absent or empty: off.

    Only the shape is checked here; the keys are read when the store is opened (``keyring.from_config``).
    """
    key_file, env = sec.text("key_file"), sec.text("env")
    sec.done()
    if not sec.data:
        return None
    if bool(key_file) == bool(env):
        raise ConfigError(
            "store_encryption needs exactly one of key_file and env",
            file=sec.file,
            key="store_encryption",
            hint="key_file: a key ring made by `sluice keys create --out PATH`; env: a variable holding one",
        )
    if key_file:
        return StoreEncryptionConfig(key_file=str((base / key_file).resolve()))
    return StoreEncryptionConfig(env=env)


def _resolve_sqlite(url: str, base: Path) -> str:
    """Relative SQLite paths are relative to routes.yaml's folder."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        return prefix + str((base / url[len(prefix) :]).resolve())
    return url
