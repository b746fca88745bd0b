"""The http source's ASGI app without a server (a unit test; tests/e2e/test_http_source_e2e.py runs it for
real): back-pressure (503 + Retry-After), the body cap (413), a path outside the endpoint (404), a GET (405)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from engine import config as config_mod
from engine.destinations.base import DestinationContext
from engine.sources.http import HttpSource
from tests.support.engine import write_config


class BusyCommitter:
    def __init__(self, backlog: int) -> None:
        self.backlog = backlog
        self.ops = 0

    async def run_op(self, op: Any, size: int = 0, *, durable: bool = False) -> Any:
        self.ops += 1
        raise AssertionError("the request should have been answered before the store")


def app(tmp_path: Path, committer: BusyCommitter) -> HttpSource:
    routes = write_config(
        tmp_path, channels={}, destinations={"out": {"kind": "file", "directory": str(tmp_path)}}
    )
    (tmp_path / "channels" / "push.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "push",
                "source": {"kind": "http", "port": 0, "max_backlog": 10, "max_body": 1000},
                "transform": ["fhir-to-hl7"],
                "routes": [{"destination": "out"}],
            }
        )
    )
    (ch,) = config_mod.load(routes).channels
    return HttpSource(ch, None, committer, ctx=DestinationContext(tmp_path, "x"))  # type: ignore[arg-type]


def call(source: HttpSource, method: str, path: str, body: bytes) -> tuple[int, dict[bytes, bytes], Any]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(b"content-type", b"application/fhir+json")],
    }
    asyncio.run(source(scope, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"]), orjson.loads(sent[1]["body"])


APPT = orjson.dumps({"resourceType": "Appointment", "id": "a1", "status": "booked"})


@pytest.mark.parametrize(
    ("backlog", "method", "path", "body", "status", "says"),
    [
        pytest.param(11, "POST", "/fhir/Appointment", APPT, 503, "busy", id="back-pressure"),
        pytest.param(0, "POST", "/fhir", b"{" + b" " * 2000 + b"}", 413, "max_body", id="too-large"),
        pytest.param(0, "POST", "/other", APPT, 404, "POST /fhir", id="path"),
        pytest.param(0, "GET", "/fhir/Appointment", b"", 405, "POST /fhir", id="get"),
    ],
)
def test_answers_before_the_store(
    tmp_path: Path, backlog: int, method: str, path: str, body: bytes, status: int, says: str
) -> None:
    committer = BusyCommitter(backlog)
    got, headers, outcome = call(app(tmp_path, committer), method, path, body)
    assert got == status and committer.ops == 0
    assert outcome["resourceType"] == "OperationOutcome" and says in outcome["issue"][0]["diagnostics"]
    if status == 503:
        assert headers[b"retry-after"] == b"1"


def notification(kind: str, *entries: dict[str, Any]) -> bytes:
    status = {"resourceType": "SubscriptionStatus", "status": "active", "type": kind}
    return orjson.dumps(
        {"resourceType": "Bundle", "type": "history", "entry": [{"resource": status}, *entries]}
    )


@pytest.mark.parametrize("kind", ["handshake", "heartbeat", "query-status", "query-event"])
def test_quiet_notifications_store_nothing(tmp_path: Path, kind: str) -> None:
    committer = BusyCommitter(0)
    got, _, outcome = call(app(tmp_path, committer), "POST", "/fhir", notification(kind))
    assert got == 200 and committer.ops == 0
    assert outcome["issue"][0]["diagnostics"] == f"{kind}: nothing to store"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="R4-rest-hook-empty"),
        pytest.param(notification("event-notification"), id="event-without-focus"),
        pytest.param(notification("event-notification", {"fullUrl": "Appointment/a1"}), id="id-only"),
    ],
)
def test_without_fetch_unresolved_notifications_are_200_and_counted(tmp_path: Path, body: bytes) -> None:
    from engine.metrics import Metrics

    committer = BusyCommitter(0)
    source = app(tmp_path, committer)
    metrics = Metrics()
    source.unresolved = metrics.http_unresolved
    got, _, outcome = call(source, "POST", "/fhir", body)
    call(source, "POST", "/fhir", body)
    assert got == 200 and committer.ops == 0
    assert outcome["issue"][0]["severity"] == "warning"
    assert "no source.fetch" in outcome["issue"][0]["diagnostics"]
    kind = "id-only" if b"fullUrl" in body else "empty"
    assert metrics.http_unresolved.labels("push", kind)._value.get() == 2
    assert sum(source.unresolved_since_log.values()) == 1  # the first was logged, the second waits a minute


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_last_stored_body_is_the_newest_version_of_that_resource_only(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """A deletion of a resource only ever pushed in full: its tombstone's body is found by control id
    (``_`` and ``%`` in the prefix are literal, another resource or channel never matches)."""
    import time

    from engine.sources import resources
    from engine.sources.http import last_stored_body
    from engine.store import Store

    url = str(request.getfixturevalue("pg_url")) if backend == "postgres" else f"sqlite:///{tmp_path}/s.db"
    store = Store(url)
    try:

        def row(channel: str, rid: str, version: str, status: str) -> Any:
            res = {"resourceType": "Appointment", "id": rid, "meta": {"versionId": version}, "status": status}
            return resources.message_row(
                channel, res, orjson.dumps(res), source="http", facility="http", received_at=time.time()
            )

        with store.engine.begin() as conn:
            store.insert_messages(
                conn,
                [
                    row("push", "a_1", "1", "booked"),
                    row("push", "a_1", "2", "cancelled"),
                    row("push", "aX1", "3", "noshow"),  # `_` would match X in a LIKE pattern
                    row("push", "a_10", "1", "booked"),  # a longer id with the same start
                    row("other", "a_1", "4", "noshow"),  # another channel
                ],
            )
        with store.engine.connect() as conn:
            got = last_stored_body(conn, "push", "Appointment/a_1")
            assert got is not None and orjson.loads(got)["meta"]["versionId"] == "2"
            assert last_stored_body(conn, "push", "Appointment/a%1") is None
            assert last_stored_body(conn, "push", "Appointment/a") is None
    finally:
        store.close()
