"""The fhir-poll poller against a small real HTTP server (127.0.0.1): the query it sends (incremental,
sorted, paged, the channel's params), the destination-style auth header, keyset paging past a full page,
the cursor committed with each page, and nothing stored twice (synthetic data)."""

from __future__ import annotations

import asyncio
import dataclasses
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from sqlalchemy import select

from engine import config as config_mod
from engine.destinations.base import DestinationContext
from engine.intake import Committer
from engine.sources.fhir_poll import FhirPoller
from engine.store import CURSORS, SOURCE_RESOURCES, M, Store
from tests.support.engine import write_config


class FakeFhir:
    """Answers ``GET /fhir/Appointment?...`` from a list sorted by lastUpdated, honouring _lastUpdated
    (gt/ge), _count and _offset; records every query and Authorization header."""

    def __init__(self, resources: list[dict[str, Any]]):
        self.resources = resources
        self.queries: list[dict[str, list[str]]] = []
        self.auth: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                q = parse_qs(urlsplit(self.path).query)
                outer.queries.append(q)
                outer.auth.append(self.headers.get("Authorization", ""))
                found = sorted(outer.resources, key=lambda r: r["meta"]["lastUpdated"])
                if "_lastUpdated" in q:
                    op, when = q["_lastUpdated"][0][:2], q["_lastUpdated"][0][2:]
                    found = [
                        r
                        for r in found
                        if (
                            r["meta"]["lastUpdated"] > when
                            if op == "gt"
                            else r["meta"]["lastUpdated"] >= when
                        )
                    ]
                offset = int(q.get("_offset", ["0"])[0])
                found = found[offset : offset + int(q["_count"][0])]
                body = json.dumps(
                    {
                        "resourceType": "Bundle",
                        "type": "searchset",
                        "entry": [{"resource": r, "search": {"mode": "match"}} for r in found],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def appt(i: int, when: str, version: str = "1") -> dict[str, Any]:
    return {
        "resourceType": "Appointment",
        "id": f"a{i}",
        "meta": {"versionId": version, "lastUpdated": when},
        "status": "booked",
    }


@pytest.fixture
def fake() -> Iterator[FakeFhir]:
    same = "2026-12-04T10:00:00.000Z"
    srv = FakeFhir([appt(i, same) for i in range(5)] + [appt(9, "2026-12-04T10:00:01.000Z")])
    try:
        yield srv
    finally:
        srv.server.shutdown()


def poller(tmp_path: Path, port: int, store_url: str) -> tuple[FhirPoller, Store, Committer]:
    routes = write_config(
        tmp_path,
        channels={},
        destinations={"out": {"kind": "file", "directory": str(tmp_path / "out")}},
        store=store_url,
    )
    (tmp_path / "channels" / "portal.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "portal",
                "source": {
                    "kind": "fhir-poll",
                    "base_url": f"http://127.0.0.1:{port}/fhir",
                    "resources": ["Appointment"],
                    "params": {"status": "booked"},
                    "page_size": 2,
                    "auth": {"type": "bearer", "token": {"env": "SYN_POLL_TOKEN"}},
                },
                "transform": [{"fhir-to-hl7": {}}],
                "routes": [{"destination": "out"}],
            }
        )
    )
    cfg = config_mod.load(routes)
    store = Store(store_url)
    committer = Committer(store)
    committer.start()
    p = FhirPoller(cfg.channels[0], store, committer.run_op, ctx=DestinationContext(tmp_path, "x"))
    return p, store, committer


