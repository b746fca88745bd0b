"""Run the engine as a real process on free ports with a config written for the test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    directory: Path,
    *,
    channels: dict[str, dict[str, Any]],
    destinations: dict[str, dict[str, Any]],
    store: str | None = None,
    processing: dict[str, Any] | None = None,
) -> Path:
    """routes.yaml + channels/<name>.yaml under ``directory``; returns the routes.yaml path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "channels").mkdir(exist_ok=True)
    routes = {
        "store": store or f"sqlite:///{directory}/sluice.db",
        "logging": {"format": "json", "level": "info"},
        "channels": "channels/*.yaml",
        "destinations": destinations,
    }
    if processing is not None:
        routes["processing"] = processing
    (directory / "routes.yaml").write_text(yaml.safe_dump(routes, sort_keys=False))
    for name, body in channels.items():
        body = {"name": name, **body}
        (directory / "channels" / f"{name}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    return directory / "routes.yaml"


def basic_channel(port: int, **extra: Any) -> dict[str, Any]:
    ch: dict[str, Any] = {
        "source": {"host": "127.0.0.1", "port": port, "idle_timeout": 30, "frame_timeout": 5},
        "routes": [{"destination": "out"}],
        "transform": ["passthrough"],
    }
    ch.update(extra)
    return ch


def fhir_channel(
    port: int, destination: str, *, types: tuple[str, ...] = ("ADT",), **extra: Any
) -> dict[str, Any]:
    """A channel on ``port`` converting ``types`` to FHIR bundles (demo-style derived identifier systems,
    site zone America/Los_Angeles) and routing them to ``destination``; ``extra`` adds or overrides keys."""
    ch: dict[str, Any] = {
        "source": {"host": "127.0.0.1", "port": port},
        "accept": {"types": {t: "*" for t in types}},
        "site_tz": "America/Los_Angeles",
        "transform": [{"hl7-to-fhir": {"derive_unknown_systems": True}}],
        "routes": [{"destination": destination}],
    }
    ch.update(extra)
    return ch


def child_pids(pid: int) -> list[int]:
    """The direct children of a process (Linux /proc), e.g. the engine's worker processes."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


class EngineProcess:
    """``sluice run`` in a subprocess; stopped (or killed) by its PID only."""

    def __init__(
        self,
        config: Path,
        port: int,
        env: dict[str, str] | None = None,
        log_name: str = "engine.log",
        args: list[str] | None = None,
    ):
        self.config = config
        self.port = port
        self.extra_env = env or {}
        self.args = list(args or [])  # more ``sluice run`` options, e.g. --log-format json
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = config.parent / log_name

    def start(self, timeout: float = 30.0) -> EngineProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.extra_env)
        logf = open(self.log, "ab")  # noqa: SIM115 - owned by the process lifetime
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "run", "--config", str(self.config), *self.args],
            cwd=str(ROOT),
            stdout=logf,
            stderr=logf,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"engine exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"engine did not start listening:\n{self.log.read_text()[-3000:]}")

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> EngineProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
