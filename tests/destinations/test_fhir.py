"""FHIR destination against the real Medplum test server, through the fault proxy, and against small peers."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from engine.destinations import fhir_plan
from engine.destinations.base import DestinationContext
from engine.destinations.fhir import FhirDestination
from engine.errors import ConfigError, DeliveryError, PermanentDeliveryError
from engine.ratelimit import TokenBucket
from tests.destinations.conftest import make_item
from tests.support.faultproxy import FaultProxy
from tests.support.fhirserver import FhirServer

T = TypeVar("T")
PAT = "urn:uuid:0b6a3c1e-7d51-4f1e-9a11-000000000001"
ENC = "urn:uuid:0b6a3c1e-7d51-4f1e-9a11-000000000002"
OBS = "urn:uuid:0b6a3c1e-7d51-4f1e-9a11-000000000003"
MRN_SYS = "urn:oid:2.16.840.1.113883.3.999.1"  # synthetic


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def bundle(
    mrn: str = "SYN0001", visit: str = "V0001", status: str = "in-progress", family: str = "Testpatient"
) -> bytes:
    """A synthetic ADT-like transaction: conditional PUTs with urn:uuid references (Observation → Encounter → Patient)."""
    return orjson.dumps(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": OBS,
                    "resource": {
                        "resourceType": "Observation",
                        "status": "final",
                        "identifier": [{"system": "urn:synth:obs", "value": f"{visit}-1"}],
                        "code": {"text": "synthetic"},
                        "subject": {"reference": PAT},
                        "encounter": {"reference": ENC},
                        "valueQuantity": {"value": 42, "unit": "1"},
                    },
                    "request": {"method": "PUT", "url": f"Observation?identifier=urn:synth:obs|{visit}-1"},
                },
                {
                    "fullUrl": ENC,
                    "resource": {
                        "resourceType": "Encounter",
                        "status": status,
                        "class": {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                            "code": "IMP",
                        },
                        "identifier": [{"system": "urn:synth:visit", "value": visit}],
                        "subject": {"reference": PAT},
                    },
                    "request": {"method": "PUT", "url": f"Encounter?identifier=urn:synth:visit|{visit}"},
                },
                {
                    "fullUrl": PAT,
                    "resource": {
                        "resourceType": "Patient",
                        "identifier": [{"system": MRN_SYS, "value": mrn}],
                        "name": [{"family": family, "given": ["Synthetic"]}],
                    },
                    "request": {"method": "PUT", "url": f"Patient?identifier={MRN_SYS}|{mrn}"},
                },
            ],
        }
    )


def dest(ctx: DestinationContext, base_url: str, **opts: Any) -> FhirDestination:
    return FhirDestination("ehr", {"base_url": base_url, **opts}, ctx)


async def deliver_once(d: FhirDestination, payload: bytes, **kw: Any) -> str:
    await d.start()
    try:
        return await d.deliver(make_item(payload, **kw))
    finally:
        await d.close()


async def with_proxy(upstream: str, body: Callable[[FaultProxy], Awaitable[T]]) -> T:
    async with FaultProxy(upstream) as proxy:
        return await body(proxy)


def counts(srv: FhirServer) -> dict[str, int]:
    return {t: len(srv.search(t)) for t in ("Patient", "Encounter", "Observation")}


# ---------------------------------------------------------------------------------------- real server


@pytest.mark.fhirserver
@pytest.mark.parametrize("mode", ["transaction", "per-resource"])
def test_resend_creates_one_resource_each(fhir: FhirServer, ctx: DestinationContext, mode: str) -> None:
    async def go() -> list[str]:
        d = dest(ctx, fhir.base_url, mode=mode)
        await d.start()
        try:
            return [
                await d.deliver(make_item(bundle(status=s)))
                for s in ("in-progress", "in-progress", "finished")
            ]
        finally:
            await d.close()

    details = run(go())
    assert details[0].startswith(mode)
    patients = fhir.search(f"Patient?identifier={MRN_SYS}|SYN0001")
    assert len(patients) == 1
    assert counts(fhir) == {"Patient": 1, "Encounter": 1, "Observation": 1}
    (enc,) = fhir.search("Encounter")
    assert enc["status"] == "finished"
    assert enc["subject"]["reference"] == f"Patient/{patients[0]['id']}"
    (obs,) = fhir.search("Observation")
    assert obs["encounter"]["reference"] == f"Encounter/{enc['id']}"


@pytest.mark.fhirserver
def test_two_patients_stay_two(fhir: FhirServer, ctx: DestinationContext) -> None:
    async def go() -> None:
        d = dest(ctx, fhir.base_url)
        await d.start()
        for mrn, visit in (("SYN0001", "V1"), ("SYN0002", "V2"), ("SYN0001", "V1"), ("SYN0002", "V2")):
            await d.deliver(make_item(bundle(mrn=mrn, visit=visit)))
        await d.close()

    run(go())
    assert counts(fhir) == {"Patient": 2, "Encounter": 2, "Observation": 2}


@pytest.mark.fhirserver
def test_batch_mode_with_fixed_ids(fhir: FhirServer, ctx: DestinationContext) -> None:
    payload = orjson.dumps(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": PAT,
                    "resource": {
                        "resourceType": "Patient",
                        "id": "syn-p1",
                        "name": [{"family": "Batchcase"}],
                    },
                    "request": {"method": "PUT", "url": "Patient/syn-p1"},
                },
                {
                    "fullUrl": ENC,
                    "resource": {
                        "resourceType": "Encounter",
                        "id": "syn-e1",
                        "status": "planned",
                        "class": {"code": "AMB"},
                        "subject": {"reference": PAT},
                    },
                    "request": {"method": "PUT", "url": "Encounter/syn-e1"},
                },
            ],
        }
    )
    d = dest(ctx, fhir.base_url, mode="batch")
    assert run(deliver_once(d, payload)).startswith("batch HTTP 200: 2 entries")
    run(deliver_once(dest(ctx, fhir.base_url, mode="batch"), payload))
    (enc,) = fhir.search("Encounter")
    assert enc["subject"]["reference"] == "Patient/syn-p1"
    assert len(fhir.search("Patient")) == 1


@pytest.mark.fhirserver
def test_batch_mode_resolves_references_level_by_level(fhir: FhirServer, ctx: DestinationContext) -> None:
    """Conditional writes that reference each other by urn:uuid: one batch per dependency level, later
    levels refer to the ids the earlier ones got (a batch's entries cannot reference each other)."""
    d = dest(ctx, fhir.base_url, mode="batch")
    detail = run(deliver_once(d, bundle()))
    assert detail.startswith("batch in 3 dependency levels (3 entries): 1: batch HTTP 200: 1 entries"), detail
    run(deliver_once(dest(ctx, fhir.base_url, mode="batch"), bundle(status="finished")))
    (pat,) = fhir.search("Patient")
    (enc,) = fhir.search("Encounter")
    (obs,) = fhir.search("Observation")
    assert enc["status"] == "finished"
    assert enc["subject"]["reference"] == f"Patient/{pat['id']}"
    assert obs["encounter"]["reference"] == f"Encounter/{enc['id']}"


@pytest.mark.fhirserver
def test_server_validation_error_is_permanent_with_diagnostics(
    fhir: FhirServer, ctx: DestinationContext
) -> None:
    bad = orjson.loads(bundle())
    bad["entry"][2]["resource"]["notAField"] = True
    with pytest.raises(PermanentDeliveryError) as info:
        run(deliver_once(dest(ctx, fhir.base_url), orjson.dumps(bad)))
    err = info.value
    assert not err.retryable
    assert "HTTP 400" in err.message
    assert 'Invalid additional property "notAField"' in err.message
    assert "Patient.notAField" in err.message


@pytest.mark.fhirserver
def test_per_resource_rejection_names_entry(fhir: FhirServer, ctx: DestinationContext) -> None:
    bad = orjson.loads(bundle())
    bad["entry"][1]["resource"]["bogus"] = 1
    with pytest.raises(PermanentDeliveryError, match=r"PUT Encounter \(entry 2/3\).*bogus"):
        run(deliver_once(dest(ctx, fhir.base_url, mode="per-resource"), orjson.dumps(bad)))


def test_not_a_bundle_is_permanent(ctx: DestinationContext) -> None:
    d = dest(ctx, "http://127.0.0.1:9")
    with pytest.raises(PermanentDeliveryError, match="not FHIR JSON"):
        run(deliver_once(d, b"MSH|^~\\&|"))
    with pytest.raises(PermanentDeliveryError, match="not a transaction"):
        run(deliver_once(d, b'{"resourceType":"Bundle","type":"collection"}'))


def test_dependency_order() -> None:
    entries = orjson.loads(bundle())["entry"]
    plan = fhir_plan.build(entries, "per-resource")
    order = [plan.writes[k].entry["resource"]["resourceType"] for step in plan.steps for k in step]
    assert order == ["Patient", "Encounter", "Observation"]


# ---------------------------------------------------------------------------------------- fault proxy

OO_422 = orjson.dumps(
    {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "business-rule",
                "diagnostics": "Encounter.period.start must not be after Encounter.period.end",
                "expression": ["Bundle.entry[1].resource.period"],
            }
        ],
    }
)


