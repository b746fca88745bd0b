"""Write-back state in a real store (SQLite and PostgreSQL): a FHIR Appointment's versions become exactly
one S12, S13, S15 for one SCH-1; an unchanged update sends nothing; a cancel of an appointment never
sent sends nothing and is counted; a replay repeats its decision; nothing identifying is stored."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import select

from engine import config as config_mod
from engine.hl7 import parse_bytes
from engine.processing import ChannelRuntime
from engine.sources import resources
from engine.store import FILTERED, PROCESSED, WRITEBACK, WRITEBACK_LOG, Store
from tests.support.engine import write_config

PLACER = "urn:portal:appointment"
BASE: dict[str, Any] = {
    "resourceType": "Appointment",
    "id": "appt-1",
    "meta": {"versionId": "1", "lastUpdated": "2026-12-01T10:00:00Z"},
    "identifier": [{"system": PLACER, "value": "PA-SECRET-77"}],
    "status": "booked",
    "start": "2026-12-10T17:00:00Z",
    "end": "2026-12-10T17:30:00Z",
    "participant": [
        {"actor": {"reference": "Patient/pat-1", "display": "Testperson, Alexandra"}, "status": "accepted"}
    ],
}


def version(n: int, **changes: Any) -> dict[str, Any]:
    res = copy.deepcopy(BASE)
    res["meta"]["versionId"] = str(n)
    res.update(changes)
    return res


def runtime(tmp_path: Path, store_url: str) -> tuple[ChannelRuntime, Store]:
    routes = write_config(
        tmp_path,
        channels={
            "portal": {
                "source": {"port": 0},
                "transform": [
                    {
                        "fhir-to-hl7": {
                            "sending_application": "SLUICE",
                            "sending_facility": "PORTAL",
                            "placer_system": PLACER,
                        }
                    }
                ],
                "routes": [{"destination": "ehr"}],
            }
        },
        destinations={"ehr": {"kind": "file", "path": str(tmp_path / "out")}},
        store=store_url,
    )
    cfg = config_mod.load(routes)
    store = Store(store_url)
    return ChannelRuntime(cfg, cfg.channels[0], store), store


def take(
    rt: ChannelRuntime, store: Store, res: dict[str, Any], message_id: int | None = None
) -> tuple[int, Any]:
    """Store one resource version as a message (or re-run a stored one) and record its processing."""
    raw = orjson.dumps(res)
    with store.write() as conn:
        if message_id is None:
            row = resources.message_row(
                "portal", res, raw, source="fhir-poll", facility="127.0.0.1:1", received_at=time.time()
            )
            (message_id,) = store.insert_messages(conn, [row])
        result = rt.record(conn, rt.run_raw(message_id, raw))
        store.finish_messages(conn, [(message_id, result.status, result.reason)])
    return message_id, result


def sent(result: Any) -> tuple[str, str] | None:
    if result.status != PROCESSED:
        return None
    (d,) = result.deliveries
    msg = parse_bytes(d.payload)
    return msg.trigger, msg["SCH-1.1"]


def test_create_reschedule_touch_cancel(tmp_path: Path, store_url: str) -> None:
    rt, store = runtime(tmp_path, store_url)
    try:
        _, r1 = take(rt, store, version(1))
        _, r2 = take(rt, store, version(2, start="2026-12-11T17:00:00Z", end="2026-12-11T17:30:00Z"))
        # a new version that changes nothing the SIU carries: nothing is sent
        _, r3 = take(
            rt, store, version(3, start="2026-12-11T17:00:00Z", end="2026-12-11T17:30:00Z", priority=3)
        )
        _, r4 = take(
            rt,
            store,
            version(4, start="2026-12-11T17:00:00Z", end="2026-12-11T17:30:00Z", comment="wheelchair"),
        )
        m5, r5 = take(
            rt,
            store,
            version(5, start="2026-12-11T17:00:00Z", end="2026-12-11T17:30:00Z", status="cancelled"),
        )
        assert [sent(r) for r in (r1, r2, r3, r4, r5)] == [
            ("S12", "PA-SECRET-77"),
            ("S13", "PA-SECRET-77"),
            None,
            ("S14", "PA-SECRET-77"),
            ("S15", "PA-SECRET-77"),
        ]
        assert r3.status == FILTERED and r3.writeback_skipped == "unchanged" and "nothing sent" in r3.reason
        assert r1.deliveries[0].meta["hl7_message"] == "S12"
        # a replay of the cancel sends the same S15 again (it is not decided anew against its own state)
        _, again = take(
            rt,
            store,
            version(5, start="2026-12-11T17:00:00Z", end="2026-12-11T17:30:00Z", status="cancelled"),
            m5,
        )
        assert sent(again) == ("S15", "PA-SECRET-77")
        # a later cancel of the cancelled appointment: nothing
        _, r6 = take(rt, store, version(6, status="cancelled", comment="again"))
        assert sent(r6) is None and r6.writeback_skipped == "already_closed"
        # nothing identifying in the state tables: keyed hashes only
        with store.engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(select(WRITEBACK)).all()]
            rows += [tuple(r) for r in conn.execute(select(WRITEBACK_LOG)).all()]
        assert len(rows) == 1 + 6  # one key; one decision per stored message (the replay reused its own)
        assert not any("PA-SECRET-77" in str(v) or "appt-1" in str(v) for row in rows for v in row)
    finally:
        store.close()


def test_cancel_of_an_appointment_never_sent_sends_nothing(tmp_path: Path, store_url: str) -> None:
    rt, store = runtime(tmp_path, store_url)
    try:
        _, r = take(rt, store, version(1, status="cancelled"))
        assert r.status == FILTERED and r.writeback_skipped == "cancel_never_sent"
        assert "never" in r.reason
        # booked later after all: an S12
        _, r2 = take(rt, store, version(2))
        assert sent(r2) == ("S12", "PA-SECRET-77")
    finally:
        store.close()


def test_two_appointments_have_their_own_state(tmp_path: Path, store_url: str) -> None:
    rt, store = runtime(tmp_path, store_url)
    try:
        other = {"identifier": [{"system": PLACER, "value": "PA-2"}], "id": "appt-2"}
        _, a = take(rt, store, version(1))
        _, b = take(rt, store, version(1, **other))
        _, b2 = take(rt, store, version(2, start="2026-12-12T17:00:00Z", **other))
        assert [sent(r) for r in (a, b, b2)] == [("S12", "PA-SECRET-77"), ("S12", "PA-2"), ("S13", "PA-2")]
    finally:
        store.close()


def test_retention_drops_the_decisions_with_their_messages_and_keeps_the_state(
    tmp_path: Path, store_url: str
) -> None:
    from engine.store import IDEMPOTENCY

    rt, store = runtime(tmp_path, store_url)
    try:
        take(rt, store, version(1))
        take(rt, store, version(2, start="2026-12-11T17:00:00Z"))
        with store.write() as conn:
            conn.execute(
                IDEMPOTENCY.insert().values(channel="portal", key="k" * 64, status=201, body="{}", at=1.0)
            )
        store.prune("portal", bodies_before=None, rows_before=time.time() + 1)
        with store.engine.connect() as conn:
            assert conn.execute(select(WRITEBACK_LOG)).all() == []
            assert conn.execute(select(IDEMPOTENCY)).all() == []
            (state,) = conn.execute(select(WRITEBACK)).all()
        assert state.message == "S13"
        # the state outlives the rows: the next version is still an update, not a second S12
        _, r = take(rt, store, version(3, start="2026-12-12T17:00:00Z"))
        assert sent(r) == ("S13", "PA-SECRET-77")
    finally:
        store.close()


def deleted(res: dict[str, Any], version_id: str) -> dict[str, Any]:
    """The tombstone a fhir-poll source stores for a deletion read from the server's _history."""
    from datetime import UTC, datetime

    from engine.sources import history

    d = history.Deletion(res["resourceType"], res["id"], version_id, datetime(2026, 12, 2, tzinfo=UTC))
    return history.tombstone(d, res, "2026-12-02T00:00:00.000Z")


