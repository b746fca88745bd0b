"""Write-back end to end with real peers: the Medplum FHIR server is polled (``kind: fhir-poll``), the engine
runs as a real process, and a test EHR (an MLLP receiver) takes the SIU.  Create → reschedule → cancel an
Appointment: the EHR gets exactly S12, S13, S15 for one SCH-1; the same with the engine SIGKILLed
mid-page and restarted (no message twice); and with the EHR answering AE once: one dead letter, which a
replay clears.  The push variant, every notification delivered twice, is tests/e2e/test_http_source_e2e.py."""

from __future__ import annotations

import copy
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.store import Store
from tests.support.ehr import AE_TEXT, EhrReceiver
from tests.support.engine import EngineProcess, free_port, write_config
from tests.support.faultproxy import ThreadedFaultProxy
from tests.support.fhirserver import FhirServer
from tests.support.polling import wait_for

pytestmark = pytest.mark.fhirserver

PLACER = "urn:portal:appointment"

APPOINTMENT: dict[str, Any] = {
    "resourceType": "Appointment",
    "identifier": [{"system": PLACER, "value": "PA-1"}],
    "status": "booked",
    "start": "2026-12-10T17:00:00Z",
    "end": "2026-12-10T17:30:00Z",
    "participant": [
        {"actor": {"reference": "Patient/pat-1", "display": "Testperson, Alexandra"}, "status": "accepted"}
    ],
}


def appointment(placer: str, **changes: Any) -> dict[str, Any]:
    res = copy.deepcopy(APPOINTMENT)
    res["identifier"][0]["value"] = placer
    res.update(changes)
    return res


@pytest.fixture
def fhir(fhir_server: FhirServer) -> FhirServer:
    fhir_server.reset()
    return fhir_server


@pytest.fixture
def ehr() -> Any:
    with EhrReceiver() as receiver:
        yield receiver


def engine(
    tmp_path: Path,
    fhir: FhirServer,
    ehr: EhrReceiver,
    *,
    page_size: int = 100,
    base_url: str | None = None,
    store: str | None = None,
    workers: int | None = None,
) -> EngineProcess:
    admin = free_port()
    routes = write_config(
        tmp_path,
        channels={
            "portal-appointments": {
                "source": {
                    "kind": "fhir-poll",
                    "base_url": base_url or fhir.base_url,
                    "resources": ["Appointment"],
                    "interval": 0.3,
                    "page_size": page_size,
                },
                "transform": [
                    {
                        "fhir-to-hl7": {
                            "sending_application": "SLUICE",
                            "sending_facility": "PORTAL",
                            "placer_system": PLACER,
                        }
                    }
                ],
                "routes": [{"destination": "ehr-mllp"}],
            }
        },
        destinations={
            "ehr-mllp": {
                "kind": "mllp",
                "host": "127.0.0.1",
                "port": ehr.port,
                "payload": "output",
                "retry": {"max_attempts": 3, "backoff": 0.2},
            }
        },
        store=store,
        processing={"workers": workers} if workers is not None else None,
    )
    return EngineProcess(routes, admin, env={"SLUICE_ADMIN_PORT": str(admin)})


def sent(ehr: EhrReceiver) -> list[tuple[str, str, str]]:
    """(SCH-1 value, trigger, MSH-10) of every message the EHR accepted, in order."""
    return [(m["SCH-1.1"], m.trigger, m.control_id) for m in ehr.received()]


def settle(ehr: EhrReceiver, n: int) -> list[tuple[str, str, str]]:
    """Wait for ``n`` accepted messages, then a few more poll rounds for anything extra."""
    wait_for(
        lambda: len(ehr.received()) >= n, timeout=60, what=lambda: f"{n} messages at the EHR, got {sent(ehr)}"
    )
    time.sleep(1.5)
    return sent(ehr)