@pytest.mark.fhirserver
def test_500_then_success_no_duplicates(fhir: FhirServer, ctx: DestinationContext) -> None:
    async def go(proxy: FaultProxy) -> str:
        proxy.http_error(
            500,
            body=b'{"resourceType":"OperationOutcome","issue":[{"severity":"fatal","code":"exception","diagnostics":"db down"}]}',
        )
        d = dest(ctx, proxy.url)
        await d.start()
        try:
            with pytest.raises(DeliveryError) as info:
                await d.deliver(make_item(bundle()))
            assert info.value.retryable and not isinstance(info.value, PermanentDeliveryError)
            assert "HTTP 500" in info.value.message and "db down" in info.value.message
            return await d.deliver(make_item(bundle(), attempt=2))
        finally:
            await d.close()

    assert run(with_proxy(fhir.base_url, go)).startswith("transaction HTTP 200")
    assert counts(fhir) == {"Patient": 1, "Encounter": 1, "Observation": 1}


@pytest.mark.fhirserver
@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(fhir: FhirServer, ctx: DestinationContext, status: int) -> None:
    async def go(proxy: FaultProxy) -> DeliveryError:
        proxy.http_error(status, retry_after=7)
        d = dest(ctx, proxy.url)
        with pytest.raises(DeliveryError) as info:
            await deliver_once(d, bundle())
        await deliver_once(dest(ctx, proxy.url), bundle())
        return info.value

    err = run(with_proxy(fhir.base_url, go))
    assert err.retryable and err.retry_after == 7
    assert f"HTTP {status}" in err.message
    assert counts(fhir)["Patient"] == 1


