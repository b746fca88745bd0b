"""``kind: http`` with ``fetch:``, end to end with real peers: the Medplum FHIR server is where the changed
resources are read from (through a fault proxy), the engine runs as a real process, and a test EHR takes
the SIU.  R4B id-only notifications (absolute and relative focus, each sent twice) and R4 rest-hooks with
an empty body (an incremental search since the cursor) give exactly S12, S13, S15 (and S17 for a
deletion: the focus answered 404); a read that fails is answered 503 with nothing stored and the retry
stores once; a focus on another server is refused; handshakes and heartbeats store nothing.  Without
``fetch:`` such notifications are 200, counted and logged (synthetic data)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.store import Store
from tests.support.ehr import EhrReceiver
from tests.support.engine import EngineProcess, free_port, write_config
from tests.support.faultproxy import ThreadedFaultProxy
from tests.support.fhirserver import FhirServer
from tests.support.polling import wait_for

pytestmark = pytest.mark.fhirserver

PLACER = "urn:portal:appointment"
APPOINTMENT: dict[str, Any] = {
    "resourceType": "Appointment",
    "identifier": [{"system": PLACER, "value": "PN-1"}],
    "status": "booked",
    "start": "2026-12-10T17:00:00Z",
    "end": "2026-12-10T17:30:00Z",
    "participant": [{"actor": {"reference": "Patient/pat-1"}, "status": "accepted"}],
}
HEADERS = {"Content-Type": "application/fhir+json"}


def appointment(placer: str, **changes: Any) -> dict[str, Any]:
    res = copy.deepcopy(APPOINTMENT)
    res["identifier"][0]["value"] = placer
    res.update(changes)
    return res


def id_only(n: int, *focus: str, kind: str = "event-notification") -> dict[str, Any]:
    """An R4B subscription-notification Bundle, content id-only: SubscriptionStatus with the focus
    references, then an entry per focus with fullUrl and no resource."""
    return {
        "resourceType": "Bundle",
        "type": "history",
        "timestamp": "2026-12-05T02:00:00Z",
        "entry": [
            {
                "fullUrl": "urn:uuid:9a3a3a49-7c55-4d4e-a8c2-000000000001",
                "resource": {
                    "resourceType": "SubscriptionStatus",
                    "status": "active",
                    "type": kind,
                    "eventsSinceSubscriptionStart": str(n),
                    "notificationEvent": [{"eventNumber": str(n), "focus": {"reference": f}} for f in focus],
                    "subscription": {"reference": "Subscription/sub-1"},
                },
            },
            *({"fullUrl": f, "request": {"method": "PUT", "url": f}} for f in focus),
        ],
    }


@pytest.fixture
def fhir(fhir_server: FhirServer) -> FhirServer:
    fhir_server.reset()
    return fhir_server


@pytest.fixture
def ehr() -> Any:
    with EhrReceiver() as receiver:
        yield receiver


def channel(port: int, fetch_base: str | None) -> dict[str, Any]:
    source: dict[str, Any] = {"kind": "http", "host": "127.0.0.1", "port": port, "path": "/notify"}
    source["resources"] = ["Appointment"]
    if fetch_base is not None:
        source["fetch"] = {"base_url": fetch_base, "timeout": 10, "page_size": 2}
    return {
        "source": source,
        "transform": [{"fhir-to-hl7": {"sending_facility": "PORTAL", "placer_system": PLACER}}],
        "routes": [{"destination": "ehr-mllp"}],
    }


def engine(tmp_path: Path, ehr: EhrReceiver, port: int, fetch_base: str | None) -> EngineProcess:
    admin = free_port()
    routes = write_config(
        tmp_path,
        channels={"portal-notify": channel(port, fetch_base)},
        destinations={
            "ehr-mllp": {"kind": "mllp", "host": "127.0.0.1", "port": ehr.port, "payload": "output"}
        },
    )
    return EngineProcess(routes, port, env={"SLUICE_ADMIN_PORT": str(admin)})


def sent(ehr: EhrReceiver) -> list[tuple[str, str]]:
    return [(m["SCH-1.1"], m.trigger) for m in ehr.received()]


def settle(ehr: EhrReceiver, n: int) -> list[tuple[str, str]]:
    wait_for(
        lambda: len(ehr.received()) >= n, timeout=60, what=lambda: f"{n} messages at the EHR, got {sent(ehr)}"
    )
    time.sleep(1.0)
    return sent(ehr)


def stored(tmp_path: Path) -> int:
    s = Store(f"sqlite:///{tmp_path}/sluice.db", create=False)
    try:
        return sum(s.status_counts().values())
    finally:
        s.close()


def diagnostics(resp: httpx.Response) -> str:
    body = resp.json()
    assert body["resourceType"] == "OperationOutcome"
    return str(body["issue"][0]["diagnostics"])


def test_id_only_notifications_are_read_from_the_fetch_server(
    tmp_path: Path, fhir: FhirServer, ehr: EhrReceiver
) -> None:
    port = free_port()
    with ThreadedFaultProxy(fhir.base_url) as proxy, engine(tmp_path, ehr, port, proxy.url):
        url = f"http://127.0.0.1:{port}/notify"
        for kind in ("handshake", "heartbeat"):
            quiet = httpx.post(url, json=id_only(0, kind=kind), headers=HEADERS)
            assert quiet.status_code == 200 and "nothing to store" in diagnostics(quiet)

        created = fhir.request("POST", "/Appointment", appointment("PN-1"))
        ref = f"Appointment/{created['id']}"
        absolute = f"{proxy.url}/{ref}"
        answers = [
            httpx.post(url, json=id_only(1, absolute), headers=HEADERS) for _ in range(2)
        ]  # sent twice
        assert [a.status_code for a in answers] == [201, 200]
        assert "stored 1" in diagnostics(answers[0]) and "1 already stored" in diagnostics(answers[1])
        assert settle(ehr, 1) == [("PN-1", "S12")]

        moved = fhir.request(
            "PUT", f"/{ref}", {**created, "start": "2026-12-11T17:00:00Z", "end": "2026-12-11T17:30:00Z"}
        )
        relative = f"{ref}/_history/{moved['meta']['versionId']}"  # a version-specific, relative focus
        assert httpx.post(url, json=id_only(2, relative), headers=HEADERS).status_code == 201
        assert httpx.post(url, json=id_only(2, relative), headers=HEADERS).status_code == 200
        assert settle(ehr, 2) == [("PN-1", "S12"), ("PN-1", "S13")]

        # the read fails once: 503 with Retry-After and nothing stored; the server's retry stores it once
        fhir.request("PUT", f"/{ref}", {**moved, "status": "cancelled"})
        before = stored(tmp_path)
        proxy.http_error(500, times=1)
        failed = httpx.post(url, json=id_only(3, absolute), headers=HEADERS)
        assert failed.status_code == 503 and failed.headers["retry-after"] == "10"
        assert "HTTP 500" in diagnostics(failed) and "send the notification again" in diagnostics(failed)
        assert stored(tmp_path) == before
        retried = httpx.post(url, json=id_only(3, absolute), headers=HEADERS)
        assert retried.status_code == 201 and stored(tmp_path) == before + 1
        assert settle(ehr, 3) == [("PN-1", "S12"), ("PN-1", "S13"), ("PN-1", "S15")]

        # a focus on another server is never read: 422, and the proxy saw no request for it
        seen = len(proxy.log)
        foreign = httpx.post(url, json=id_only(4, f"http://127.0.0.1:{free_port()}/{ref}"), headers=HEADERS)
        assert foreign.status_code == 422 and "only from source.fetch.base_url" in diagnostics(foreign)
        assert len(proxy.log) == seen and stored(tmp_path) == before + 1

        # a second appointment, deleted on the server before its notification is read: the focus answers
        # 404, stored as a deletion of the last version taken (S17 for the same SCH-1)
        second = fhir.request("POST", "/Appointment", appointment("PN-2"))
        assert (
            httpx.post(url, json=id_only(5, f"Appointment/{second['id']}"), headers=HEADERS).status_code
            == 201
        )
        settle(ehr, 4)
        fhir.request("DELETE", f"/Appointment/{second['id']}")
        gone = httpx.post(url, json=id_only(6, f"Appointment/{second['id']}"), headers=HEADERS)
        assert gone.status_code == 201 and "1 deletion" in diagnostics(gone)
        assert settle(ehr, 5)[3:] == [("PN-2", "S12"), ("PN-2", "S17")]

        # pushed in full (never read), then deleted: the R5 full-resource notification of a deletion has
        # an entry without resource; the 404 is a deletion of the version pushed (its SCH-1, not the id).
        # Here it comes in one notification with another appointment's new version, carried in full.
        third = fhir.request("POST", "/Appointment", appointment("PN-3"))
        fourth = fhir.request("POST", "/Appointment", appointment("PN-4"))
        refs = [f"Appointment/{third['id']}", f"Appointment/{fourth['id']}"]
        full = id_only(7, *refs)
        full["entry"][1]["resource"], full["entry"][2]["resource"] = third, fourth
        assert httpx.post(url, json=full, headers=HEADERS).status_code == 201
        assert sorted(settle(ehr, 7)[5:]) == [("PN-3", "S12"), ("PN-4", "S12")]
        fhir.request("DELETE", f"/{refs[0]}")
        moved4 = fhir.request(
            "PUT", f"/{refs[1]}", {**fourth, "start": "2026-12-13T17:00:00Z", "end": "2026-12-13T17:30:00Z"}
        )
        mixed = id_only(8, *refs)
        mixed["entry"][1]["request"] = {"method": "DELETE", "url": refs[0]}
        mixed["entry"][2]["resource"] = moved4
        seen = len(proxy.log)
        answer = httpx.post(url, json=mixed, headers=HEADERS)
        assert answer.status_code == 201 and "1 deletion" in diagnostics(answer)
        assert [p for _, p, _ in proxy.log[seen:]] == [f"/{refs[0]}"]  # the carried one is not read
        assert sorted(settle(ehr, 9)[7:]) == [("PN-3", "S17"), ("PN-4", "S13")]


def test_empty_rest_hooks_search_since_the_cursor(tmp_path: Path, fhir: FhirServer, ehr: EhrReceiver) -> None:
    port = free_port()
    with ThreadedFaultProxy(fhir.base_url) as proxy, engine(tmp_path, ehr, port, proxy.url):
        url = f"http://127.0.0.1:{port}/notify"
        created = [fhir.request("POST", "/Appointment", appointment(f"PE-{i}")) for i in range(3)]
        first = httpx.post(url, content=b"", headers=HEADERS)  # R4 rest-hook, payload omitted
        assert first.status_code == 200 and "stored 3" in diagnostics(first)  # three, in pages of 2
        assert sorted(settle(ehr, 3)) == [("PE-0", "S12"), ("PE-1", "S12"), ("PE-2", "S12")]

        a = created[1]
        fhir.request(
            "PUT",
            f"/Appointment/{a['id']}",
            {**a, "start": "2026-12-12T17:00:00Z", "end": "2026-12-12T17:30:00Z"},
        )
        again = [httpx.post(url, content=b"", headers=HEADERS) for _ in range(2)]  # delivered twice
        assert [r.status_code for r in again] == [200, 200]
        assert "stored 1" in diagnostics(again[0]) and "stored 0" in diagnostics(again[1])
        assert settle(ehr, 4)[3:] == [("PE-1", "S13")]

        # the search fails: 503 and the cursor stays; the next notification takes the change once
        b = created[2]
        fhir.request("PUT", f"/Appointment/{b['id']}", {**b, "status": "cancelled"})
        proxy.http_error(503, times=1)
        failed = httpx.post(url, content=b"", headers=HEADERS)
        assert failed.status_code == 503 and "searching Appointment" in diagnostics(failed)
        ok = httpx.post(url, content=b"", headers=HEADERS)
        assert ok.status_code == 200 and "stored 1" in diagnostics(ok)
        assert settle(ehr, 5)[4:] == [("PE-2", "S15")]


def test_without_fetch_they_are_answered_counted_and_logged(tmp_path: Path, ehr: EhrReceiver) -> None:
    port = free_port()
    with engine(tmp_path, ehr, port, None) as proc:
        url = f"http://127.0.0.1:{port}/notify"
        answers = [
            httpx.post(url, content=b"", headers=HEADERS),
            httpx.post(url, json=id_only(1, "Appointment/a1"), headers=HEADERS),
            httpx.post(url, json=id_only(2, "Appointment/a1"), headers=HEADERS),
        ]
        assert [a.status_code for a in answers] == [200] * 3
        assert all("no source.fetch" in diagnostics(a) for a in answers)
        # one focus carried in full, one only named (a deletion): the carried one is stored, the other counted
        mixed = id_only(3, "Appointment/a2", "Appointment/a3")
        mixed["entry"][1]["resource"] = {**appointment("PN-9"), "id": "a2", "meta": {"versionId": "1"}}
        assert httpx.post(url, json=mixed, headers=HEADERS).status_code == 201
        admin = proc.extra_env["SLUICE_ADMIN_PORT"]
        metrics = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=10).text
        assert (
            'sluice_http_notifications_unresolved_total{channel="portal-notify",kind="empty"} 1.0' in metrics
        )
        assert (
            'sluice_http_notifications_unresolved_total{channel="portal-notify",kind="id-only"} 3.0'
            in metrics
        )
        log = proc.log.read_text()
    lines = [json.loads(x) for x in log.splitlines() if '"http_notifications_unresolved"' in x]
    assert len(lines) == 1 and lines[0]["level"] == "warning"  # once a minute at most
    assert stored(tmp_path) == 1
    check = subprocess.run(
        [sys.executable, "-m", "engine.cli", "check", "--config", str(tmp_path / "routes.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0 and "portal-notify: the http source has no fetch: section" in check.stderr
