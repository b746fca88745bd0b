"""Ordering lanes (order_by + lanes) and the block / dead-letter failure policies, end to end."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine import store as st
from engine.client import MLLPClient, parse_ack
from tests.support.engine import EngineProcess, basic_channel, free_port, write_config
from tests.support.polling import wait_for

PLUGINS = str(Path(__file__).resolve().parents[1] / "support" / "plugins")


def adt(cid: str, mrn: str) -> bytes:
    return (
        f"MSH|^~\\&|EHR|NORTH|SL|HOSP|20250101120000||ADT^A08^ADT_A01|{cid}|P|2.5.1\r"
        f"PID|1||{mrn}^^^NORTH^MR||Testpatient^Alex\r"
    ).encode()


def send(port: int, items: list[tuple[str, str]]) -> None:
    async def go() -> None:
        c = MLLPClient("127.0.0.1", port)
        try:
            for cid, mrn in items:
                assert parse_ack(await c.send(adt(cid, mrn))).code == "AA"
        finally:
            await c.close()

    asyncio.run(go())


def setup(tmp_path: Path, policy: str, kind: str = "recorder") -> tuple[EngineProcess, Path, Path, Path]:
    port = free_port()
    log, fail, reject = tmp_path / "log.txt", tmp_path / "fail.txt", tmp_path / "reject.txt"
    dest = {
        "kind": kind,
        "log": str(log),
        "fail_file": str(fail),
        "reject_file": str(reject),
        "on_failure": policy,
        "lanes": 4,
        "retry": {"max_attempts": 1000, "backoff": 0.05, "max_backoff": 0.2},
    }
    cfg = write_config(
        tmp_path, channels={"c": basic_channel(port, order_by="PID-3.1")}, destinations={"rec": dest}
    )
    routes = cfg.read_text() + f"plugin_paths: [{PLUGINS}]\nplugins: [sluice_test_recorder]\n"
    cfg.write_text(routes.replace("destination: out", "destination: rec"))
    (tmp_path / "channels" / "c.yaml").write_text(
        (tmp_path / "channels" / "c.yaml").read_text().replace("destination: out", "destination: rec")
    )
    return EngineProcess(cfg, port), log, fail, reject


def lines(p: Path) -> list[str]:
    return p.read_text().split() if p.exists() else []


def delivery(s: st.Store, control_id: str) -> tuple[str, int] | None:
    """(status, attempts) of the one delivery of the message with this control id; None before it exists."""
    ids = [m.id for m in s.list_messages(limit=1000) if m.control_id == control_id]
    rows = s.deliveries_of(ids[0]) if ids else []
    return (rows[0].status, rows[0].attempts) if rows else None


@pytest.mark.parametrize("kind", ["recorder", "batch-recorder"])
def test_block_holds_only_the_failing_key(tmp_path: Path, kind: str) -> None:
    """One call per key, or one call per round across keys (batch_across_keys): the same order rules."""
    eng, log, fail, _ = setup(tmp_path, "block", kind)
    fail.write_text("A2\n")
    with eng:
        send(eng.port, [("A1", "PA"), ("A2", "PA"), ("B1", "PB"), ("A3", "PA"), ("B2", "PB")])
        wait_for(
            lambda: {"A1", "B1", "B2"} <= set(lines(log)), what=lambda: f"A1, B1, B2 delivered ({lines(log)})"
        )
        s = st.Store(f"sqlite:///{tmp_path}/sluice.db", create=False)
        try:
            # A3 is waiting to be delivered; from then on A2 is retried twice more ...
            wait_for(lambda: delivery(s, "A3"), what="A3's delivery to be created")
            a2 = delivery(s, "A2")
            assert a2 is not None and a2[0] == st.PENDING, a2
            wait_for(
                lambda: (d := delivery(s, "A2")) is not None and d[1] >= a2[1] + 2,
                what=lambda: f"two more attempts at A2 (had {a2[1]}, now {delivery(s, 'A2')})",
            )
            # ... and A3 is held behind it (same patient): never attempted, not delivered.
            assert delivery(s, "A3") == (st.PENDING, 0)
            assert "A3" not in lines(log)
        finally:
            s.close()
        assert lines(log).index("B1") < lines(log).index("B2")
        fail.write_text("")
        wait_for(lambda: "A3" in lines(log), what=lambda: f"A3 delivered after A2 recovered ({lines(log)})")
        got = lines(log)
        assert got.index("A1") < got.index("A2") < got.index("A3")


@pytest.mark.parametrize("kind", ["recorder", "batch-recorder"])
def test_dead_letter_policy_parks_and_continues(tmp_path: Path, kind: str) -> None:
    eng, log, _, reject = setup(tmp_path, "dead-letter", kind)
    reject.write_text("A2\n")
    with eng:
        send(eng.port, [("A1", "PA"), ("A2", "PA"), ("A3", "PA")])
        wait_for(lambda: "A3" in lines(log), what=lambda: f"A3 delivered ({lines(log)})")
        assert lines(log) == ["A1", "A3"]
        s = st.Store(f"sqlite:///{tmp_path}/sluice.db")
        try:
            wait_for(lambda: s.dead_letters(), what="A2 in the dead letters")
            (dl,) = s.dead_letters()
            assert "recorder rejects A2" in dl.reason
        finally:
            s.close()


def test_fifo_without_order_by(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "log.txt"
    dest = {"kind": "recorder", "log": str(log), "lanes": 8}
    cfg = write_config(
        tmp_path,
        channels={"c": basic_channel(port, routes=[{"destination": "rec"}])},
        destinations={"rec": dest},
    )
    cfg.write_text(cfg.read_text() + f"plugin_paths: [{PLUGINS}]\nplugins: [sluice_test_recorder]\n")
    ids = [f"F{i:03d}" for i in range(200)]
    with EngineProcess(cfg, port):
        send(port, [(c, f"P{i % 7}") for i, c in enumerate(ids)])
        wait_for(lambda: len(lines(log)) >= 200, what=lambda: f"200 deliveries (have {len(lines(log))})")
    assert lines(log) == ids  # one lane per channel and destination: strict arrival order