@pytest.mark.fhirserver
def test_retry_after_http_date(fhir: FhirServer, ctx: DestinationContext) -> None:
    target = int(time.time()) + 120  # an HTTP-date has whole seconds
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(target))
    clock: dict[str, float] = {}

    async def go(proxy: FaultProxy) -> DeliveryError:
        proxy.http_error(503, retry_after=when)
        with pytest.raises(DeliveryError) as info:
            clock["before"] = time.time()
            await deliver_once(dest(ctx, proxy.url), bundle())
        clock["after"] = time.time()
        return info.value

    err = run(with_proxy(fhir.base_url, go))
    # seconds from the moment the reply was read (between before and after) to the date given
    assert err.retry_after is not None
    assert target - clock["after"] <= err.retry_after <= target - clock["before"]


@pytest.mark.fhirserver
def test_stall_times_out_retryable(fhir: FhirServer, ctx: DestinationContext) -> None:
    async def go(proxy: FaultProxy) -> tuple[DeliveryError, str]:
        proxy.stall()
        d = dest(ctx, proxy.url, timeout=0.5)
        with pytest.raises(DeliveryError) as info:
            await deliver_once(d, bundle())
        return info.value, await deliver_once(dest(ctx, proxy.url, timeout=5), bundle())

    err, detail = run(with_proxy(fhir.base_url, go))
    assert err.retryable and "timed out" in err.message
    assert detail.startswith("transaction HTTP 200")
    assert counts(fhir)["Patient"] == 1


@pytest.mark.fhirserver
def test_reset_is_retryable(fhir: FhirServer, ctx: DestinationContext) -> None:
    async def go(proxy: FaultProxy) -> DeliveryError:
        proxy.reset()
        with pytest.raises(DeliveryError) as info:
            await deliver_once(dest(ctx, proxy.url), bundle())
        await deliver_once(dest(ctx, proxy.url), bundle())
        return info.value

    err = run(with_proxy(fhir.base_url, go))
    assert err.retryable and not isinstance(err, PermanentDeliveryError)
    assert counts(fhir)["Patient"] == 1


