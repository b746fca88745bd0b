"""A real engine process with its admin API (and console) on a free port: the engine the admin API tests
(tests/admin) and the console tests (tests/web) run against, plus tokens made with `sluice token create`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support import polling
from tests.support.engine import ROOT, EngineProcess, free_port, write_config


def adt(control: str, mrn: str, trigger: str = "A08") -> bytes:
    return (
        f"MSH|^~\\&|EHR|NORTH|SL|HOSP|20250101120000||ADT^{trigger}^ADT_A01|{control}|P|2.5.1\r"
        f"PID|1||{mrn}^^^NORTH^MR||Testpatient^Alex||19800101|F\r"
        "PV1|1|O\r"
    ).encode()


def wait_for(pred: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """:func:`tests.support.polling.wait_for` with the timeout and description positional."""
    return polling.wait_for(pred, timeout=timeout, what=what)


def sluice(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args, "--config", str(config)],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=60,
    )


def make_token(config: Path, name: str, role: str, *extra: str) -> str:
    res = sluice(config, "token", "create", "--name", name, "--role", role, *extra)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@dataclass
class Admin:
    url: str
    config: Path
    mllp_port: int
    tmp: Path
    engine: EngineProcess
    tokens: dict[str, str] = field(default_factory=dict)

    def get(self, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens.get(token, token)}"} if token else {}
        return httpx.get(self.url + path, headers=headers, timeout=10, **kw)

    def post(self, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens.get(token, token)}"} if token else {}
        return httpx.post(self.url + path, headers=headers, timeout=10, **kw)

    def send(self, *messages: bytes) -> list[str]:
        import asyncio

        from engine.client import MLLPClient, parse_ack

        async def go() -> list[str]:
            codes = []
            async with MLLPClient("127.0.0.1", self.mllp_port) as c:
                for m in messages:
                    codes.append(parse_ack(await c.send(m)).code)
            return codes

        return asyncio.run(go())


def file_destinations(tmp: Path) -> dict[str, Any]:
    """'out' (one file per message) and 'picky': a message whose control id names a regular file in picky/
    cannot be written there, a dead letter until the file is removed and the message replayed."""
    return {
        "out": {
            "kind": "file",
            "directory": str(tmp / "out"),
            "pattern": "{message_id}.{ext}",
            "fsync": False,
        },
        "picky": {
            "kind": "file",
            "directory": str(tmp / "picky"),
            "pattern": "{control_id}/{message_id}.{ext}",
            "fsync": False,
            "retry": {"max_attempts": 1},
        },
    }


@contextmanager
def admin_engine(
    tmp: Path,
    channel: Callable[[int], dict[str, Any]],
    destinations: dict[str, Any],
    env: dict[str, str] | None = None,
) -> Iterator[Admin]:
    """The engine with channel 'adt' (``channel(mllp_port)``) and ``destinations``, its admin API up."""
    port, admin_port = free_port(), free_port()
    cfg = write_config(tmp, channels={"adt": channel(port)}, destinations=destinations)
    with EngineProcess(cfg, port, env={"SLUICE_ADMIN_PORT": str(admin_port), **(env or {})}) as engine:
        a = Admin(f"http://127.0.0.1:{admin_port}", cfg, port, tmp, engine)
        wait_for(lambda: _up(a.url), 60, "admin API")
        yield a


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
