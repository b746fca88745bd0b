"""``kind: http`` end to end: the engine as a real process takes FHIR Appointments pushed over HTTP (plain
resources and Subscription notification Bundles, each sent twice), answers after the commit, and the test
EHR gets exactly S12, S13, S15; Idempotency-Key, bearer auth and what a refusal says."""

from __future__ import annotations

import copy
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.engine import test_tls_and_shutdown as _tls
from tests.support.ehr import EhrReceiver
from tests.support.engine import EngineProcess, free_port, write_config
from tests.support.polling import wait_for

pki = _tls.pki  # the throwaway CA and certificates (a module-scoped fixture)

PLACER = "urn:portal:appointment"
TOKEN = "synthetic-test-token"
APPOINTMENT: dict[str, Any] = {
    "resourceType": "Appointment",
    "id": "appt-h1",
    "meta": {"versionId": "1", "lastUpdated": "2026-12-04T10:00:00Z"},
    "identifier": [{"system": PLACER, "value": "PH-1"}],
    "status": "booked",
    "start": "2026-12-10T17:00:00Z",
    "end": "2026-12-10T17:30:00Z",
    "participant": [{"actor": {"reference": "Patient/pat-1"}, "status": "accepted"}],
}


def version(n: int, **changes: Any) -> dict[str, Any]:
    res = copy.deepcopy(APPOINTMENT)
    res["meta"]["versionId"] = str(n)
    res.update(changes)
    return res


def notification(res: dict[str, Any], n: int) -> dict[str, Any]:
    """An R4B/R5-style subscription-notification Bundle (the R4 backport's shape: status first, then the focus)."""
    return {
        "resourceType": "Bundle",
        "type": "history",
        "entry": [
            {
                "resource": {
                    "resourceType": "SubscriptionStatus",
                    "status": "active",
                    "type": "event-notification",
                    "eventsSinceSubscriptionStart": str(n),
                }
            },
            {
                "fullUrl": f"Appointment/{res['id']}",
                "resource": res,
                "request": {"method": "PUT", "url": f"Appointment/{res['id']}"},
            },
        ],
    }


@pytest.fixture
def setup(tmp_path: Path) -> Any:
    with EhrReceiver() as ehr:
        port, admin_port = free_port(), free_port()
        routes = write_config(
            tmp_path,
            channels={
                "portal-push": {
                    "source": {
                        "kind": "http",
                        "host": "127.0.0.1",
                        "port": port,
                        "path": "/fhir",
                        "resources": ["Appointment"],
                        "auth": {"type": "bearer", "token": {"env": "PORTAL_PUSH_TOKEN"}},
                    },
                    "transform": [{"fhir-to-hl7": {"sending_facility": "PORTAL", "placer_system": PLACER}}],
                    "routes": [{"destination": "ehr-mllp"}],
                }
            },
            destinations={
                "ehr-mllp": {"kind": "mllp", "host": "127.0.0.1", "port": ehr.port, "payload": "output"}
            },
        )
        with (
            EngineProcess(
                routes, port, env={"PORTAL_PUSH_TOKEN": TOKEN, "SLUICE_ADMIN_PORT": str(admin_port)}
            ),
            httpx.Client(
                base_url=f"http://127.0.0.1:{port}/fhir", headers={"Authorization": f"Bearer {TOKEN}"}
            ) as client,
        ):
            yield client, ehr, admin_port


def post(client: httpx.Client, body: Any, **headers: str) -> httpx.Response:
    return client.post(
        "/Appointment", json=body, headers={"Content-Type": "application/fhir+json", **headers}
    )


