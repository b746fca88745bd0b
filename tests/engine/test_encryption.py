"""Encryption at rest (issue #12): AES-256-GCM frames, the key ring, the store's sealed columns, and
the real engine with ``store_encryption`` on: nothing of a message body in the database file or its
WAL, every reader still works, and keys rotate while the engine runs."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine import keyring, rekey
from engine import store as st
from engine.cli import main
from engine.client import MLLPClient, parse_ack
from engine.errors import ConfigError, StoreError
from tests.support.engine import EngineProcess, basic_channel, fhir_channel, free_port, write_config
from tests.support.polling import wait_for

# A synthetic name no other test data carries: found in the outputs, never in the store's files.
DISTINCT = "Quorthvexil"
DISTINCT_MRN = (
    "QZV7730481"  # a synthetic identifier: the channel orders by it (order_key, resource_state keys)
)


def adt(cid: str, name: str = DISTINCT, mrn: str = "MRN4411") -> bytes:
    return (
        f"MSH|^~\\&|EHR|NORTH|SL|HOSP|20250101120000||ADT^A08^ADT_A01|{cid}|P|2.5.1\r"
        "EVN|A08|20250101120000\r"
        f"PID|1||{mrn}^^^NORTH^MR||{name}^Zelvina^Q||19800101|F|||1 Elm St^^Springfield^IL^62701\r"
        "PV1|1|I|4W^401^1^NORTH||||1234^Attending^Ann|||MED||||||||V100^^^NORTH^VN\r"
    ).encode()


def send_all(port: int, messages: list[bytes]) -> list[str]:
    async def go() -> list[str]:
        c = MLLPClient("127.0.0.1", port)
        try:
            return [parse_ack(await c.send(m)).code for m in messages]
        finally:
            await c.close()

    return asyncio.run(go())


def make_key_file(path: Path) -> Path:
    res = CliRunner().invoke(main, ["keys", "create", "--out", str(path)])
    assert res.exit_code == 0, res.output
    return path


def encrypted_config(
    tmp_path: Path,
    port: int,
    key_file: Path | None,
    *,
    fhir: bool = False,
    workers: int = 1,
    order_by: str | None = None,
) -> Path:
    out = tmp_path / "out"
    channel = fhir_channel(port, "out") if fhir else basic_channel(port)
    if order_by:
        channel["order_by"] = order_by
    cfg = write_config(
        tmp_path,
        channels={"c": channel},
        destinations={"out": {"kind": "file", "directory": str(out)}},
        processing={"workers": workers},
    )
    if key_file is not None:
        cfg.write_text(cfg.read_text() + f"store_encryption: {{key_file: {key_file}}}\n")
    return cfg


def outputs(tmp_path: Path) -> list[Path]:
    out = tmp_path / "out"
    return (
        sorted(p for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))
        if out.exists()
        else []
    )


def store_bytes(db: Path) -> dict[str, bytes]:
    """The database file and whatever WAL and SHM files exist next to it."""
    return {p.name: p.read_bytes() for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists()}


# ------------------------------------------------------------------------------------------- units


def test_frames_round_trip_and_tell_encrypted_compressed_and_plain_apart() -> None:
    ring = keyring.KeyRing([keyring.new_key()])
    body = b"MSH|^~\\&|X\rPID|1||1||" + DISTINCT.encode() + b"\r"
    sealed = ring.seal(body, keyring.RAW)
    assert sealed.startswith(keyring.ENCRYPTED) and DISTINCT.encode() not in sealed
    assert keyring.key_id_of(sealed) == ring.current.id
    assert keyring.unseal(ring, sealed, keyring.RAW) == body
    assert ring.seal(body, keyring.RAW) != sealed  # a fresh nonce every time
    # a compressed payload is sealed after compressing: the frame holds the zstd frame
    payload = b'{"resourceType":"Bundle","name":"' + DISTINCT.encode() * 100 + b'"}'
    stored = st.stored_payload(ring, payload)
    assert stored.startswith(keyring.ENCRYPTED) and DISTINCT.encode() not in stored
    from engine import payloads

    assert payloads.unpack(keyring.unseal(ring, stored, keyring.PAYLOAD)) == payload
    # without a ring: plain stays plain, and a plain value that looks like a frame is escaped
    assert keyring.seal(None, body, keyring.RAW) == body
    lookalike = keyring.ENCRYPTED + b"not a frame"
    kept = keyring.seal(None, lookalike, keyring.RAW)
    assert kept.startswith(keyring.PLAIN) and keyring.unseal(None, kept, keyring.RAW) == lookalike
    assert keyring.unseal(ring, kept, keyring.RAW) == lookalike


def test_a_frame_opens_only_in_its_own_column_unaltered_with_its_own_key() -> None:
    ring = keyring.KeyRing([keyring.new_key()])
    sealed = ring.seal(b"body", keyring.RAW)
    with pytest.raises(StoreError, match="does not decrypt"):
        keyring.unseal(ring, sealed, keyring.ACK)  # moved to another column
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(StoreError, match="does not decrypt"):
        keyring.unseal(ring, tampered, keyring.RAW)
    with pytest.raises(StoreError, match="not in the"):
        keyring.unseal(keyring.KeyRing([keyring.new_key()]), sealed, keyring.RAW)
    with pytest.raises(StoreError, match="no key ring is configured"):
        keyring.unseal(None, sealed, keyring.RAW)


def test_key_ring_text_is_checked_and_the_last_key_is_current(tmp_path: Path) -> None:
    a, b = keyring.new_key(), keyring.new_key()
    ring_text = keyring.format_ring([a, b])
    keys = keyring.parse_ring(ring_text, "test")
    assert [k.id for k in keys] == [a.id, b.id] and keys[-1].secret == b.secret
    bare = keyring.format_ring([a]).splitlines()[-1].split(":", 1)[1]  # a base64 key without an id
    assert keyring.parse_ring(bare, "env")[0].id == keyring.derived_id(a.secret)
    for bad, why in (
        ("k1:not-base64!", "not base64"),
        ("k1:" + "QUJD", "AES-256 needs 32"),
        (f"{a.id}:{bare} {a.id}:{bare}", "appears twice"),
        ("# nothing", "holds no key"),
    ):
        with pytest.raises(ConfigError, match=why):
            keyring.parse_ring(bad, "test")
    assert "secret" not in repr(a) and repr(a) == f"Key({a.id!r})"


def test_keys_create_writes_a_private_ring_and_add_makes_a_new_current_key(tmp_path: Path) -> None:
    old = os.umask(0o022)  # whatever the caller's umask, the key file is 0600
    try:
        path = make_key_file(tmp_path / "keys" / "store.keys")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = keyring.KeyRing(file=path).current.id
    again = CliRunner().invoke(main, ["keys", "create", "--out", str(path)])
    assert again.exit_code != 0 and "exists" in again.output  # never overwrites a ring
    added = CliRunner().invoke(main, ["keys", "create", "--out", str(path), "--add"])
    assert added.exit_code == 0, added.output
    ring = keyring.KeyRing(file=path)
    assert ring.keys[0].id == first and ring.current.id != first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    standby = CliRunner().invoke(main, ["keys", "create", "--out", str(path), "--add", "--standby"])
    assert standby.exit_code == 0, standby.output
    ring2 = keyring.KeyRing(file=path)
    assert ring2.current.id == ring.current.id and len(ring2.keys) == 3
    printed = CliRunner().invoke(main, ["keys", "create", "--out", "-"])
    assert printed.exit_code == 0 and len(keyring.parse_ring(printed.output, "stdout")) == 1


def test_a_ring_rereads_its_file_when_it_changes_and_on_an_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "k"
    a, b = keyring.new_key(), keyring.new_key()
    keyring.write_ring(path, [a], replace=False)
    ring = keyring.KeyRing(file=path)
    other = keyring.KeyRing(file=path)
    keyring.write_ring(path, [a, b], replace=True)
    # an unknown key id makes a ring read its file again at once
    assert keyring.unseal(other, keyring.KeyRing([a, b]).seal(b"x", keyring.ACK), keyring.ACK) == b"x"
    # and sealing notices a changed file within RELOAD_EVERY
    wait_for(lambda: keyring.key_id_of(ring.seal(b"y", keyring.RAW)) == b.id, timeout=10, what="key b in use")
    keyring.write_ring(path, [a, b], replace=True)
    path.write_text("garbage")  # a broken edit keeps the keys a ring has
    assert not ring.reload() and ring.current.id == b.id


def test_store_encryption_config_needs_exactly_one_source(tmp_path: Path) -> None:
    from engine import config

    port = free_port()
    cfg = encrypted_config(tmp_path, port, None)
    base = cfg.read_text()
    cfg.write_text(base + "store_encryption: {key_file: a.keys, env: SLUICE_K}\n")
    with pytest.raises(ConfigError, match="exactly one of key_file and env"):
        config.load(cfg)
    cfg.write_text(base + "store_encryption: {key_file: a.keys}\n")
    loaded = config.load(cfg)
    assert loaded.store_encryption is not None
    assert loaded.store_encryption.key_file == str((tmp_path / "a.keys").resolve())
    with pytest.raises(ConfigError, match=r"key file .*a\.keys not found"):
        keyring.from_config(loaded)
    res = CliRunner().invoke(main, ["check", "--config", str(cfg)])
    assert res.exit_code != 0 and "a.keys not found" in res.output


def test_a_key_ring_from_an_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import config

    key = keyring.new_key()
    monkeypatch.setenv("SLUICE_TEST_STORE_KEYS", keyring.format_ring([key]))
    cfg = encrypted_config(tmp_path, free_port(), None)
    cfg.write_text(cfg.read_text() + "store_encryption: {env: SLUICE_TEST_STORE_KEYS}\n")
    ring = keyring.from_config(config.load(cfg))
    assert ring is not None and ring.current.id == key.id
    monkeypatch.setenv("SLUICE_TEST_STORE_KEYS", "")
    with pytest.raises(ConfigError, match="SLUICE_TEST_STORE_KEYS is not set or empty"):
        keyring.from_config(config.load(cfg))


def test_store_seals_every_body_column_and_its_readers_open_them(tmp_path: Path) -> None:
    ring = keyring.KeyRing([keyring.new_key()])
    s = st.Store(f"sqlite:///{tmp_path}/s.db", keys=ring)
    raw = adt("C1")
    with s.write() as conn:
        (mid,) = s.insert_messages(
            conn, [st.NewMessage("c", time.time(), "peer", raw, control_id="C1", ack=b"ACK")]
        )
        s.add_deliveries(
            conn, mid, "c", "", [st.NewDelivery("out", b"payload " + DISTINCT.encode(), "text/plain")]
        )
    with s.engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT raw, ack FROM messages").one()
        payload = conn.exec_driver_sql("SELECT payload FROM deliveries").scalar_one()
    assert all(bytes(v).startswith(keyring.ENCRYPTED) for v in (*stored, payload))
    assert s.get_message(mid).raw == raw and s.get_message(mid).ack == b"ACK"  # SQLAlchemy reads
    assert s.received_by_id([mid])[0].raw == raw  # the worker processes' read
    (loaded,) = s.load_deliveries([r.id for r in s.pending_deliveries("out", 10)])
    from engine import payloads

    assert loaded.raw == raw and payloads.unpack(loaded.payload) == b"payload " + DISTINCT.encode()
    from engine.admin import search  # the admin API's and the web console's content view

    assert search.content(s, mid) == (raw, [("out", "text/plain", b"payload " + DISTINCT.encode())])
    # the metadata columns stay plain and queryable
    assert [r.control_id for r in s.list_messages()] == ["C1"]
    s.close()
    plain = st.Store(f"sqlite:///{tmp_path}/s.db")  # the same store without the key ring
    with pytest.raises(StoreError, match="no key ring is configured"):
        plain.get_message(mid)
    plain.close()


def test_rotate_reseals_plain_and_old_key_values_on_sqlite_and_postgres(store_url: str) -> None:
    a, b = keyring.new_key(), keyring.new_key()
    plain_store = st.Store(store_url)
    old_store = st.Store(store_url, keys=keyring.KeyRing([a]))
    bodies = {}
    for s, prefix in ((plain_store, "PL"), (old_store, "OK")):
        with s.write() as conn:
            for i in range(6):
                cid = f"{prefix}{i}"
                bodies[cid] = adt(cid)
                (mid,) = s.insert_messages(
                    conn,
                    [
                        st.NewMessage(
                            "c", time.time(), "p", bodies[cid], control_id=cid, ack=None if i % 2 else b"A"
                        )
                    ],
                )
                s.add_deliveries(conn, mid, "c", "", [st.NewDelivery("out", bodies[cid] * (1 + i * 40), "x")])
    with plain_store.write() as conn:  # a body retention dropped: stays dropped
        conn.exec_driver_sql("UPDATE messages SET raw = NULL WHERE control_id = 'PL5'")
    plain_store.close()
    old_store.close()
    s = st.Store(store_url, keys=keyring.KeyRing([a, b]))
    before = rekey.status(s)
    assert before["messages.raw"] == {"": 5, a.id: 6} and before["messages.ack"] == {"": 3, a.id: 3}
    assert before["deliveries.payload"] == {"": 6, a.id: 6}
    done = rekey.rotate(s, batch=4, pause=0)
    assert [(r.table, r.rows, r.values) for r in done] == [("messages", 11, 17), ("deliveries", 12, 12)]
    after = rekey.status(s)
    assert after == {
        "messages.raw": {b.id: 11},
        "messages.ack": {b.id: 6},
        "deliveries.payload": {b.id: 12},
    }
    assert rekey.rotate(s, batch=4, pause=0)[0].rows == 0  # nothing left: a second run is a no-op
    from engine import payloads

    for row in s.list_messages(limit=100):
        m = s.get_message(row.id)
        assert m.raw == (None if row.control_id == "PL5" else bodies[row.control_id])
        (d,) = s.load_deliveries([x.id for x in s.deliveries_of(row.id)])
        assert payloads.unpack(d.payload).startswith(bodies[row.control_id])
    s.close()


# ------------------------------------------------------------------------------ the real engine


def test_engine_with_encryption_keeps_message_content_out_of_the_database_and_wal(tmp_path: Path) -> None:
    port = free_port()
    key_file = make_key_file(tmp_path / "store.keys")
    # ordered by the patient identifier: it keys the order lanes and the Patient's resource state
    cfg = encrypted_config(tmp_path, port, key_file, fhir=True, workers=2, order_by="PID-3.1")
    db = tmp_path / "sluice.db"
    with EngineProcess(cfg, port):
        assert send_all(port, [adt(f"ENC{i}", mrn=DISTINCT_MRN) for i in range(5)]) == ["AA"] * 5
        files = wait_for(lambda: len(outputs(tmp_path)) >= 5 and outputs(tmp_path), what="5 FHIR bundles")
        # delivered: the bundles were sealed in the worker processes and opened at delivery
        assert all(DISTINCT in f.read_text() for f in files)
        on_disk = store_bytes(db)
        assert "sluice.db-wal" in on_disk  # the engine is running: its WAL holds the recent writes
        for name, data in on_disk.items():
            assert DISTINCT.encode() not in data, f"{DISTINCT} found in {name}"
            assert b"Springfield" not in data, f"an address found in {name}"
            assert DISTINCT_MRN.encode() not in data, f"the patient identifier found in {name}"
        assert (
            b"ENC3" in on_disk["sluice.db"] + on_disk["sluice.db-wal"]
        )  # metadata: control ids stay queryable
    for name, data in store_bytes(db).items():
        assert DISTINCT.encode() not in data, f"{DISTINCT} found in {name} after shutdown"
        assert DISTINCT_MRN.encode() not in data, f"the patient identifier found in {name} after shutdown"
    with sqlite3.connect(db) as conn:  # the keys were written (hashed), so the identifier was really there
        assert conn.execute("SELECT count(*) FROM messages WHERE order_key LIKE 'k:%'").fetchone() == (5,)
        assert conn.execute("SELECT count(*) FROM resource_state WHERE key LIKE 'k:%'").fetchone()[0] >= 1
    # every reader opens the sealed values with the configured key
    listed = CliRunner().invoke(main, ["messages", "list", "--config", str(cfg)])
    assert listed.exit_code == 0 and "ENC4" in listed.output and DISTINCT not in listed.output
    header, first = listed.output.splitlines()[:2]
    assert header.split("\t")[0] == "id"
    mid = first.split("\t", 1)[0]
    shown = CliRunner().invoke(main, ["messages", "show", mid, "--show-phi", "--config", str(cfg)])
    assert shown.exit_code == 0, shown.output
    assert f"PID|1||{DISTINCT_MRN}^^^NORTH^MR||{DISTINCT}^Zelvina" in shown.output


def test_keys_rotate_reseals_every_row_while_the_engine_runs(tmp_path: Path) -> None:
    port = free_port()
    key_file = make_key_file(tmp_path / "store.keys")
    first = keyring.KeyRing(file=key_file).current.id
    cfg = encrypted_config(tmp_path, port, key_file, workers=1)
    runner = CliRunner()
    with EngineProcess(cfg, port):
        assert send_all(port, [adt(f"OLD{i}") for i in range(40)]) == ["AA"] * 40
        wait_for(lambda: len(outputs(tmp_path)) >= 40, what="40 deliveries")
        added = runner.invoke(main, ["keys", "create", "--out", str(key_file), "--add"])
        assert added.exit_code == 0, added.output
        second = keyring.KeyRing(file=key_file).current.id
        probe = st.Store(f"sqlite:///{tmp_path}/sluice.db", create=False)

        def newest_key() -> str | None:
            send_all(port, [adt(f"PROBE{time.monotonic_ns()}")])
            with probe.engine.connect() as conn:
                raw = conn.exec_driver_sql("SELECT raw FROM messages ORDER BY id DESC LIMIT 1").scalar_one()
            return keyring.key_id_of(bytes(raw))

        wait_for(lambda: newest_key() == second, timeout=20, what="the engine sealing with the new key")
        probe.close()
        # traffic goes on while the rows are re-sealed in small batches
        codes: list[str] = []
        sender = threading.Thread(
            target=lambda: codes.extend(send_all(port, [adt(f"NEW{i}") for i in range(60)])), daemon=True
        )
        sender.start()
        rotated = runner.invoke(
            main, ["keys", "rotate", "--config", str(cfg), "--batch", "7", "--pause", "0.01"]
        )
        sender.join(60)
        assert rotated.exit_code == 0, rotated.output
        assert codes == ["AA"] * 60
        meta = st.Store(f"sqlite:///{tmp_path}/sluice.db", create=False)  # metadata needs no key
        stored = len(meta.list_messages(limit=10_000))
        meta.close()
        wait_for(lambda: len(outputs(tmp_path)) >= stored, what=f"{stored} deliveries")
        status = runner.invoke(main, ["keys", "status", "--config", str(cfg)])
        assert status.exit_code == 0, status.output
        assert f"messages.raw\t{second} (current)\t{stored}" in status.output, status.output
        assert first not in status.output.split("\n", 2)[2] and "plain" not in status.output, status.output
        # no value uses the first key any more: it can leave the ring, and the engine carries on
        retired = runner.invoke(main, ["keys", "retire", first, "--config", str(cfg)])
        assert retired.exit_code == 0, retired.output
        assert [k.id for k in keyring.KeyRing(file=key_file).keys] == [second]
        time.sleep(keyring.RELOAD_EVERY)  # let the engine and its worker re-read the smaller ring
        assert send_all(port, [adt("AFTER")]) == ["AA"]
        wait_for(
            lambda: any("AFTER" in p.read_text(errors="replace") for p in outputs(tmp_path)), what="AFTER"
        )
    old = runner.invoke(main, ["messages", "list", "--control-id", "OLD0", "--json", "--config", str(cfg)])
    mid = old.output.split('"id": ', 1)[1].split(",", 1)[0]
    shown = runner.invoke(main, ["messages", "show", mid, "--show-phi", "--config", str(cfg)])
    assert shown.exit_code == 0 and DISTINCT in shown.output  # opened with the second key now


def test_retire_refuses_a_key_that_still_seals_rows(tmp_path: Path) -> None:
    key_file = make_key_file(tmp_path / "store.keys")
    first = keyring.KeyRing(file=key_file).current.id
    cfg = encrypted_config(tmp_path, free_port(), key_file)
    s = st.Store(f"sqlite:///{tmp_path}/sluice.db", keys=keyring.KeyRing(file=key_file))
    with s.write() as conn:
        s.insert_messages(conn, [st.NewMessage("c", time.time(), "p", adt("R1"), control_id="R1")])
    s.close()
    runner = CliRunner()
    assert runner.invoke(main, ["keys", "create", "--out", str(key_file), "--add"]).exit_code == 0
    refused = runner.invoke(main, ["keys", "retire", first, "--config", str(cfg)])
    assert refused.exit_code != 0 and "still sealed" in refused.output
    current = keyring.KeyRing(file=key_file).current.id
    assert (
        "is the current key" in runner.invoke(main, ["keys", "retire", current, "--config", str(cfg)]).output
    )


def test_rotate_encrypts_a_store_written_before_encryption_was_on(tmp_path: Path) -> None:
    port = free_port()
    cfg = encrypted_config(tmp_path, port, None)
    with EngineProcess(cfg, port):
        assert send_all(port, [adt(f"P{i}") for i in range(12)]) == ["AA"] * 12
        wait_for(lambda: len(outputs(tmp_path)) >= 12, what="12 deliveries")
    db = tmp_path / "sluice.db"
    assert DISTINCT.encode() in b"".join(store_bytes(db).values())  # plain so far
    key_file = make_key_file(tmp_path / "store.keys")
    cfg.write_text(cfg.read_text() + f"store_encryption: {{key_file: {key_file}}}\n")
    runner = CliRunner()
    res = runner.invoke(main, ["keys", "rotate", "--config", str(cfg), "--batch", "5"])
    assert res.exit_code == 0, res.output
    assert "messages: 24 value(s) re-sealed in 12 row(s)" in res.output  # bodies and ACKs
    assert "deliveries: 12 value(s) re-sealed in 12 row(s)" in res.output
    s = st.Store(f"sqlite:///{db}", keys=keyring.KeyRing(file=key_file))
    counts = rekey.status(s)
    assert all(set(c) == {keyring.KeyRing(file=key_file).current.id} for c in counts.values()), counts
    # the plain versions are gone from the file once SQLite reuses or vacuums the freed pages
    s._raw_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    s._raw_sql("VACUUM")
    s.close()
    assert DISTINCT.encode() not in b"".join(store_bytes(db).values())
    with EngineProcess(cfg, port):  # the engine reads the sealed history and goes on
        assert send_all(port, [adt("P99")]) == ["AA"]
        wait_for(lambda: len(outputs(tmp_path)) >= 13, what="13 deliveries")
    replay = runner.invoke(
        main, ["replay", "--channel", "c", "--status", "processed", "--dry-run", "--config", str(cfg)]
    )
    assert replay.exit_code == 0 and "13 message(s) would be replayed" in replay.output


def test_commands_say_a_key_ring_is_missing_instead_of_failing(tmp_path: Path) -> None:
    cfg = encrypted_config(tmp_path, free_port(), None)  # no store_encryption in the config
    s = st.Store(f"sqlite:///{tmp_path}/sluice.db", keys=keyring.KeyRing([keyring.new_key()]))
    with s.write() as conn:
        s.insert_messages(conn, [st.NewMessage("c", time.time(), "p", adt("K1"), control_id="K1")])
    s.close()
    res = CliRunner().invoke(main, ["messages", "show", "1", "--config", str(cfg)])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    assert "encrypted values" in res.output and "add store_encryption to routes.yaml" in res.output
    assert "K1" in CliRunner().invoke(main, ["messages", "list", "--config", str(cfg)]).output  # metadata


def test_acks_written_by_inline_processing_and_replayed_for_duplicates_are_sealed(tmp_path: Path) -> None:
    port = free_port()
    key_file = make_key_file(tmp_path / "store.keys")
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path,
        channels={"c": basic_channel(port, ack="after-processing")},
        destinations={"out": {"kind": "file", "directory": str(out)}},
        processing={"workers": 0},
    )
    cfg.write_text(cfg.read_text() + f"store_encryption: {{key_file: {key_file}}}\n")

    async def go() -> list[bytes]:
        c = MLLPClient("127.0.0.1", port)
        try:
            return [await c.send(adt("DUP1")), await c.send(adt("DUP1"))]
        finally:
            await c.close()

    with EngineProcess(cfg, port):
        first, again = asyncio.run(go())
    assert parse_ack(first).code == "AA"
    assert again == first  # the duplicate gets the stored ACK back, opened from its seal
    s = st.Store(f"sqlite:///{tmp_path}/sluice.db")
    with s.engine.connect() as conn:
        (ack,) = conn.exec_driver_sql("SELECT ack FROM messages").one()
    s.close()
    assert bytes(ack).startswith(keyring.ENCRYPTED)  # written by the inline processing's UPDATE