@pytest.mark.fhirserver
@pytest.mark.parametrize("status", [400, 404, 422])
def test_permanent_rejection_carries_operation_outcome(
    fhir: FhirServer, ctx: DestinationContext, status: int
) -> None:
    async def go(proxy: FaultProxy) -> PermanentDeliveryError:
        proxy.http_error(status, body=OO_422)
        with pytest.raises(PermanentDeliveryError) as info:
            await deliver_once(dest(ctx, proxy.url), bundle())
        return info.value

    err = run(with_proxy(fhir.base_url, go))
    assert not err.retryable
    assert f"HTTP {status}" in err.message
    assert "Encounter.period.start must not be after Encounter.period.end" in err.message
    assert "Bundle.entry[1].resource.period" in err.message
    assert counts(fhir)["Patient"] == 0


@pytest.mark.fhirserver
@pytest.mark.parametrize("status", [409, 412])
def test_version_conflict_retries(fhir: FhirServer, ctx: DestinationContext, status: int) -> None:
    async def go(proxy: FaultProxy) -> DeliveryError:
        proxy.http_error(status, body=OO_422)
        with pytest.raises(DeliveryError) as info:
            await deliver_once(dest(ctx, proxy.url), bundle())
        return info.value

    err = run(with_proxy(fhir.base_url, go))
    assert err.retryable and "version conflict" in err.message


@pytest.mark.fhirserver
def test_failed_entry_in_2xx_response_is_an_error(fhir: FhirServer, ctx: DestinationContext) -> None:
    reply = {
        "resourceType": "Bundle",
        "type": "batch-response",
        "entry": [
            {"response": {"status": "200 OK"}},
            {"response": {"status": "201 Created"}},
            {"response": {"status": "422 Unprocessable Entity", "outcome": orjson.loads(OO_422)}},
        ],
    }

    async def go(proxy: FaultProxy) -> PermanentDeliveryError:
        proxy.http_error(200, body=orjson.dumps(reply))
        with pytest.raises(PermanentDeliveryError) as info:
            await deliver_once(dest(ctx, proxy.url), bundle())
        return info.value

    err = run(with_proxy(fhir.base_url, go))
    assert "entry 2 (Patient)" in err.message and "HTTP 422" in err.message
    assert "must not be after" in err.message


@pytest.mark.fhirserver
def test_per_resource_fault_midway_then_retry_no_duplicates(
    fhir: FhirServer, ctx: DestinationContext
) -> None:
    async def go(proxy: FaultProxy) -> DeliveryError:
        proxy.forward(times=1)  # Patient goes through
        proxy.http_error(503, retry_after=1)  # Encounter: server busy
        d = dest(ctx, proxy.url, mode="per-resource")
        await d.start()
        try:
            with pytest.raises(DeliveryError) as info:
                await d.deliver(make_item(bundle()))
            # the worker's retry resumes at the Encounter: the Patient is not sent again
            detail = await d.deliver(make_item(bundle(), attempt=2))
        finally:
            await d.close()
        assert [a for _, _, a in proxy.log] == ["forward", "503", "forward", "forward"]
        assert detail.endswith("resumed after a failure)"), detail
        return info.value

    err = run(with_proxy(fhir.base_url, go))
    assert err.retryable and err.retry_after == 1 and "PUT Encounter (entry 2/3)" in err.message
    assert counts(fhir) == {"Patient": 1, "Encounter": 1, "Observation": 1}


# ---------------------------------------------------------------------------------------- limits


@pytest.mark.fhirserver
def test_concurrency_and_rate_limit(fhir: FhirServer, ctx: DestinationContext) -> None:
    n, rate = 20, 16.0  # 1/16 s per token: exact in binary floating point

    async def go() -> tuple[list[float], int]:
        d = dest(ctx, fhir.base_url, concurrency=2, rate_limit=rate)
        assert d.limiter.bucket is not None
        # The bucket's time moves only when it waits for a token, so how long the real requests take
        # cannot refill it: exactly the requests past the burst wait, each for one token.
        now = [0.0]
        waits: list[float] = []

        async def sleep(seconds: float) -> None:
            waits.append(seconds)
            now[0] += seconds
            await asyncio.sleep(0)

        d.limiter.bucket = TokenBucket(rate, clock=lambda: now[0], sleep=sleep)
        await d.start()
        await asyncio.gather(
            *(d.deliver(make_item(bundle(mrn=f"SYN{i:04d}", visit=f"V{i}"))) for i in range(n))
        )
        await d.close()
        return waits, d.limiter.max_in_flight

    waits, peak = run(go())
    assert peak == 2
    # the bucket starts full (burst = rate = 16 requests); the other 4 each waited 1/16 s for a token
    assert waits == [1 / rate] * (n - int(rate))
    assert counts(fhir)["Patient"] == n


