"""Two engine processes sharing one PostgreSQL store: each message processed and delivered once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine import keyring
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


@pytest.mark.postgres
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_two_nodes_on_postgres_deliver_each_message_once(
    tmp_path: Path, pg_url: str, encrypted: bool
) -> None:
    port_a, port_b = free_port(), free_port()
    log = tmp_path / "delivered.txt"
    dest = {"kind": "recorder", "log": str(log), "lanes": 4, "delay": 0.002}
    cfg = write_config(
        tmp_path,
        channels={"c": basic_channel(port_a, order_by="PID-3.1", routes=[{"destination": "rec"}])},
        destinations={"rec": dest},
        store=pg_url,
    )
    cfg.write_text(cfg.read_text() + f"plugin_paths: [{PLUGINS}]\nplugins: [sluice_test_recorder]\n")
    ring = None
    if encrypted:  # one key ring for both nodes: each opens what the other sealed
        keyring.write_ring(tmp_path / "store.keys", [keyring.new_key()], replace=False)
        ring = keyring.KeyRing(file=tmp_path / "store.keys")
        cfg.write_text(cfg.read_text() + f"store_encryption: {{key_file: {tmp_path / 'store.keys'}}}\n")
    a = EngineProcess(cfg, port_a, env={"SLUICE_NODE_ID": "a"}, log_name="a.log")
    b = EngineProcess(cfg, port_b, env={"SLUICE_NODE_ID": "b", "SLUICE_PORT": str(port_b)}, log_name="b.log")
    ids = [f"N{i:04d}" for i in range(600)]

    async def send(port: int, chunk: list[str]) -> None:
        c = MLLPClient("127.0.0.1", port)
        try:
            for cid in chunk:
                assert parse_ack(await c.send(adt(cid, f"P{int(cid[1:]) % 13}"))).code == "AA"
        finally:
            await c.close()

    async def go() -> None:
        await asyncio.gather(*(send(port_a if k % 2 else port_b, ids[k::6]) for k in range(6)))

    def delivered() -> list[str]:
        return log.read_text().split() if log.exists() else []

    with a, b:
        asyncio.run(go())
        wait_for(
            lambda: len(delivered()) >= len(ids),
            timeout=60,
            what=lambda: f"{len(ids)} deliveries (have {len(delivered())})",
        )
    # Both engines have stopped, each after finishing what it had in flight: nothing more can be
    # delivered, so a double delivery would be in the log by now.
    assert a.proc is not None and b.proc is not None
    assert (a.proc.returncode, b.proc.returncode) == (0, 0)
    got = delivered()
    assert sorted(got) == sorted(ids)  # every message delivered exactly once across the two nodes
    s = st.Store(pg_url, keys=ring)
    try:
        rows = s.list_messages(limit=10_000)
        assert len(rows) == len(ids) and all(r.status == st.PROCESSED for r in rows)
        if ring is not None:
            with s.engine.connect() as conn:
                stored = conn.exec_driver_sql("SELECT raw, ack FROM messages").all()
                payloads = conn.exec_driver_sql("SELECT payload FROM deliveries").scalars().all()
            values = [bytes(v) for row in stored for v in row] + [bytes(p) for p in payloads]
            assert all(v.startswith(keyring.ENCRYPTED) for v in values)
            assert not any(b"Testpatient" in v for v in values)
            assert s.get_message(rows[0].id).raw == adt(
                rows[0].control_id, f"P{int(rows[0].control_id[1:]) % 13}"
            )
    finally:
        s.close()
    # Strict per-key order across nodes (a message processed on one node before an older one on the
    # other) is the scale-out issue's work; within one node order_by lanes keep it (test_ordering.py).