def test_every_notification_twice_is_still_s12_s13_s15(setup: Any) -> None:
    client, ehr, admin = setup
    steps = [
        version(1),
        version(2, start="2026-12-11T17:00:00Z", end="2026-12-11T17:30:00Z"),
        version(3, start="2026-12-11T17:00:00Z", end="2026-12-11T17:30:00Z", status="cancelled"),
    ]
    answers = []
    for n, res in enumerate(steps, start=1):
        answers.append(post(client, notification(res, n)).status_code)
        answers.append(post(client, notification(res, n)).status_code)  # delivered twice
        answers.append(post(client, res).status_code)  # and once more as a plain resource
        wait_for(lambda n=n: len(ehr.received()) >= n, timeout=60, what=f"{n} messages at the EHR")
    time.sleep(1.0)
    assert answers == [201, 200, 200] * 3
    metrics = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=10).text
    assert 'sluice_messages_received_total{channel="portal-push"} 3.0' in metrics
    got = [(m["SCH-1.1"], m.trigger) for m in ehr.received()]
    assert got == [("PH-1", "S12"), ("PH-1", "S13"), ("PH-1", "S15")]


def test_idempotency_key_gets_the_first_answer(setup: Any) -> None:
    client, ehr, _ = setup
    first = post(
        client,
        version(1, id="appt-h2", identifier=[{"system": PLACER, "value": "PH-2"}]),
        **{"Idempotency-Key": "k-1"},
    )
    again = post(client, version(9, id="appt-h9"), **{"Idempotency-Key": "k-1"})  # a retry: same key
    assert first.status_code == again.status_code == 201 and first.content == again.content
    assert "stored 1" in first.json()["issue"][0]["diagnostics"]
    wait_for(lambda: len(ehr.received()) >= 1, timeout=60, what="the S12")
    time.sleep(1.0)
    assert [m["SCH-1.1"] for m in ehr.received()] == ["PH-2"]  # appt-h9 was never stored


@pytest.mark.parametrize(
    ("kwargs", "status", "says"),
    [
        pytest.param({"headers": {"Authorization": "Bearer wrong"}}, 401, "bearer token", id="auth"),
        pytest.param(
            {"content": b"MSH|^~\\&|", "headers": {"Content-Type": "text/plain"}},
            415,
            "application/fhir+json",
            id="type",
        ),
        pytest.param(
            {"content": b"{not json", "headers": {"Content-Type": "application/fhir+json"}},
            400,
            "not valid JSON",
            id="json",
        ),
        pytest.param(
            {"json": {"resourceType": "Patient", "id": "p"}}, 422, "takes Appointment", id="resource-type"
        ),
        pytest.param(
            {"json": {"resourceType": "Appointment", "status": "booked"}}, 422, "without an id", id="no-id"
        ),
    ],
)
def test_refusals_say_what_is_wrong(setup: Any, kwargs: dict[str, Any], status: int, says: str) -> None:
    client, _, _ = setup
    headers = {"Content-Type": "application/fhir+json", **kwargs.pop("headers", {})}
    resp = client.post("/Appointment", headers=headers, **kwargs)
    assert resp.status_code == status
    assert (
        resp.json()["resourceType"] == "OperationOutcome" and says in resp.json()["issue"][0]["diagnostics"]
    )


def test_a_live_reload_that_changes_an_http_channel_is_refused_and_it_keeps_working(tmp_path: Path) -> None:
    import signal

    import yaml

    port = free_port()
    routes = write_config(
        tmp_path,
        channels={
            "push": {
                "source": {"kind": "http", "host": "127.0.0.1", "port": port, "path": "/fhir"},
                "transform": [{"fhir-to-hl7": {"placer_system": PLACER}}],
                "routes": [{"destination": "out"}],
            }
        },
        destinations={"out": {"kind": "file", "directory": str(tmp_path / "out")}},
    )
    with EngineProcess(routes, port) as proc:
        # the port answers before the engine has finished starting (a reload then is refused as "starting"):
        # one message through to the destination first
        first = httpx.post(
            f"http://127.0.0.1:{port}/fhir/Appointment",
            json=version(1, id="appt-r0"),
            headers={"Content-Type": "application/fhir+json"},
        )
        assert first.status_code == 201
        out = tmp_path / "out"
        wait_for(lambda: out.is_dir() and any(out.iterdir()), timeout=30, what="the first delivery")
        chan = tmp_path / "channels" / "push.yaml"
        data = yaml.safe_load(chan.read_text())
        data["source"]["path"] = "/other"
        chan.write_text(yaml.safe_dump(data))
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: "config_reload_failed" in proc.log.read_text(), timeout=30, what="the refused reload"
        )
        assert "restart the engine" in proc.log.read_text()
        resp = httpx.post(
            f"http://127.0.0.1:{port}/fhir/Appointment",
            json=version(1, id="appt-r1"),
            headers={"Content-Type": "application/fhir+json"},
        )
        assert resp.status_code == 201