@pytest.mark.parametrize(
    "variant",
    [
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("in-process", id="sqlite-pipeline-in-the-engine-process"),
    ],
)
def test_create_reschedule_cancel_is_s12_s13_s15(
    tmp_path: Path, fhir: FhirServer, ehr: EhrReceiver, variant: str, request: pytest.FixtureRequest
) -> None:
    store = str(request.getfixturevalue("pg_url")) if variant == "postgres" else None
    workers = 0 if variant == "in-process" else None  # default: one worker process runs the pipelines
    with engine(tmp_path, fhir, ehr, store=store, workers=workers):
        created = fhir.request("POST", "/Appointment", appointment("PA-1"))
        wait_for(lambda: len(ehr.received()) >= 1, timeout=60, what=lambda: f"the S12, got {sent(ehr)}")
        moved = {**created, "start": "2026-12-11T17:00:00Z", "end": "2026-12-11T17:30:00Z"}
        moved = fhir.request("PUT", f"/Appointment/{created['id']}", moved)
        wait_for(lambda: len(ehr.received()) >= 2, timeout=60, what=lambda: f"the S13, got {sent(ehr)}")
        # an update that changes nothing the SIU carries: nothing is sent
        fhir.request("PUT", f"/Appointment/{created['id']}", {**moved, "priority": 4})
        time.sleep(1.5)
        fhir.request("PUT", f"/Appointment/{created['id']}", {**moved, "priority": 4, "status": "cancelled"})
        got = settle(ehr, 3)
    assert [(p, t) for p, t, _ in got] == [("PA-1", "S12"), ("PA-1", "S13"), ("PA-1", "S15")]
    assert ehr.received()[0]["SCH-1"] == f"PA-1^SLUICE^{PLACER}^URI"
    assert ehr.received()[1]["TQ1-7"] == "20261211090000-0800"


def test_cancel_of_an_appointment_never_sent_sends_nothing(
    tmp_path: Path, fhir: FhirServer, ehr: EhrReceiver
) -> None:
    fhir.request("POST", "/Appointment", appointment("PA-X", status="cancelled"))
    with engine(tmp_path, fhir, ehr) as proc:
        fhir.request("POST", "/Appointment", appointment("PA-2"))
        got = settle(ehr, 1)
        # recorded (the message is kept as filtered, with the reason) and counted
        metrics = httpx.get(f"http://127.0.0.1:{proc.port}/metrics", timeout=10).text
    assert [(p, t) for p, t, _ in got] == [("PA-2", "S12")]
    line = 'sluice_writeback_skipped_total{channel="portal-appointments",reason="cancel_never_sent"} 1.0'
    assert line in metrics
    assert 'sluice_messages_received_total{channel="portal-appointments"} 2.0' in metrics
    s = Store(f"sqlite:///{tmp_path}/sluice.db", create=False)
    try:
        assert s.status_counts() == {
            ("portal-appointments", "filtered"): 1,
            ("portal-appointments", "processed"): 1,
        }
    finally:
        s.close()