def test_token_bucket_fake_clock() -> None:
    now = [0.0]
    b = TokenBucket(5, burst=2, clock=lambda: now[0])
    assert b.try_acquire() and b.try_acquire() and not b.try_acquire()
    now[0] += 0.2  # one token per 0.2 s
    assert b.try_acquire() and not b.try_acquire()
    now[0] += 10
    assert b.try_acquire() and b.try_acquire() and not b.try_acquire()  # capped at burst


def test_token_bucket_acquire_waits_in_arrival_order() -> None:
    now = [0.0]
    log: list[str] = []

    async def sleep(seconds: float) -> None:
        log.append(f"sleep {seconds:g}")
        now[0] += seconds
        await asyncio.sleep(0)

    async def main() -> None:
        b = TokenBucket(4, burst=1, clock=lambda: now[0], sleep=sleep)

        async def take(name: str) -> None:
            await b.acquire()
            log.append(f"{name} at {now[0]:g}")

        await asyncio.gather(*(take(n) for n in "abc"))

    asyncio.run(main())
    # a takes the one token; b and c each wait a quarter second, in the order they asked
    assert log == ["a at 0", "sleep 0.25", "b at 0.25", "sleep 0.25", "c at 0.5"]


# ---------------------------------------------------------------------------------------- auth peers


