"""Issue 4 end to end: MLLP in → store → HL7→FHIR → a real FHIR server (Medplum), each message sent twice.

After each series the server must hold exactly one Patient, one Encounter with the final status, one
Observation per result with the corrected value and one Appointment with the final status and time.

Every series runs twice: on the test server that validates writes, and on Medplum's FhirRouter with the
plain MemoryRepository (``stock``), so the conditional writes that keep each resource single are resolved
by Medplum's own search either way, with no code of ours in between.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from engine import store as st
from engine.client import MLLPClient, parse_ack
from tests.support.engine import EngineProcess, fhir_channel, free_port, write_config
from tests.support.fhirserver import FhirServer

pytestmark = pytest.mark.fhirserver

MSH = "MSH|^~\\&|ALLSCRIPTS|NORTHCLINIC|SLUICE|HOSP|{ts}||{type}|{cid}|P|2.5.1\r"
PID = "PID|1||E2E100^^^NORTHCLINIC^MR||Fixture^Robin^J||19700305|F|||{addr}^^Salem^OR^97301^USA\r"


def adt(
    trigger: str, cid: str, *, cls: str, addr: str = "1 Test Road", admit: str = "", discharge: str = ""
) -> str:
    pv1 = (
        f"PV1|1|{cls}|4N^401^A^NORTHCLINIC||||1234567893^Carer^Casey^^^Dr^^^NPI||||||||||||"
        f"V900^^^NORTHCLINIC^VN|||||||||||||||||||||||||{admit}|{discharge}\r"
    )
    return (
        MSH.format(ts="20250314083000", type=f"ADT^{trigger}^ADT_A01", cid=cid)
        + f"EVN|{trigger}|20250314083000\r"
        + PID.format(addr=addr)
        + pv1
    )


def oru(cid: str, status: str, value: str) -> str:
    return (
        MSH.format(ts="20250314101500", type="ORU^R01^ORU_R01", cid=cid)
        + PID.format(addr="1 Test Road")
        + f"OBR|1|ORD900^NORTHCLINIC|FIL900^NORTHLAB|24331-1^Lipid panel^LN|||20250314090000|||||||||||||||20250314101000|||{status}\r"
        + f"OBX|1|NM|2093-3^Cholesterol total^LN||{value}|mg/dL^mg/dL^UCUM|<200||||{status}|||20250314100000\r"
        + f"OBX|2|NM|2571-8^Triglyceride^LN||140|mg/dL^mg/dL^UCUM|<150||||{status}|||20250314100000\r"
    )


def siu(trigger: str, cid: str, start: str, end: str, status: str) -> str:
    return (
        MSH.format(ts="20250314120000", type=f"SIU^{trigger}^SIU_S12", cid=cid)
        + f"SCH|APT900^NORTHCLINIC|APT900^NORTHCLINIC|||||ROUTINE^Routine visit|FOLLOWUP|30|MIN|^^30^{start}^{end}|||||||||||||||{status}\r"
        + PID.format(addr="1 Test Road")
        + "RGS|1|A\r"
        + f"AIS|1|A|99213^Office visit^CPT|{start}|||30|MIN\r"
        + "AIP|1|A|1234567893^Carer^Casey^^^Dr^^^NPI|ATTENDING\r"
        + "AIL|1|A|EXAM2^^^NORTHCLINIC|\r"
    )


def engine_for(tmp_path: Path, fhir: FhirServer) -> tuple[EngineProcess, Path]:
    port = free_port()
    channel = fhir_channel(port, "fhir", types=("ADT", "ORU", "SIU"))
    dest = {"kind": "fhir", "base_url": fhir.base_url, "retry": {"max_attempts": 5, "backoff": 0.2}}
    cfg = write_config(tmp_path, channels={"clinic": channel}, destinations={"fhir": dest})
    return EngineProcess(cfg, port), tmp_path / "sluice.db"


def send_all(port: int, messages: list[str]) -> None:
    import asyncio

    async def go() -> None:
        client = MLLPClient("127.0.0.1", port)
        try:
            for m in messages:
                info = parse_ack(await client.send(m.encode()))
                assert info.code == "AA", info
        finally:
            await client.close()

    asyncio.run(go())


def wait_delivered(db: Path, n: int, timeout: float = 60, review: int = 0) -> None:
    """Wait until ``n`` deliveries are done and ``review`` messages are held for review."""
    s = st.Store(f"sqlite:///{db}")
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = s.delivery_counts()
            if counts.get(("fhir", st.DEAD)):
                raise AssertionError(f"dead letters: {[dict(r._mapping) for r in s.dead_letters()]}")
            errors = s.list_messages(status=st.ERROR)
            if errors:
                raise AssertionError(f"processing errors: {[r.reason for r in errors]}")
            held = len(s.list_messages(status=st.REVIEW))
            if (
                counts.get(("fhir", st.DELIVERED), 0) >= n
                and not counts.get(("fhir", st.PENDING))
                and held >= review
            ):
                assert held == review, f"{held} held for review, expected {review}"
                return
            time.sleep(0.1)
        raise AssertionError(f"not delivered in time: {s.delivery_counts()}")
    finally:
        s.close()


@pytest.fixture(params=["validating", "stock"])
def fhir(request: pytest.FixtureRequest) -> FhirServer:
    """Each series on both servers, emptied for the test."""
    srv: FhirServer = request.getfixturevalue(
        "fhir_server" if request.param == "validating" else "stock_fhir_server"
    )
    srv.reset()
    return srv


def only(fhir: FhirServer, query: str) -> dict[str, Any]:
    found = fhir.search(query)
    assert len(found) == 1, f"{query}: {len(found)} resources"
    return found[0]


def test_adt_series_twice(tmp_path: Path, fhir: FhirServer) -> None:
    eng, db = engine_for(tmp_path, fhir)
    series = [
        adt("A04", "A1", cls="O"),
        adt("A08", "A2", cls="O", addr="2 Changed Street"),
        adt("A01", "A3", cls="I", addr="2 Changed Street", admit="20250314090000"),
        adt(
            "A03", "A4", cls="I", addr="2 Changed Street", admit="20250314090000", discharge="20250316110000"
        ),
    ]
    with eng:
        send_all(eng.port, series + series)  # same bytes again: deduped by the engine
        again = [
            m.replace(f"|{c}|P|", f"|{c}-again|P|")
            for m, c in zip(series, ["A1", "A2", "A3", "A4"], strict=True)
        ]
        send_all(eng.port, again)  # the same events as new messages: idempotent on the server
        wait_delivered(db, 8)
    patient = only(fhir, "Patient")
    assert patient["address"][0]["line"] == ["2 Changed Street"]
    encounter = only(fhir, "Encounter")
    assert encounter["status"] == "finished"
    assert encounter["period"]["end"].startswith("2025-03-16T11:00:00")


def test_oru_final_then_corrected_twice(tmp_path: Path, fhir: FhirServer) -> None:
    eng, db = engine_for(tmp_path, fhir)
    with eng:
        send_all(eng.port, [oru("O1", "F", "182"), oru("O2", "C", "190"), oru("O1", "F", "182")])
        send_all(eng.port, [oru("O3", "C", "190")])
        wait_delivered(db, 3)
    observations = fhir.search("Observation")
    assert len(observations) == 2
    chol = [o for o in observations if o["code"]["coding"][0]["code"] == "2093-3"]
    assert len(chol) == 1 and chol[0]["status"] == "corrected" and chol[0]["valueQuantity"]["value"] == 190
    report = only(fhir, "DiagnosticReport")
    assert len(report["result"]) == 2
    only(fhir, "Patient")


def test_siu_book_reschedule_cancel_twice(tmp_path: Path, fhir: FhirServer) -> None:
    eng, db = engine_for(tmp_path, fhir)
    series = [
        siu("S12", "S1", "20250320093000", "20250320100000", "Booked"),
        siu("S13", "S2", "20250320103000", "20250320110000", "Booked"),
        siu("S15", "S3", "20250320103000", "20250320110000", "Cancelled"),
    ]
    with eng:
        send_all(eng.port, series + series)
        again = [
            m.replace(f"|{c}|P|", f"|{c}-again|P|") for m, c in zip(series, ["S1", "S2", "S3"], strict=True)
        ]
        send_all(eng.port, again)
        # The booking and the reschedule sent again after the cancellation rank below it: they are
        # held for review instead of reopening the appointment; the repeated cancel is applied.
        wait_delivered(db, 4, review=2)
    appt = only(fhir, "Appointment")
    assert appt["status"] == "cancelled"
    assert appt["start"].startswith("2025-03-20T10:30:00")
    only(fhir, "Patient")