def test_sigkill_mid_page_and_restart_never_emits_twice(
    tmp_path: Path, fhir: FhirServer, ehr: EhrReceiver
) -> None:
    """The issue's scenario with the poller SIGKILLed mid-page: create (12 appointments, pages of 2),
    reschedule and cancel after the restart; the EHR gets exactly one S12 each, one S13 for the three
    moved and one S15 for the cancelled one, and no message twice.

    The kill lands mid-*page*, deterministically: the third page request is left hanging, and the
    engine is killed only after the messages of the two committed pages are delivered and recorded as
    delivered, so nothing is in flight towards the EHR; a repeat could only come from the poller.  (A
    kill during a delivery may repeat that one message with the same MSH-10: docs/writeback.md.)"""
    ids = [fhir.request("POST", "/Appointment", appointment(f"PA-{i:02d}"))["id"] for i in range(12)]
    with ThreadedFaultProxy(fhir.base_url) as proxy:
        # the CapabilityStatement, the history's start and two pages (of 2) pass, the third page request is
        # left hanging: the engine is SIGKILLed mid-page
        proxy.forward(times=4)
        proxy.stall(times=1)
        proc = engine(tmp_path, fhir, ehr, page_size=2, base_url=proxy.url).start()
        try:
            wait_for(
                lambda: len(proxy.log) >= 5,
                timeout=60,
                what=lambda: f"the third page request, log {proxy.log}",
            )
            db = Store(f"sqlite:///{tmp_path}/sluice.db", create=False)
            try:
                # the two committed pages: 2, then 1 new (a keyset page starts at the newest time it has
                # seen (ge), so it repeats the first page's last appointment, which is not stored twice)
                wait_for(
                    lambda: db.delivery_counts().get(("ehr-mllp", "delivered"), 0) >= 3,
                    timeout=60,
                    what=lambda: f"the two pages delivered, {db.delivery_counts()} {db.status_counts()}",
                )
                stored = db.status_counts()
                delivered = db.delivery_counts()
            finally:
                db.close()
            paths = [path.split("?")[0] for _, path, _ in proxy.log]
            assert paths == ["/metadata", "/Appointment/_history", *["/Appointment"] * 3], proxy.log
            assert [action for _, _, action in proxy.log][-1] == "stall"
            proc.kill()
            assert stored == {("portal-appointments", "processed"): 3}
            assert delivered == {("ehr-mllp", "delivered"): 3}
            before = sent(ehr)
            proc.start()  # the queued faults are used up: the proxy passes everything through now
            for i in ids[:3]:  # reschedule three while the engine catches up
                cur = fhir.request("GET", f"/Appointment/{i}")
                fhir.request(
                    "PUT",
                    f"/Appointment/{i}",
                    {**cur, "start": "2026-12-12T17:00:00Z", "end": "2026-12-12T17:30:00Z"},
                )
            wait_for(
                lambda: ("PA-00", "S13") in [(p, t) for p, t, _ in sent(ehr)],
                timeout=60,
                what=lambda: f"the S13 of PA-00, got {sent(ehr)}",
            )
            cur = fhir.request("GET", f"/Appointment/{ids[0]}")
            fhir.request("PUT", f"/Appointment/{ids[0]}", {**cur, "status": "cancelled"})
            got = settle(ehr, 16)
        finally:
            proc.stop()
    assert sorted((p, t) for p, t, _ in before) == [("PA-00", "S12"), ("PA-01", "S12"), ("PA-02", "S12")]
    assert len(got) == len(set(got)) == 16  # nothing delivered twice, not even with the same MSH-10
    per = Counter((p, t) for p, t, _ in got)
    want = {**{(f"PA-{i:02d}", "S12"): 1 for i in range(12)}, **{(f"PA-{i:02d}", "S13"): 1 for i in range(3)}}
    assert per == Counter({**want, ("PA-00", "S15"): 1})
    assert [t for p, t, _ in got if p == "PA-00"] == ["S12", "S13", "S15"]  # one SCH-1, in order


def test_a_deleted_appointment_is_one_s17_for_its_sch1_across_restarts(
    tmp_path: Path, fhir: FhirServer, ehr: EhrReceiver
) -> None:
    """DELETE on the server: the EHR gets an S17 (deletion) for the same SCH-1, exactly once, also when the
    deletion happens while the engine is down and across restarts; an appointment deleted before anything
    was sent for it sends nothing."""
    proc = engine(tmp_path, fhir, ehr)
    with proc:
        a = fhir.request("POST", "/Appointment", appointment("PA-D1"))
        b = fhir.request("POST", "/Appointment", appointment("PA-D2"))
        settle(ehr, 2)
        fhir.request("DELETE", f"/Appointment/{a['id']}")
        wait_for(lambda: len(ehr.received()) >= 3, timeout=60, what=lambda: f"the S17, got {sent(ehr)}")
    fhir.request("DELETE", f"/Appointment/{b['id']}")  # while the engine is down
    with proc:
        settle(ehr, 4)
        # created and deleted before it could be sent: nothing for it (the EHR never had it)
        c = fhir.request("POST", "/Appointment", appointment("PA-D3", status="cancelled"))
        fhir.request("DELETE", f"/Appointment/{c['id']}")
        time.sleep(1.5)
    with proc:  # one more restart: nothing is taken or sent again
        got = settle(ehr, 4)
        metrics = httpx.get(f"http://127.0.0.1:{proc.port}/metrics", timeout=10).text
    assert sorted((p, t) for p, t, _ in got) == [
        ("PA-D1", "S12"),
        ("PA-D1", "S17"),
        ("PA-D2", "S12"),
        ("PA-D2", "S17"),
    ]
    assert len(set(got)) == 4
    s17 = [m for m in ehr.received() if m.trigger == "S17"]
    assert {m["SCH-1"] for m in s17} == {f"PA-D1^SLUICE^{PLACER}^URI", f"PA-D2^SLUICE^{PLACER}^URI"}
    assert {m["SCH-25"] for m in s17} == {"DELETED"}
    assert (
        'sluice_fhir_poll_deletions_followed{channel="portal-appointments",resource="Appointment"} 1.0'
        in (metrics)
    )
    db = Store(f"sqlite:///{tmp_path}/sluice.db", create=False)
    try:
        rows = db.list_messages(channel="portal-appointments", limit=50)
        deletions = [r for r in rows if r.trigger == "DELETE"]
        assert len(deletions) == 3  # PA-D1, PA-D2, and PA-D3 (filtered: deleted before it was sent)
    finally:
        db.close()


