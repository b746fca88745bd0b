"""Live reload: what changed between the running config and the files, and whether it can apply.

``sluice reload``, SIGHUP and ``POST /api/v1/reload`` all end in ``Server.reload`` (engine/server.py),
which loads the files again (same path, same ``--env`` and CLI overrides), asks :func:`plan` what
changed and applies it: channels and destinations added, removed or changed take effect for the next
message; a listener whose address changed is bound to the new one first (nothing changes when that
fails), and the old listening socket is closed to new connections while its open connections keep
being served until their senders close them.  Settings that the running engine cannot swap (the store,
its encryption, the admin API...) refuse the reload and say to restart; the running config stays as it
was.  No sockets, no store here; the only I/O is the pid file (``pid_file`` in routes.yaml) that
``sluice run`` writes and ``sluice reload`` reads to send SIGHUP.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from engine.config import ChannelConfig, Config
from engine.errors import ConfigError

# Config fields a running engine cannot swap: (field, the routes.yaml key a person edits).
RESTART_ONLY: tuple[tuple[str, str], ...] = (
    ("store_url", "store"),
    ("store_encryption", "store_encryption"),
    ("node_id", "node_id"),
    ("admin", "admin"),
    ("processing_workers", "processing.workers"),
    ("limits", "limits"),
    ("plugin_paths", "plugin_paths"),
    ("plugins", "plugins"),
    ("logging", "logging"),
    ("pid_file", "pid_file"),
)


@dataclass(frozen=True)
class Plan:
    """The changes a reload applies (names only)."""

    channels_added: tuple[str, ...] = ()
    channels_removed: tuple[str, ...] = ()
    channels_changed: tuple[str, ...] = ()
    channels_rebound: tuple[str, ...] = ()  # changed channels whose listen address changed
    destinations_added: tuple[str, ...] = ()
    destinations_removed: tuple[str, ...] = ()
    destinations_changed: tuple[str, ...] = ()
    sections_changed: tuple[str, ...] = ()  # other routes.yaml sections a reload applies: alerts

    @property
    def empty(self) -> bool:
        return not (
            self.channels_added
            or self.channels_removed
            or self.channels_changed
            or self.destinations_added
            or self.destinations_removed
            or self.destinations_changed
            or self.sections_changed
        )

    def summary(self) -> dict[str, list[str]]:
        """Non-empty change lists by name, e.g. ``{"channels_changed": ["adt"]}``."""
        out: dict[str, list[str]] = {}
        for k in (
            "channels_added",
            "channels_removed",
            "channels_changed",
            "channels_rebound",
            "destinations_added",
            "destinations_removed",
            "destinations_changed",
            "sections_changed",
        ):
            v = getattr(self, k)
            if v:
                out[k] = list(v)
        return out

    def describe(self) -> str:
        """One line for a person: ``channels changed: adt; destinations added: lab``."""
        if self.empty:
            return "nothing changed"
        parts = [f"{k.replace('_', ' ')}: {', '.join(v)}" for k, v in self.summary().items()]
        return "; ".join(parts)


def _enabled(cfg: Config) -> dict[str, ChannelConfig]:
    return {ch.name: ch for ch in cfg.channels if ch.enabled}


def plan(old: Config, new: Config) -> Plan:
    """What applying ``new`` over the running ``old`` changes; ConfigError when it needs a restart."""
    needs_restart = [key for attr, key in RESTART_ONLY if getattr(old, attr) != getattr(new, attr)]
    if needs_restart:
        raise ConfigError(
            f"{', '.join(needs_restart)} changed, which the running engine cannot apply",
            file=new.file,
            key=needs_restart[0],
            hint="restart the engine (sluice run) to apply it, or undo that change and reload again; "
            "the running config is unchanged",
        )
    was, now = _enabled(old), _enabled(new)
    changed = tuple(n for n in now if n in was and now[n] != was[n])
    rebound = tuple(
        n
        for n in changed
        if (now[n].source.host, now[n].source.port) != (was[n].source.host, was[n].source.port)
    )
    touched = [*(n for n in now if n not in was), *(n for n in was if n not in now), *changed]
    other = [
        n
        for n in touched
        if (now.get(n) or was[n]).source.kind != "mllp" or (was.get(n) or now[n]).source.kind != "mllp"
    ]
    if other:
        ch = now.get(other[0]) or was[other[0]]
        raise ConfigError(
            f"channel {other[0]} has a {ch.source.kind} source: a reload cannot add, remove or change such a "
            "channel yet (it applies MLLP channels)",
            file=ch.file,
            key="source.kind",
            hint="restart the engine (sluice run) to apply it; the running config is unchanged",
        )
    d_was, d_now = old.destinations, new.destinations
    return Plan(
        channels_added=tuple(n for n in now if n not in was),
        channels_removed=tuple(n for n in was if n not in now),
        channels_changed=changed,
        channels_rebound=rebound,
        destinations_added=tuple(n for n in d_now if n not in d_was),
        destinations_removed=tuple(n for n in d_was if n not in d_now),
        destinations_changed=tuple(n for n in d_now if n in d_was and d_now[n] != d_was[n]),
        sections_changed=("alerts",) if old.alerts != new.alerts else (),
    )


def write_pid(path: str | None) -> bool:
    """Record this process's pid (False when the file cannot be written: reload then needs the API)."""
    if not path:
        return False
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(f"{os.getpid()}\n", encoding="ascii")
    except OSError:
        return False
    return True


def remove_pid(path: str | None) -> None:
    """Remove the pid file if it still names this process."""
    if path and read_pid(path) == os.getpid():
        with contextlib.suppress(OSError):
            Path(path).unlink()


def read_pid(path: str | None) -> int | None:
    if not path:
        return None
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