def test_poll_queries_pages_auth_cursor_and_no_double(
    tmp_path: Path, fake: FakeFhir, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SYN_POLL_TOKEN", "synthetic-token")
    p, store, committer = poller(tmp_path, fake.port, store_url)

    async def rounds() -> list[int]:
        import httpx

        p.client = httpx.AsyncClient()
        try:
            first = await p.poll_once("Appointment")
            second = await p.poll_once("Appointment")  # the overlap window fetches them again
            fake.resources.append(appt(2, "2026-12-04T10:00:05.000Z", "2"))  # a new version of a2
            third = await p.poll_once("Appointment")
            return [first, second, third]
        finally:
            await p.client.aclose()

    try:
        assert asyncio.run(rounds()) == [6, 0, 1]
        q0 = fake.queries[0]
        assert q0["_sort"] == ["_lastUpdated"] and q0["_count"] == ["2"] and q0["status"] == ["booked"]
        assert "_lastUpdated" not in q0  # no cursor yet: everything
        # five share one timestamp: a full page of it is stepped past with _offset, never skipped
        assert any("_offset" in q for q in fake.queries)
        later = fake.queries[-1]
        assert later["_lastUpdated"][0].startswith("ge") or later["_lastUpdated"][0].startswith("gt")
        assert set(fake.auth) == {"Bearer synthetic-token"}
        with store.engine.connect() as conn:
            (cursor,) = conn.execute(CURSORS.select()).all()
        assert cursor.cursor == "2026-12-04T10:00:05.000Z"
        assert sum(store.status_counts().values()) == 7
    finally:
        committer.stop()
        store.close()


# ---------------------------------------------------------------------- deletions through _history
class HistoryFhir:
    """A FHIR server with type-level history: ``/fhir/metadata`` (a CapabilityStatement listing
    ``history-type`` for the given types, or a 404), ``/fhir/Appointment`` searches (every current
    resource, one page) and ``/fhir/Appointment/_history`` from a journal (newest first, ``_since``,
    ``_count``, next links by position); ``history_status`` answers ``_history`` with that status."""

    def __init__(self, history_types: tuple[str, ...] | None = ("Appointment",), history_status: int = 200):
        self.current: dict[str, dict[str, Any]] = {}
        self.journal: list[dict[str, Any]] = []
        self.requests: list[str] = []
        self.clock = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                u = urlsplit(self.path)
                q = parse_qs(u.query)
                outer.requests.append(self.path)
                status, body = 200, None
                if u.path == "/fhir/metadata":
                    if history_types is None:
                        status, body = 404, {"resourceType": "OperationOutcome"}
                    else:
                        body = {
                            "resourceType": "CapabilityStatement",
                            "rest": [
                                {
                                    "mode": "server",
                                    "resource": [
                                        {
                                            "type": t,
                                            "interaction": [
                                                {"code": "search-type"},
                                                {"code": "history-type"},
                                            ],
                                        }
                                        for t in history_types
                                    ],
                                }
                            ],
                        }
                elif u.path == "/fhir/Appointment/_history":
                    if history_status != 200:
                        status, body = history_status, {"resourceType": "OperationOutcome"}
                    else:
                        body = outer.history_page(q)
                else:
                    found = sorted(outer.current.values(), key=lambda r: r["meta"]["lastUpdated"])
                    if "_lastUpdated" in q:
                        when = q["_lastUpdated"][0][2:]
                        found = [r for r in found if r["meta"]["lastUpdated"] >= when]
                    body = {
                        "resourceType": "Bundle",
                        "type": "searchset",
                        "entry": [{"resource": r} for r in found],
                    }
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def now(self) -> str:
        self.clock += 1
        return f"2026-12-04T10:00:{self.clock:02d}.000Z"

    def put(self, rid: str, placer: str) -> None:
        version = str(sum(1 for j in self.journal if j["id"] == rid) + 1)
        res = {
            "resourceType": "Appointment",
            "id": rid,
            "meta": {"versionId": version, "lastUpdated": self.now()},
            "identifier": [{"system": "urn:portal:appointment", "value": placer}],
            "status": "booked",
        }
        self.current[rid] = res
        self.journal.append({"id": rid, "method": "PUT", "resource": res, "at": res["meta"]["lastUpdated"]})

    def delete(self, rid: str) -> None:
        del self.current[rid]
        version = str(sum(1 for j in self.journal if j["id"] == rid) + 1)
        self.journal.append({"id": rid, "method": "DELETE", "version": version, "at": self.now()})

    def history_page(self, q: dict[str, list[str]]) -> dict[str, Any]:
        since = q.get("_since", [""])[0]
        count = int(q.get("_count", ["20"])[0])
        before = int(q.get("_before", [str(len(self.journal))])[0])
        picked = [i for i in range(before - 1, -1, -1) if self.journal[i]["at"] >= since][: count + 1]
        entries = []
        for i in picked[:count]:
            j = self.journal[i]
            if j["method"] == "DELETE":
                entries.append(
                    {
                        "request": {"method": "DELETE", "url": f"Appointment/{j['id']}"},
                        "response": {
                            "status": "410 Gone",
                            "lastModified": j["at"],
                            "etag": f'W/"{j["version"]}"',
                        },
                    }
                )
            else:
                entries.append(
                    {"resource": j["resource"], "request": {"method": "PUT", "url": f"Appointment/{j['id']}"}}
                )
        links = []
        if len(picked) > count:  # a relative next link, as some servers write them
            links.append(
                {
                    "relation": "next",
                    "url": f"Appointment/_history?_since={since}&_count={count}&_before={picked[count - 1]}",
                }
            )
        return {"resourceType": "Bundle", "type": "history", "link": links, "entry": entries}


def test_deletions_are_taken_from_the_history_once_as_the_last_version_marked_deleted(
    tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx
    import orjson

    from engine.metrics import Metrics
    from transforms.fhir_to_v2.outbound import is_deleted

    monkeypatch.setenv("SYN_POLL_TOKEN", "synthetic-token")
    srv = HistoryFhir()
    srv.put("a0", "PA-OLD")
    srv.delete("a0")  # deleted before the channel started, within the overlap window: see below
    srv.put("a1", "PA-1")
    srv.put("a2", "PA-2")
    p, store, committer = poller(tmp_path, srv.port, store_url)
    metrics = Metrics(channels=["portal"])
    p.deletions_gauge = metrics.poll_deletions

    async def round_(rtype: str = "Appointment") -> tuple[int, int]:
        await p.start_history(rtype)
        taken = await p.poll_once(rtype)
        return taken, await p.poll_history(rtype)

    async def scenario() -> list[tuple[int, int]]:
        p.client = httpx.AsyncClient()
        try:
            await p.read_capabilities()
            assert p.deletions == {"Appointment": True}
            got = [await round_()]  # a1, a2 taken; the history starts at its newest entry (- overlap)
            srv.delete("a1")
            srv.put("a3", "PA-3")
            srv.put("a3", "PA-3")  # a second version: the history has more than a page (of 2) now
            got.append(await round_())
            got.append(await round_())  # the overlap reads the deletion again: not stored twice
            return got
        finally:
            await p.client.aclose()

    try:
        # round 2: a3's newest version and a1's deletion; round 3 reads them all again: nothing new
        assert asyncio.run(scenario()) == [(2, 1), (1, 1), (0, 0)]
        assert any("_before=" in r for r in srv.requests), srv.requests  # the next links were followed
        probe = next(r for r in srv.requests if "/_history" in r)
        assert "_count=1" in probe and "_since" not in probe
        with store.engine.connect() as conn:
            cursors = {r.resource: r.cursor for r in conn.execute(CURSORS.select()).all()}
        assert cursors["Appointment/_history"] == "2026-12-04T10:00:07.000Z"
        with store.engine.connect() as conn:
            bodies = [orjson.loads(r[0]) for r in conn.execute(select(M.c.raw)).all()]
        tombs = {b["id"]: b for b in bodies if is_deleted(b)}
        assert sorted(tombs) == ["a0", "a1"]
        assert tombs["a1"]["identifier"][0]["value"] == "PA-1"  # the last version taken, marked deleted
        assert tombs["a1"]["meta"]["versionId"] == "2"
        assert tombs["a1"]["meta"]["lastUpdated"] == "2026-12-04T10:00:05.000Z"
        # a0 was deleted (within the overlap before the start) without a version taken: only its id,
        # which sends nothing (fhir-to-hl7: deleted before anything was sent)
        assert set(tombs["a0"]) == {"resourceType", "id", "meta"}
        text = metrics.render()[0].decode()
        assert 'sluice_fhir_poll_deletions_followed{channel="portal",resource="Appointment"} 1.0' in text
        # retention drops each resource's pointer to its newest version with the message
        with store.engine.connect() as conn:
            assert len(conn.execute(select(SOURCE_RESOURCES)).all()) == 4  # a0..a3
        with store.write() as conn:
            conn.execute(M.update().values(status="processed"))
        store.prune("portal", bodies_before=None, rows_before=time.time() + 1)
        with store.engine.connect() as conn:
            assert conn.execute(select(SOURCE_RESOURCES)).all() == []
            assert {r.resource for r in conn.execute(CURSORS.select()).all()} == {
                "Appointment",
                "Appointment/_history",
            }  # the cursors stay
    finally:
        committer.stop()
        store.close()
        srv.server.shutdown()


@pytest.mark.parametrize(
    ("server", "why"),
    [
        (dict(history_types=None), "no CapabilityStatement at /metadata (HTTP 404)"),
        (dict(history_types=("Patient",)), "has no history-type for Appointment"),
        (dict(history_status=405), "answered _history with HTTP 405"),
        (dict(history_status=404), "answered _history with HTTP 404"),
    ],
)
def test_a_server_without_type_history_is_said_once_and_shown_by_the_gauge(
    tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch, server: dict[str, Any], why: str
) -> None:
    import structlog

    from engine.metrics import Metrics

    monkeypatch.setenv("SYN_POLL_TOKEN", "synthetic-token")
    srv = HistoryFhir(**server)
    srv.put("a1", "PA-1")
    p, store, committer = poller(tmp_path, srv.port, store_url)
    metrics = Metrics(channels=["portal"])
    p.deletions_gauge = metrics.poll_deletions
    p.poll = dataclasses.replace(p.poll, interval=0.05)

    async def three_rounds() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(p.run(stop))
        while p.polls < 3:
            await asyncio.sleep(0.02)
        stop.set()
        await task

    try:
        with structlog.testing.capture_logs() as logs:
            asyncio.run(three_rounds())
        warned = [e for e in logs if e["event"] == "fhir_poll_deletions_not_followed"]
        assert len(warned) == 1 and why in warned[0]["reason"] and warned[0]["resource"] == "Appointment"
        assert p.deletions == {"Appointment": False} and p.taken == 1  # the search goes on
        assert sum(1 for r in srv.requests if "/_history" in r) <= 1  # asked once at most
        assert sum(1 for r in srv.requests if "/metadata" in r) == 1
        text = metrics.render()[0].decode()
        assert 'sluice_fhir_poll_deletions_followed{channel="portal",resource="Appointment"} 0.0' in text
    finally:
        committer.stop()
        store.close()
        srv.server.shutdown()
