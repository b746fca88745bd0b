"""Issue 4, HTTP webhook end to end: MLLP in → store → HL7→FHIR → http destination → a real HTTP peer on
127.0.0.1 that verifies the ``X-Sluice-Signature`` HMAC the way the docs tell a receiver to.

The peer answers 503 + Retry-After to the first request and 200 afterwards: the message is delivered after one
retry that waited for Retry-After, with the same body, signature and Idempotency-Key both times.  A peer that
rejects with 422 gets the message dead-lettered at once with the peer's error text as the reason.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from engine import store as st
from engine.client import MLLPClient, parse_ack
from tests.support.engine import EngineProcess, fhir_channel, free_port, write_config

KEY = b"synthetic-test-signing-key-0001"


@dataclass
class Seen:
    at: float
    path: str
    headers: dict[str, str]
    body: bytes
    signature_ok: bool


@dataclass
class Peer:
    """Answers the queued (status, headers, body) replies in order, then 200."""

    replies: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""


def verify(header: str | None, body: bytes) -> bool:
    """What docs/destinations.md tells a receiver to do."""
    expected = "sha256=" + hmac.new(KEY, body, hashlib.sha256).hexdigest()
    return header is not None and hmac.compare_digest(header, expected)


@pytest.fixture
def peer() -> Iterator[Peer]:
    state = Peer()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            ok = verify(self.headers.get("X-Sluice-Signature"), body)
            with state.lock:
                state.seen.append(Seen(time.monotonic(), self.path, dict(self.headers.items()), body, ok))
                status, headers, reply = state.replies.pop(0) if state.replies else (200, {}, b'{"ok":true}')
            if not ok:  # a real receiver refuses unsigned or tampered bodies
                status, headers, reply = 401, {}, b"bad signature"
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/sluice"
    thread = threading.Thread(target=server.serve_forever, name="webhook-peer", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def engine_for(
    tmp_path: Path, url: str, payload: str = "fhir", max_backoff: float = 1
) -> tuple[EngineProcess, Path]:
    (tmp_path / "hook.key").write_bytes(KEY)
    port = free_port()
    channel = fhir_channel(port, "hook")
    dest = {
        "kind": "http",
        "url": url,
        "payload": payload,
        "signing_secret": {"file": "hook.key"},  # relative to routes.yaml
        "headers": {"X-Tenant": "north"},
        "timeout": 5,
        "retry": {"max_attempts": 4, "backoff": 0.2, "max_backoff": max_backoff},
    }
    cfg = write_config(tmp_path, channels={"clinic": channel}, destinations={"hook": dest})
    return EngineProcess(cfg, port), tmp_path / "sluice.db"


ADT = (
    "MSH|^~\\&|ALLSCRIPTS|NORTHCLINIC|SLUICE|HOSP|20250314083000||ADT^A04^ADT_A01|H1|P|2.5.1\r"
    "EVN|A04|20250314083000\r"
    "PID|1||HK100^^^NORTHCLINIC^MR||Hooktest^Robin||19700305|F\r"
    "PV1|1|O|4N^401^A^NORTHCLINIC||||||||||||||||HV100^^^NORTHCLINIC^VN\r"
)


def send(port: int, message: str) -> None:
    import asyncio

    async def go() -> None:
        client = MLLPClient("127.0.0.1", port)
        try:
            info = parse_ack(await client.send(message.encode()))
            assert info.code == "AA", info
        finally:
            await client.close()

    asyncio.run(go())


def settle(db: Path, timeout: float = 20) -> Any:
    s = st.Store(f"sqlite:///{db}")
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = s.delivery_counts()
            if counts and not counts.get(("hook", st.PENDING)):
                (m,) = s.list_messages()
                (d,) = s.deliveries_of(m.id)
                return m, d
            time.sleep(0.05)
        raise AssertionError(f"not settled: {s.delivery_counts()}")
    finally:
        s.close()


def test_signed_webhook_retried_after_503(tmp_path: Path, peer: Peer) -> None:
    peer.replies.append((503, {"Retry-After": "1"}, b'{"error":"warming up"}'))
    eng, db = engine_for(tmp_path, peer.url)
    with eng:
        send(eng.port, ADT)
        m, d = settle(db)
    assert d.status == st.DELIVERED and d.attempts == 2, d
    assert d.detail == "HTTP 200"

    first, second = peer.seen
    assert len(peer.seen) == 2
    assert first.signature_ok and second.signature_ok
    assert second.at - first.at >= 0.95, "Retry-After: 1 was not honoured (backoff alone is 0.2 s)"
    assert first.path == second.path == "/hooks/sluice"
    assert first.body == second.body  # the same bytes, so the same signature and dedupe key
    h1, h2 = first.headers, second.headers
    assert h1["X-Sluice-Signature"] == h2["X-Sluice-Signature"]
    assert h1["Idempotency-Key"] == h2["Idempotency-Key"] == f"sluice-clinic-{m.id}"
    assert (h1["X-Sluice-Attempt"], h2["X-Sluice-Attempt"]) == ("1", "2")
    assert h2["X-Sluice-Message-Id"] == str(m.id) and h2["X-Sluice-Channel"] == "clinic"
    assert h2["X-Sluice-Control-Id"] == "H1" and h2["X-Sluice-Message-Type"] == "ADT^A04"
    assert h2["X-Tenant"] == "north"
    assert h2["Content-Type"].startswith("application/fhir+json")
    bundle = json.loads(second.body)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    assert {"Patient", "Encounter"} <= {e["resource"]["resourceType"] for e in bundle["entry"]}
    # the signature covers the exact body: one changed byte fails verification
    assert not verify(h2["X-Sluice-Signature"], second.body.replace(b"Patient", b"Patienu", 1))


def test_webhook_rejection_dead_lettered_with_peer_text(tmp_path: Path, peer: Peer) -> None:
    peer.replies.append((422, {}, b'{"error":"synthetic rule HK-3: visit number not known here"}'))
    eng, db = engine_for(tmp_path, peer.url, payload="both")
    with eng:
        send(eng.port, ADT)
        _m, d = settle(db)
    assert d.status == st.DEAD and d.attempts == 1, d
    assert "HTTP 422" in d.last_error and "synthetic rule HK-3: visit number not known here" in d.last_error
    (seen,) = peer.seen
    assert seen.signature_ok
    env = json.loads(seen.body)
    assert (
        env["control_id"] == "H1"
        and env["hl7"].startswith("MSH|")
        and env["payload"]["type"] == "transaction"
    )


def test_retry_after_longer_than_max_backoff_is_honoured(tmp_path: Path, peer: Peer) -> None:
    peer.replies.append((429, {"Retry-After": "3"}, b'{"error":"rate limited"}'))
    eng, db = engine_for(tmp_path, peer.url, max_backoff=0.5)  # the cap is 4 x 0.5 = 2 s < Retry-After 3 s
    with eng:
        send(eng.port, ADT)
        _m, d = settle(db)
    assert d.status == st.DELIVERED and d.attempts == 2, d
    first, second = peer.seen
    assert second.at - first.at >= 2.9, f"retried {second.at - first.at:.2f}s after a 429 with Retry-After: 3"
