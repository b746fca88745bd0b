"""Intake: header checks → ACK codes (pure), and the group commit against a real store."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from engine import store as st
from engine.config import DEFAULT_TYPES, ChannelConfig, DedupeConfig, SourceConfig
from engine.intake import Committer, Intake

CH = ChannelConfig(
    name="t",
    file="channels/t.yaml",
    source=SourceConfig(),
    types={"ADT": ("A01", "A08", "A40"), "ORU": ("R01",)},
    require=("PID-3",),
)


def adt(
    control: str = "C1",
    *,
    version: str = "2.5.1",
    mtype: str = "ADT^A01",
    pid: str = "P1^^^NORTH^MR",
    pid_id: str = "P",
) -> bytes:
    return (
        f"MSH|^~\\&|EHR|NORTH|SL|HOSP|20250101120000||{mtype}|{control}|{pid_id}|{version}\r"
        f"PID|1||{pid}||Testpatient^Alex\r"
    ).encode()


def msa(ack: bytes) -> list[str]:
    for seg in ack.decode().split("\r"):
        if seg.startswith("MSA"):
            return seg.split("|")
    raise AssertionError("no MSA")


def err3(ack: bytes) -> str:
    for seg in ack.decode().split("\r"):
        if seg.startswith("ERR"):
            return seg.split("|")[3].split("^")[0]
    return ""


@pytest.mark.parametrize(
    ("payload", "status", "code", "err"),
    [
        pytest.param(adt(), st.RECEIVED, "AA", "", id="ok"),
        pytest.param(adt(mtype="MFN^M01"), st.REJECTED, "AR", "200", id="unknown-type"),
        pytest.param(adt(mtype="ADT^A99"), st.REJECTED, "AR", "201", id="unknown-trigger"),
        pytest.param(adt(pid_id="X"), st.REJECTED, "AR", "202", id="processing-id"),
        pytest.param(adt(version="9.9"), st.REJECTED, "AR", "203", id="version"),
        pytest.param(adt(version=""), st.REJECTED, "AR", "203", id="blank-version"),
        pytest.param(adt(control=""), st.REJECTED, "AR", "101", id="no-control-id"),
        pytest.param(adt(pid=""), st.ERROR, "AE", "101", id="required-field"),
        pytest.param(b"PID|1||X\r", st.QUARANTINED, "AR", "100", id="no-msh"),
        pytest.param(b"\x00\x01\x02garbage\xff", st.QUARANTINED, "AR", "100", id="binary-garbage"),
        pytest.param(b"MSH", st.QUARANTINED, "AR", "101", id="bare-msh"),
    ],
)
def test_decide(payload: bytes, status: str, code: str, err: str) -> None:
    jobs, immediate = Intake(CH, Committer(None)).decide(payload, "peer")  # type: ignore[arg-type]
    assert immediate is None
    (job,) = jobs
    assert job.row.status == status
    assert job.row.ack is not None
    assert msa(job.row.ack)[1] == code
    assert err3(job.row.ack) == err


def test_required_field_location() -> None:
    jobs, _ = Intake(CH, Committer(None)).decide(adt(pid=""), "peer")  # type: ignore[arg-type]
    ack = jobs[0].row.ack or b""
    assert "|PID^1^3|" in ack.decode()


def test_empty_frame_not_stored() -> None:
    jobs, immediate = Intake(CH, Committer(None)).decide(b"  \r\n", "peer")  # type: ignore[arg-type]
    assert jobs == [] and immediate is not None
    assert msa(immediate)[1:3] == ["AR", ""]


def test_inbound_ack_is_never_acked() -> None:
    jobs, _ = Intake(CH, Committer(None)).decide(b"MSH|^~\\&|A|B|C|D|||ACK^A01|9|P|2.5\rMSA|AA|1\r", "p")  # type: ignore[arg-type]
    assert jobs[0].row.status == st.IGNORED and jobs[0].row.ack is None


def test_no_ack_for_ne_ne() -> None:
    raw = b"MSH|^~\\&|A|B|C|D|||ADT^A01|9|P|2.5|||NE|NE\rPID|1||X^^^N\r"
    jobs, _ = Intake(CH, Committer(None)).decide(raw, "p")  # type: ignore[arg-type]
    assert jobs[0].row.status == st.RECEIVED and jobs[0].row.ack is None


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_group_commit_and_dedupe(tmp_path: Path) -> None:
    store = st.Store(f"sqlite:///{tmp_path}/s.db")
    committer = Committer(store)
    committer.start()
    intake = Intake(CH, committer)

    async def go() -> list[list[bytes]]:
        return await asyncio.gather(*(intake.handle(adt(f"C{i}"), "p") for i in range(50)))

    try:
        results = run(go())
        assert all(msa(r[0])[1] == "AA" for r in results)
        assert committer.batches < 50  # rows from many connections share commits
        first = results[0][0]
        again = run(intake.handle(adt("C0"), "p"))
        assert again == [first]  # the original ACK, byte for byte
        changed = run(intake.handle(adt("C0", pid="OTHER^^^NORTH"), "p"))
        assert msa(changed[0])[1] == "AE" and err3(changed[0]) == "205"
        rows = store.list_messages(limit=1000)
        assert len(rows) == 51  # 50 + the quarantined conflict; the exact duplicate is not stored
        assert store.counters("t")[("t", "duplicates_prevented")] == 1
        statuses = {r.status for r in rows}
        assert statuses == {st.RECEIVED, st.QUARANTINED}
    finally:
        committer.stop()
        store.close()


def test_dedupe_conflict_accept(tmp_path: Path) -> None:
    store = st.Store(f"sqlite:///{tmp_path}/s.db")
    committer = Committer(store)
    committer.start()
    ch = replace(CH, dedupe=DedupeConfig(on_conflict="accept"))
    intake = Intake(ch, committer)
    try:
        run(intake.handle(adt("X"), "p"))
        r = run(intake.handle(adt("X", pid="OTHER^^^NORTH"), "p"))
        assert msa(r[0])[1] == "AA"
    finally:
        committer.stop()
        store.close()


def test_store_failure_is_ar_207(tmp_path: Path) -> None:
    store = st.Store(f"sqlite:///{tmp_path}/s.db")
    committer = Committer(store)
    committer.start()
    intake = Intake(CH, committer)
    try:
        with store.engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE deliveries")
            conn.exec_driver_sql("DROP TABLE messages")
        r = run(intake.handle(adt("Z"), "p"))
        assert msa(r[0])[1:3] == ["AR", "Z"] and err3(r[0]) == "207"
        store.create_schema()
        r2 = run(intake.handle(adt("Z2"), "p"))  # keeps serving
        assert msa(r2[0])[1] == "AA"
    finally:
        committer.stop()
        store.close()


def test_default_types_cover_demo() -> None:
    assert "A40" in DEFAULT_TYPES["ADT"] and DEFAULT_TYPES["ORU"] == ("R01",)