def test_hl7_v2_over_http_takes_the_intake_path_and_answers_the_ack(tmp_path: Path) -> None:
    port = free_port()
    routes = write_config(
        tmp_path,
        channels={
            "push-hl7": {
                "source": {"kind": "http", "host": "127.0.0.1", "port": port, "path": "/hl7"},
                "accept": {"types": ["ADT"]},
                "transform": ["passthrough"],
                "routes": [{"destination": "out"}],
            }
        },
        destinations={"out": {"kind": "file", "directory": str(tmp_path / "out")}},
    )
    adt = (
        b"MSH|^~\\&|SYN|SYNHOSP|SLUICE|SLUICE|20261204120000||ADT^A01^ADT_A01|HTTP-1|P|2.5.1\r"
        b"EVN|A01|20261204120000\rPID|1||MRN900001^^^SYNHOSP^MR||Testperson^Alexandra\rPV1|1|I\r"
    )
    hdrs = {"Content-Type": "x-application/hl7-v2+er7"}
    with EngineProcess(routes, port):
        url = f"http://127.0.0.1:{port}/hl7"
        first = httpx.post(url, content=adt, headers=hdrs)
        again = httpx.post(url, content=adt, headers=hdrs)  # a resend: answered from the store
        wrong = httpx.post(url, content=adt.replace(b"ADT^A01^ADT_A01", b"ORU^R01^ORU_R01"), headers=hdrs)
    assert first.status_code == again.status_code == 200
    assert first.headers["content-type"] == "x-application/hl7-v2+er7"
    assert b"MSA|AA|HTTP-1" in first.content and b"MSA|AA|HTTP-1" in again.content
    assert b"MSA|AR|HTTP-1" in wrong.content
    from engine.store import Store

    s = Store(f"sqlite:///{tmp_path}/sluice.db", create=False)
    try:
        counts = s.status_counts()
    finally:
        s.close()
    assert sum(n for (ch, status), n in counts.items() if status in ("received", "processed")) == 1


def test_mutual_tls(tmp_path: Path, pki: Path) -> None:
    port = free_port()
    routes = write_config(
        tmp_path,
        channels={
            "push-tls": {
                "source": {
                    "kind": "http",
                    "host": "127.0.0.1",
                    "port": port,
                    "tls": {
                        "cert": str(pki / "server.crt"),
                        "key": str(pki / "server.key"),
                        "ca": str(pki / "ca.crt"),
                        "require_client_cert": True,
                    },
                },
                "transform": [{"fhir-to-hl7": {"placer_system": PLACER}}],
                "routes": [{"destination": "out"}],
            }
        },
        destinations={"out": {"kind": "file", "directory": str(tmp_path / "out")}},
    )
    url = f"https://127.0.0.1:{port}/fhir/Appointment"
    hdrs = {"Content-Type": "application/fhir+json"}
    anonymous = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    client = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    client.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    with EngineProcess(routes, port):
        with pytest.raises(httpx.TransportError):  # no client certificate: the handshake fails
            httpx.post(url, json=version(1, id="appt-t1"), headers=hdrs, verify=anonymous)
        resp = httpx.post(url, json=version(1, id="appt-t1"), headers=hdrs, verify=client)
    assert resp.status_code == 201
