"""Start/stop the Medplum in-memory FHIR test server (tests/support/fhir_server) from pytest or a script.

    with FhirServer() as srv:          # npm-installs on first use, picks a free 127.0.0.1 port
        httpx.get(srv.base_url + "/Patient")

Searches and conditional writes are Medplum's own (FhirRouter + MemoryRepository, unmodified).  By default
each write is validated the way Medplum's server does it (400 + OperationOutcome for an invalid resource),
which MemoryRepository alone does not do; ``FhirServer(stock=True)`` runs the plain MemoryRepository.
server.mjs says exactly what differs from Medplum's server in each mode.

A missing node/npm or a failed install raises :class:`FhirServerUnavailable`; the pytest fixture turns that
into a skip locally and a failure under ``CI=true``.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

SERVER_DIR = Path(__file__).resolve().parent / "fhir_server"
MARKER = SERVER_DIR / "node_modules" / "@medplum" / "fhir-router" / "package.json"


class FhirServerUnavailable(RuntimeError):
    """node/npm missing, npm install failed, or the server did not come up."""


def ensure_installed(timeout: float = 300) -> None:
    """``npm ci`` into tests/support/fhir_server/node_modules once (file-locked against parallel runs)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        raise FhirServerUnavailable(
            "node and npm are needed for the FHIR test server (install Node.js >= 20.19)"
        )
    if MARKER.exists():
        return
    with open(Path(tempfile.gettempdir()) / "sluice-fhir-server-npm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if MARKER.exists():
            return
        cmd = [
            npm,
            "ci" if (SERVER_DIR / "package-lock.json").exists() else "install",
            "--no-audit",
            "--no-fund",
        ]
        try:
            proc = subprocess.run(
                cmd, cwd=SERVER_DIR, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise FhirServerUnavailable(f"{' '.join(cmd)} timed out after {timeout:.0f}s") from exc
        if proc.returncode != 0 or not MARKER.exists():
            tail = (proc.stderr or proc.stdout)[-2000:]
            raise FhirServerUnavailable(
                f"{' '.join(cmd)} failed in {SERVER_DIR} (exit {proc.returncode}):\n{tail}"
            )


class FhirServer:
    def __init__(self, port: int = 0, *, startup_timeout: float = 60, stock: bool = False) -> None:
        self.port = port
        self.startup_timeout = startup_timeout
        self.stock = stock  # the unmodified MemoryRepository: no validation of writes
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FhirServer:
        ensure_installed()
        node = shutil.which("node")
        assert node is not None
        self._log = tempfile.NamedTemporaryFile(prefix="sluice-fhir-server-", suffix=".log", delete=False)  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [
                node,
                "--experimental-websocket",
                "--no-warnings",
                "server.mjs",
                str(self.port),
                *(["--stock"] if self.stock else []),
            ],
            cwd=SERVER_DIR,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.stop()
                raise FhirServerUnavailable(
                    f"FHIR test server did not start; log: {self._log.name}\n{self.log_tail()}"
                )
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 256)
                if not chunk:
                    continue
                line += chunk
        self.port = int(line.decode().split()[1])
        return self

    def log_tail(self) -> str:
        if self._log is None:
            return ""
        try:
            return Path(self._log.name).read_text()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()  # our own child, by PID
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
        if self._log is not None:
            self._log.close()

    def reset(self) -> None:
        """Empty the in-memory repository."""
        self.request("POST", "/$reset")

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers={"Content-Type": "application/fhir+json"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    def search(self, query: str) -> list[dict[str, Any]]:
        """``search("Patient?identifier=sys|val")`` → the matching resources."""
        bundle = self.request("GET", "/" + query.replace("|", "%7C"))
        return [e["resource"] for e in bundle.get("entry") or []]

    def __enter__(self) -> FhirServer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


if __name__ == "__main__":  # manual use: python -m tests.support.fhirserver [--stock]
    import sys

    with FhirServer(stock="--stock" in sys.argv[1:]) as srv:
        kind = "stock MemoryRepository" if srv.stock else "validating writes"
        print(f"FHIR test server ({kind}) on {srv.base_url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