def test_a_server_without_type_history_follows_no_deletions_and_says_so(
    tmp_path: Path, stock_fhir_server: FhirServer, ehr: EhrReceiver
) -> None:
    """The stock Medplum router has no type-level history (and no CapabilityStatement): the search goes on,
    one warning says deletions are not followed, and the gauge shows it."""
    stock_fhir_server.reset()
    proc = engine(tmp_path, stock_fhir_server, ehr)
    with proc:
        a = stock_fhir_server.request("POST", "/Appointment", appointment("PA-S1"))
        settle(ehr, 1)
        stock_fhir_server.request("DELETE", f"/Appointment/{a['id']}")
        stock_fhir_server.request("POST", "/Appointment", appointment("PA-S2"))
        got = settle(ehr, 2)
        metrics = httpx.get(f"http://127.0.0.1:{proc.port}/metrics", timeout=10).text
    assert [(p, t) for p, t, _ in got] == [("PA-S1", "S12"), ("PA-S2", "S12")]
    assert (
        'sluice_fhir_poll_deletions_followed{channel="portal-appointments",resource="Appointment"} 0.0'
        in (metrics)
    )
    warned = [
        line for line in proc.log.read_text().splitlines() if "fhir_poll_deletions_not_followed" in line
    ]
    assert len(warned) == 1 and "no CapabilityStatement at /metadata" in warned[0]


def test_ehr_answers_ae_once_then_a_replay_clears_the_dead_letter(
    tmp_path: Path, fhir: FhirServer, ehr: EhrReceiver
) -> None:
    refused: list[str] = []

    def reject(msg: Any) -> bool:
        if msg.trigger == "S13" and not refused:
            refused.append(msg.control_id)
            return True
        return False

    ehr.reject = reject
    proc = engine(tmp_path, fhir, ehr)
    with proc:
        created = fhir.request("POST", "/Appointment", appointment("PA-3"))
        wait_for(lambda: len(ehr.received()) >= 1, timeout=60, what="the S12")
        moved = fhir.request(
            "PUT",
            f"/Appointment/{created['id']}",
            {**created, "start": "2026-12-11T17:00:00Z", "end": "2026-12-11T17:30:00Z"},
        )
        store = Store(f"sqlite:///{tmp_path}/sluice.db", create=False)
        try:
            dead = wait_for(lambda: store.dead_letters(), timeout=60, what="the dead letter")
            (row,) = dead
            assert row.destination == "ehr-mllp" and AE_TEXT in row.reason  # the ACK's ERR text
            store.replay([(row.message_id, ["ehr-mllp"])], who="test", why="EHR slot fixed", criteria={})
            wait_for(
                lambda: len(ehr.received()) >= 2,
                timeout=60,
                what=lambda: f"the replayed S13, got {sent(ehr)}",
            )
            assert not store.dead_letters()
        finally:
            store.close()
        fhir.request("PUT", f"/Appointment/{created['id']}", {**moved, "status": "cancelled"})
        got = settle(ehr, 3)
    assert [(p, t) for p, t, _ in got] == [("PA-3", "S12"), ("PA-3", "S13"), ("PA-3", "S15")]
    assert [m.control_id for m in ehr.rejected] == refused and got[1][2] == refused[0]
