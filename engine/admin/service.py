"""Serve the admin app with uvicorn inside the engine's own event loop.

The socket is bound before the engine reports itself started, so a port already in use is
a start-up error that names the setting to change.  uvicorn's signal handling is left out
(the engine owns SIGTERM/SIGINT) and so is its access log (URLs can carry search terms).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Generator
from typing import Any

import uvicorn

from engine.errors import ConfigError


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:  # the engine handles signals
        yield


class AdminService:
    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        *,
        certfile: str | None = None,
        keyfile: str | None = None,
        cafile: str | None = None,
        require_client_cert: bool = False,
        what: str = "the admin API",
        key: str = "admin",
    ):
        self.what, self.key = what, key  # for errors: "the admin API cannot listen ... (admin.port)"
        self.cafile, self.require_client_cert = cafile, require_client_cert
        self.app = app
        self.host = host
        self.port = port
        self.certfile = certfile
        self.keyfile = keyfile
        self.sock: socket.socket | None = None
        self.server: _Server | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def bound_port(self) -> int:
        return int(self.sock.getsockname()[1]) if self.sock is not None else self.port

    @property
    def url(self) -> str:
        scheme = "https" if self.certfile else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.bound_port}"

    def bind(self, config_file: str) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            hint = (
                "choose a free port (admin.port, --admin-port or SLUICE_ADMIN_PORT) "
                "or turn the API off with admin: {enabled: false}"
                if self.key == "admin"
                else f"choose a free port ({self.key}.port)"
            )
            raise ConfigError(
                f"{self.what} cannot listen on {self.host}:{self.port}: {exc.strerror}",
                file=config_file,
                key=f"{self.key}.port",
                hint=hint,
            ) from None
        sock.listen(128)
        sock.setblocking(False)
        self.sock = sock

    async def start(self) -> None:
        assert self.sock is not None, "bind() first"
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).setLevel(logging.WARNING)
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            ssl_certfile=self.certfile,
            ssl_keyfile=self.keyfile,
            ssl_ca_certs=self.cafile,
            ssl_cert_reqs=ssl.CERT_REQUIRED if self.require_client_cert else ssl.CERT_NONE,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=5,
        )
        self.server = _Server(config)
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        for _ in range(200):  # wait until it accepts (startup is quick; a TLS file error ends the task)
            if self.server.started or self.task.done():
                break
            await asyncio.sleep(0.01)
        if self.task.done():
            exc = self.task.exception()
            raise ConfigError(
                f"{self.what} did not start: {exc}",
                key=f"{self.key}.tls",
                hint=f"check {self.key}.tls.cert and {self.key}.tls.key",
            )

    async def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self.task, 10)
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