class AuthPeer:
    """A tiny token endpoint + FHIR-ish endpoint that checks credentials (http.server in a thread)."""

    def __init__(self, sslctx: ssl.SSLContext | None = None) -> None:
        self.tokens: list[str] = []
        self.valid: set[str] = set()
        self.seen_auth: list[str] = []
        self.token_requests: list[dict[str, str]] = []
        self.expires_in = 3600
        self.always_401 = False
        peer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/token":
                    form = dict(p.split("=", 1) for p in body.decode().split("&"))
                    form["authorization"] = self.headers.get("Authorization", "")
                    peer.token_requests.append(form)
                    tok = f"tok-{len(peer.tokens) + 1}"
                    peer.tokens.append(tok)
                    peer.valid.add(tok)
                    return self.reply(
                        200, {"access_token": tok, "token_type": "bearer", "expires_in": peer.expires_in}
                    )
                auth = self.headers.get("Authorization", "")
                peer.seen_auth.append(auth)
                ok = auth.startswith("Basic ") or (auth.startswith("Bearer ") and auth[7:] in peer.valid)
                if peer.always_401 or not ok:
                    return self.reply(
                        401,
                        {
                            "resourceType": "OperationOutcome",
                            "issue": [
                                {
                                    "severity": "error",
                                    "code": "login",
                                    "diagnostics": "token expired or invalid",
                                }
                            ],
                        },
                    )
                n = len(json.loads(body)["entry"])
                self.reply(
                    200,
                    {
                        "resourceType": "Bundle",
                        "type": "transaction-response",
                        "entry": [{"response": {"status": "200 OK"}}] * n,
                    },
                )

            def reply(self, status: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        if sslctx is not None:
            self.server.socket = sslctx.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        scheme = "https" if sslctx else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def auth_peer() -> Iterator[AuthPeer]:
    p = AuthPeer()
    yield p
    p.close()


def test_oauth2_token_cached_refreshed_on_401_and_before_expiry(
    auth_peer: AuthPeer, ctx: DestinationContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SYN_CLIENT_SECRET", "s3cret/+")
    auth = {
        "type": "oauth2",
        "token_url": auth_peer.url + "/token",
        "client_id": "sluice",
        "client_secret": {"env": "SYN_CLIENT_SECRET"},
        "scope": "system/*.write",
    }
    d = dest(ctx, auth_peer.url + "/fhir", auth=auth)

    async def go() -> None:
        await d.start()
        for _ in range(3):
            await d.deliver(make_item(bundle()))
        assert auth_peer.tokens == ["tok-1"]  # cached
        auth_peer.valid.clear()  # server revokes: next call gets 401, one refresh, success
        await d.deliver(make_item(bundle()))
        assert auth_peer.tokens == ["tok-1", "tok-2"]
        auth_peer.always_401 = True  # still 401 after the refresh: permanent, exactly one refresh
        with pytest.raises(PermanentDeliveryError, match=r"HTTP 401.*credentials.*token expired or invalid"):
            await d.deliver(make_item(bundle()))
        assert len(auth_peer.tokens) == 3
        auth_peer.always_401 = False
        # A 100 s token is refreshed a tenth of its lifetime before it expires (refresh_margin
        # is 60 s, capped at lifetime/10); the token cache reads a clock the test moves.
        auth_peer.expires_in = 100
        now = [1000.0]
        d.auth.clock = lambda: now[0]
        d.auth.invalidate()
        await d.deliver(make_item(bundle()))
        assert len(auth_peer.tokens) == 4
        now[0] = 1089.5
        await d.deliver(make_item(bundle()))
        assert len(auth_peer.tokens) == 4  # still cached
        now[0] = 1090.0
        await d.deliver(make_item(bundle()))
        assert auth_peer.tokens[4:] == ["tok-5"]  # refreshed, before the old one expired
        assert auth_peer.seen_auth[-1] == "Bearer tok-5"
        await d.close()

    run(go())
    req = auth_peer.token_requests[0]
    assert req["grant_type"] == "client_credentials" and req["scope"] == "system%2F%2A.write"
    assert base64.b64decode(req["authorization"][6:]) == b"sluice:s3cret%2F%2B"
    assert all(a.startswith("Bearer tok-") for a in auth_peer.seen_auth)


def test_bearer_and_basic(
    auth_peer: AuthPeer, ctx: DestinationContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pw").write_text("pa55\n")
    monkeypatch.setenv("SYN_TOKEN", "tok-static")
    auth_peer.valid.add("tok-static")
    run(
        deliver_once(
            dest(ctx, auth_peer.url, auth={"type": "bearer", "token": {"env": "SYN_TOKEN"}}), bundle()
        )
    )
    run(
        deliver_once(
            dest(ctx, auth_peer.url, auth={"type": "basic", "username": "svc", "password": {"file": "pw"}}),
            bundle(),
        )
    )
    assert auth_peer.seen_auth == ["Bearer tok-static", "Basic " + base64.b64encode(b"svc:pa55").decode()]


def test_config_errors(ctx: DestinationContext) -> None:
    with pytest.raises(ConfigError, match="must come from the environment or a file"):
        dest(ctx, "http://127.0.0.1:9", auth={"type": "bearer", "token": "literal-token"})
    with pytest.raises(ConfigError, match="unknown option"):
        dest(
            ctx,
            "http://127.0.0.1:9",
            auth={"type": "basic", "username": "u", "password": {"env": "X"}, "pw": 1},
        )
    with pytest.raises(ConfigError, match="not one of"):
        dest(ctx, "http://127.0.0.1:9", mode="bulk")
    with pytest.raises(ConfigError, match="base_url"):
        dest(ctx, "ftp://x")
    with pytest.raises(ConfigError, match="unknown option"):
        FhirDestination("ehr", {"base_url": "http://x", "retries": 3}, ctx)
    with pytest.raises(ConfigError, match="missing required option 'base_url'"):
        FhirDestination("ehr", {}, ctx)
    with pytest.raises(ConfigError, match="concurrency"):
        dest(ctx, "http://127.0.0.1:9", concurrency=-1)


# ---------------------------------------------------------------------------------------- TLS / mTLS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=Sluice Test CA",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN=sluice-{name}",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            cwd=d,
        )
    return d


def test_mutual_tls_with_custom_ca(
    pki: Path, ctx: DestinationContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(pki / "server.crt", pki / "server.key")
    sctx.load_verify_locations(pki / "ca.crt")
    sctx.verify_mode = ssl.CERT_REQUIRED
    peer = AuthPeer(sctx)
    monkeypatch.setenv("SYN_GATEWAY_AUTH", "Basic " + base64.b64encode(b"gw:synthetic").decode())
    mtls = {"type": "mtls", "cert": str(pki / "client.crt"), "key": str(pki / "client.key")}
    ca = {"ca_file": str(pki / "ca.crt")}
    headers = {"Authorization": {"env": "SYN_GATEWAY_AUTH"}}
    try:
        # custom CA + client certificate: delivered (the peer requires the client certificate)
        assert run(
            deliver_once(dest(ctx, peer.url, auth=mtls, tls=ca, headers=headers), bundle())
        ).startswith("transaction HTTP 200")
        # no custom CA: verification is on by default and fails → retryable, with a hint
        with pytest.raises(DeliveryError, match=r"certificate verification failed.*ca_file") as info:
            run(deliver_once(dest(ctx, peer.url, auth=mtls, headers=headers), bundle()))
        assert info.value.retryable
        # CA but no client certificate: the server refuses (in TLS 1.3 only after the handshake, so
        # the alert may surface on the first read); either way a retryable DeliveryError, many times over
        for _ in range(5):
            with pytest.raises(DeliveryError) as refused:
                run(deliver_once(dest(ctx, peer.url, tls=ca, headers=headers), bundle()))
            assert refused.value.retryable
        # a credential header written literally in the YAML is refused
        with pytest.raises(ConfigError, match="looks like a credential"):
            dest(ctx, peer.url, headers={"Authorization": "Bearer literal"})
    finally:
        peer.close()


@pytest.mark.fhirserver
def test_test_server_survives_a_client_killed_mid_request(fhir_server: Any) -> None:
    """The crash tests SIGKILL the engine while it posts bundles: the test server must shrug off a
    connection reset in the middle of a request body (it used to exit, and every later delivery
    failed with 'cannot connect')."""
    import socket
    import struct
    from urllib.parse import urlsplit

    port = urlsplit(fhir_server.base_url).port
    assert port is not None
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b'POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n{"resourceType":')
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # RST with the body unfinished
    # The server (one event loop) accepts in order: by the time it answers this later request it has
    # read the three reset connections, and an error there would have ended the process already.
    assert isinstance(fhir_server.search("Patient"), list)
    assert fhir_server.proc.poll() is None


# A synthetic ORU whose results carry more digits than a float or a 64-bit integer (issue #12)
LONG_RESULT = "123456789012345678901234567890.50"
LONG_BOUND = "18446744073709551616"
LONG_ORU = (
    "MSH|^~\\&|LAB|NORTH|EHR|HOSP|20250101120000||ORU^R01^ORU_R01|C1|P|2.5.1\r"
    "PID|1||SYN0001^^^NORTH^MR||Testpatient^Synthetic||19800101|F\r"
    "OBR|1|PL1|FL1^LAB|2093-3^Cholesterol^LN|||20250101110000\r"
    f"OBX|1|NM|2093-3^Cholesterol^LN||{LONG_RESULT}|mg/dL|1-{LONG_BOUND}||||F\r"
).encode()


@pytest.mark.fhirserver
@pytest.mark.parametrize("mode", ["transaction", "per-resource"])
def test_long_decimals_reach_the_server_with_their_digits(
    fhir: FhirServer, ctx: DestinationContext, mode: str
) -> None:
    """The hl7-to-fhir step writes the digits as sent; the destination reads the Bundle and sends them on
    unchanged (whole or per resource); Medplum validates and stores the Observation."""
    import httpx

    from engine import hl7
    from engine.pipeline import StageContext, Work
    from transforms.fhir_step import make

    step = make({"derive_unknown_systems": True}, StageContext("lab", ctx.base_dir, "channels/lab.yaml"))
    payload = step(Work(hl7.parse_bytes(LONG_ORU), LONG_ORU, LONG_ORU, "x-application/hl7-v2+er7")).payload
    assert f'"value":{LONG_RESULT},'.encode() in payload
    sent: list[bytes] = []

    async def record(request: httpx.Request) -> None:
        if request.method in ("POST", "PUT"):
            sent.append(request.read())

    async def go() -> str:
        d = dest(ctx, fhir.base_url, mode=mode)
        await d.start()
        assert d.client is not None
        d.client.event_hooks["request"].append(record)
        try:
            return await d.deliver(make_item(payload, message_type="ORU", trigger="R01"))
        finally:
            await d.close()

    assert run(go()).startswith(mode)
    wire = b"".join(sent)
    assert f'"value":{LONG_RESULT},'.encode() in wire and f'"value":{LONG_BOUND},'.encode() in wire
    (obs,) = fhir.search("Observation")
    # Medplum holds numbers as JavaScript doubles: accepted and stored, rounded only on its side
    assert obs["valueQuantity"]["value"] == pytest.approx(float(LONG_RESULT))
    assert obs["referenceRange"][0]["high"]["value"] == pytest.approx(float(LONG_BOUND))