def test_a_deleted_appointment_that_was_sent_is_an_s17_for_the_same_sch1(
    tmp_path: Path, store_url: str
) -> None:
    rt, store = runtime(tmp_path, store_url)
    try:
        _, r1 = take(rt, store, version(1))
        m2, r2 = take(rt, store, deleted(version(1), "2"))
        assert [sent(r) for r in (r1, r2)] == [("S12", "PA-SECRET-77"), ("S17", "PA-SECRET-77")]
        msg = parse_bytes(r2.deliveries[0].payload)
        assert msg["MSH-9"] == "SIU^S17^SIU_S12" and msg["SCH-25"] == "DELETED" and msg["RGS-2"] == "D"
        # a replay sends the same S17; the same deletion read again is not decided again either
        _, again = take(rt, store, deleted(version(1), "2"), m2)
        assert sent(again) == ("S17", "PA-SECRET-77")
        # deleted after a cancel: the receiver has it cancelled already, nothing
        other = {"identifier": [{"system": PLACER, "value": "PA-3"}], "id": "appt-3"}
        take(rt, store, version(1, **other))
        take(rt, store, version(2, status="cancelled", **other))
        _, r = take(rt, store, deleted(version(2, **other), "3"))
        assert sent(r) is None and r.writeback_skipped == "already_closed"
    finally:
        store.close()


def test_a_deleted_appointment_never_sent_sends_nothing_and_is_counted(
    tmp_path: Path, store_url: str
) -> None:
    rt, store = runtime(tmp_path, store_url)
    try:
        _, r = take(rt, store, deleted(version(1), "2"))
        assert r.status == FILTERED and r.writeback_skipped == "cancel_never_sent"
        assert "deleted before anything was sent" in r.reason
    finally:
        store.close()


def test_a_deleted_patient_is_an_a29_and_a_deleted_order_an_orc_ca(tmp_path: Path, store_url: str) -> None:
    rt, store = runtime(tmp_path, store_url)
    patient = {
        "resourceType": "Patient",
        "id": "pat-9",
        "meta": {"versionId": "1"},
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.9999", "value": "MRN-SYN-9"}],
        "name": [{"family": "Testperson", "given": ["Robin"]}],
    }
    order = {
        "resourceType": "ServiceRequest",
        "id": "sr-9",
        "meta": {"versionId": "1"},
        "identifier": [{"system": PLACER, "value": "ORD-9"}],
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/pat-9"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}]},
    }
    try:
        triggers = []
        for res in (patient, deleted(patient, "2"), order, deleted(order, "2")):
            _, r = take(rt, store, res)
            msg = parse_bytes(r.deliveries[0].payload)
            triggers.append((msg["MSH-9"], msg["ORC-1"] if msg.message_type == "ORM" else msg["PID-3.1"]))
        assert triggers == [
            ("ADT^A28^ADT_A05", "MRN-SYN-9"),
            ("ADT^A29^ADT_A21", "MRN-SYN-9"),
            ("ORM^O01^ORM_O01", "NW"),
            ("ORM^O01^ORM_O01", "CA"),
        ]
        # a Patient deleted before anything was sent for it: nothing (counted)
        _, r = take(rt, store, deleted({**patient, "id": "pat-10"}, "2"))
        assert r.status == FILTERED and r.writeback_skipped == "cancel_never_sent"
    finally:
        store.close()
