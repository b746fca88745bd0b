"""HTTP webhook destination against a real http.server peer on 127.0.0.1 that verifies the HMAC signature."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import threading
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from engine.destinations.base import CONTENT_FHIR, CONTENT_HL7, CONTENT_JSON, DestinationContext
from engine.destinations.http import HttpDestination, parse_retry_after
from engine.errors import ConfigError, DeliveryError, PermanentDeliveryError
from tests.destinations.conftest import make_item
from tests.support.faultproxy import FaultProxy

T = TypeVar("T")
SECRET = "synthetic-signing-secret"
BUNDLE = orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": []})


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Peer:
    url: str
    received: list[Received] = field(default_factory=list)
    rejected: int = 0


@pytest.fixture
def peer() -> Iterator[Peer]:
    state = Peer(url="")

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            want = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(self.headers.get("X-Sluice-Signature", ""), want):
                state.rejected += 1
                data = b'{"error":"bad signature: X-Sluice-Signature does not match the body"}'
                self.send_response(401)
            else:
                state.received.append(Received(self.path, dict(self.headers.items()), body))
                data = b""
                self.send_response(204)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_PUT = do_POST

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    state.url = f"http://127.0.0.1:{srv.server_address[1]}/hook"
    yield state
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def signed(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("SYN_HOOK_SECRET", SECRET)
    monkeypatch.setenv("SYN_HOOK_TOKEN", "Bearer synthetic")
    return {
        "signing_secret": {"env": "SYN_HOOK_SECRET"},
        "headers": {"X-Source": "sluice-test", "Authorization": {"env": "SYN_HOOK_TOKEN"}},
    }


async def once(d: HttpDestination, payload: bytes = BUNDLE, **kw: Any) -> str:
    await d.start()
    try:
        return await d.deliver(make_item(payload, **kw))
    finally:
        await d.close()


def test_signed_post_verified_by_peer(peer: Peer, ctx: DestinationContext, signed: dict[str, Any]) -> None:
    for payload in ("fhir", "hl7", "both"):
        assert (
            run(once(HttpDestination("hook", {"url": peer.url, "payload": payload, **signed}, ctx)))
            == "HTTP 204"
        )
    assert peer.rejected == 0
    fhir, hl7, both = peer.received
    assert fhir.body == BUNDLE and fhir.headers["Content-Type"] == CONTENT_FHIR
    assert hl7.body == make_item(b"").raw and hl7.headers["Content-Type"] == CONTENT_HL7
    assert (
        both.headers["Content-Type"] == CONTENT_JSON
        and orjson.loads(both.body)["payload"]["type"] == "transaction"
    )
    h = fhir.headers
    assert h["X-Source"] == "sluice-test" and h["Authorization"] == "Bearer synthetic"
    assert h["X-Sluice-Message-Id"] == "1" and h["X-Sluice-Control-Id"] == "CTRL0001"
    assert h["Idempotency-Key"] == "sluice-adt-in-1"


def test_wrong_secret_is_rejected_permanently(
    peer: Peer, ctx: DestinationContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SYN_HOOK_SECRET", "not-the-secret")
    d = HttpDestination("hook", {"url": peer.url, "signing_secret": {"env": "SYN_HOOK_SECRET"}}, ctx)
    with pytest.raises(PermanentDeliveryError, match=r"HTTP 401.*credentials.*bad signature"):
        run(once(d))
    assert peer.rejected == 1 and not peer.received


def test_status_rules_through_fault_proxy(
    peer: Peer, ctx: DestinationContext, signed: dict[str, Any]
) -> None:
    base = peer.url.rsplit("/", 1)[0]

    async def go() -> list[DeliveryError]:
        errs: list[DeliveryError] = []
        async with FaultProxy(base) as proxy:
            proxy.http_error(500)
            proxy.http_error(429, retry_after=3)
            proxy.http_error(503, retry_after=5)
            proxy.reset()
            proxy.stall()
            proxy.http_error(422, body=b'{"error":"field x missing"}', content_type="application/json")
            d = HttpDestination("hook", {"url": proxy.url + "/hook", "timeout": 0.5, **signed}, ctx)
            await d.start()
            for _ in range(6):
                with pytest.raises(DeliveryError) as info:
                    await d.deliver(make_item(BUNDLE))
                errs.append(info.value)
            assert await d.deliver(make_item(BUNDLE)) == "HTTP 204"  # faults used up: passes through
            await d.close()
        return errs

    e500, e429, e503, ereset, estall, e422 = run(go())
    assert e500.retryable and e500.retry_after is None
    assert e429.retryable and e429.retry_after == 3
    assert e503.retryable and e503.retry_after == 5
    assert ereset.retryable and estall.retryable and "timed out" in estall.message
    assert isinstance(e422, PermanentDeliveryError) and "field x missing" in e422.message
    assert len(peer.received) == 1


def test_parse_retry_after() -> None:
    assert parse_retry_after("12") == 12
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0  # in the past
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470) == 10


def test_config(ctx: DestinationContext, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="looks like a credential"):
        HttpDestination("hook", {"url": "http://127.0.0.1:9", "headers": {"X-Api-Key": "abc"}}, ctx)
    with pytest.raises(ConfigError, match="must come from the environment or a file"):
        HttpDestination("hook", {"url": "http://127.0.0.1:9", "signing_secret": "abc"}, ctx)
    with pytest.raises(ConfigError, match="url"):
        HttpDestination("hook", {"url": "127.0.0.1:9"}, ctx)
    with pytest.raises(ConfigError, match="ca_file file"):
        HttpDestination("hook", {"url": "https://127.0.0.1:9", "tls": {"ca_file": "missing.pem"}}, ctx)
    (tmp_path / "sig").write_text("s\n")
    d = HttpDestination("hook", {"url": "http://127.0.0.1:9", "signing_secret": {"file": "sig"}}, ctx)
    assert d.signing_key == b"s"
