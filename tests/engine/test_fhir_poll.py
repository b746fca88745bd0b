"""The fhir-poll poller against a small real HTTP server (127.0.0.1): the query it sends (incremental,
sorted, paged, the channel's params), the destination-style auth header, keyset paging past a full page,
the cursor committed with each page, and nothing stored twice (synthetic data)."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from engine import config as config_mod
from engine.destinations.base import DestinationContext
from engine.intake import Committer
from engine.sources.fhir_poll import FhirPoller
from engine.store import CURSORS, Store
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
