"""The store on SQLite and on the real PostgreSQL: the same tests for both."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import func, select

from engine import store as st


def new(i: int, channel: str = "c", key: str = "") -> st.NewMessage:
    return st.NewMessage(
        channel=channel,
        received_at=time.time(),
        peer="127.0.0.1:1",
        raw=f"MSH|^~\\&|A|B|C|D|||ADT^A01|{i}|P|2.5\r".encode(),
        control_id=str(i),
        message_type="ADT",
        trigger="A01",
        dedupe_key=f"A|B|{i}",
        content_hash=f"h{i}",
        order_key=key,
        ack=b"MSH|ack",
        ack_code="AA",
    )


def test_insert_claim_deliver(store_url: str) -> None:
    s = st.Store(store_url)
    try:
        with s.write() as conn:
            ids = s.insert_messages(conn, [new(i) for i in range(5)])
        assert len(ids) == 5 and ids == sorted(ids)
        claimed = s.claim_received("c", 3, "me")
        assert [r.id for r in claimed] == ids[:3]
        assert len(s.claim_received("c", 10, "me")) == 2
        assert s.claim_received("c", 10, "me") == []
        with s.write() as conn:
            for r in claimed:
                s.add_deliveries(conn, r.id, "c", "", [st.NewDelivery("out", b"{}", "application/json")])
            s.finish_messages(conn, [(r.id, st.PROCESSED, "") for r in claimed])
        pending = s.pending_deliveries("out", 10)
        assert len(pending) == 3
        loaded = s.load_deliveries([p.id for p in pending])
        assert loaded[0].control_id == "0" and loaded[0].payload == b"{}"
        s.record_deliveries(
            [(pending[0].id, "ok")],
            [(pending[1].id, 1, "boom", time.time() + 60), (pending[2].id, 5, "gave up", None)],
        )
        counts = s.delivery_counts()
        assert (
            counts[("out", st.DELIVERED)] == 1
            and counts[("out", st.PENDING)] == 1
            and counts[("out", st.DEAD)] == 1
        )
        dead = s.dead_letters()
        assert any(getattr(d, "reason", "") == "gave up" for d in dead)
        assert s.check() == "ok"
    finally:
        s.close()


def test_recover_returns_in_flight(store_url: str) -> None:
    s = st.Store(store_url)
    try:
        with s.write() as conn:
            s.insert_messages(conn, [new(1)])
        assert len(s.claim_received("c", 10, "crashed-node")) == 1
        assert s.recover() == 1
        assert len(s.claim_received("c", 10, "me")) == 1
    finally:
        s.close()


def test_duplicates_lookup(store_url: str) -> None:
    s = st.Store(store_url)
    try:
        with s.write() as conn:
            s.insert_messages(conn, [new(1), new(2)])
        with s.engine.connect() as conn:
            found = s.find_duplicates(conn, "c", ["A|B|1", "A|B|3"], time.time() - 60)
        assert set(found) == {"A|B|1"} and found["A|B|1"].content_hash == "h1"
        with s.engine.connect() as conn:
            assert s.find_duplicates(conn, "c", ["A|B|1"], time.time() + 60) == {}
        # as intake asks: with the control ids (the look-up then seeks ix_messages_control_channel)
        with s.engine.connect() as conn:
            found = s.find_duplicates(conn, "c", ["A|B|1", "A|B|3"], time.time() - 60, ["1", "3"])
            assert set(found) == {"A|B|1"} and found["A|B|1"].message_id == 1
            assert s.find_duplicates(conn, "d", ["A|B|1"], time.time() - 60, ["1"]) == {}  # other channel
    finally:
        s.close()


def test_dedupe_and_control_id_share_one_index(tmp_path: Path) -> None:
    """A store made before ix_messages_control_channel gets it, and loses the indexes it replaces
    (the intake's writes per message: bench/README.md); the dedupe look-up and the admin search by
    control id both seek it."""
    import sqlite3

    url = f"sqlite:///{tmp_path / 'old.db'}"
    st.Store(url).close()
    db = sqlite3.connect(tmp_path / "old.db")
    db.execute("DROP INDEX ix_messages_control_channel")
    db.execute("CREATE INDEX ix_messages_dedupe ON messages (channel, dedupe_key)")
    db.execute("CREATE INDEX ix_messages_control_id ON messages (control_id)")
    db.execute("CREATE INDEX ix_messages_control_dedupe ON messages (control_id, channel, dedupe_key)")
    db.commit()
    st.Store(url).close()  # as the engine's next start
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "ix_messages_control_channel" in names
    assert not names & set(st.OBSOLETE_INDEXES)
    plans = [
        " ".join(str(r[-1]) for r in db.execute("EXPLAIN QUERY PLAN " + sql, args))
        for sql, args in (
            (
                "SELECT id FROM messages WHERE control_id IN (?) AND channel = ? AND dedupe_key IN (?) "
                "AND received_at >= ? AND status NOT IN (?, ?) ORDER BY id",
                ["1", "c", "A|B|1", 0.0, "q", "r"],
            ),
            ("SELECT id FROM messages WHERE control_id = ? ORDER BY id DESC LIMIT 51", ["1"]),
        )
    ]
    db.close()
    assert all("ix_messages_control_channel" in p for p in plans), plans


def test_replay_dead_delivery(store_url: str) -> None:
    s = st.Store(store_url)
    try:
        with s.write() as conn:
            (mid,) = s.insert_messages(conn, [new(1)])
        s.claim_received("c", 1, "me")
        with s.write() as conn:
            s.add_deliveries(
                conn, mid, "c", "", [st.NewDelivery("a", b"x", "t"), st.NewDelivery("b", b"x", "t")]
            )
            s.finish_messages(conn, [(mid, st.PROCESSED, "")])
        a, b = s.pending_deliveries("a", 5)[0], s.pending_deliveries("b", 5)[0]
        s.record_deliveries([(a.id, "ok")], [(b.id, 3, "down", None)])
        sel = s.select_for_replay(status="dead", channel="c")
        assert sel == [(mid, ["b"])]
        assert s.replay(sel, who="tester", why="fixed", criteria={"status": "dead"}) == 1
        (row,) = s.claim_received("c", 5, "me")
        assert row.replay_destinations == "b"
        assert s.replays()[0].who == "tester"
        statuses = {d.destination: d.status for d in s.deliveries_of(mid)}
        assert statuses == {"a": st.DELIVERED, "b": st.SUPERSEDED}
    finally:
        s.close()


def test_resource_ranks(store_url: str) -> None:
    s = st.Store(store_url)
    try:
        with s.write() as conn:
            s.set_resource_ranks(conn, 1, {"Observation|x": 3})
            s.set_resource_ranks(conn, 2, {"Observation|x": 1, "Patient|p": 0})
        with s.engine.connect() as conn:
            assert s.resource_ranks(conn, ["Observation|x", "Patient|p", "nope"]) == {
                "Observation|x": 3,
                "Patient|p": 0,
            }
    finally:
        s.close()


def test_prune_drops_bodies_then_rows(store_url: str) -> None:
    s = st.Store(store_url)
    try:
        with s.write() as conn:
            ids = s.insert_messages(conn, [new(i) for i in range(20)])
            s.finish_messages(conn, [(mid, st.PROCESSED, "") for mid in ids])
            (keep,) = s.insert_messages(conn, [new(99)])  # still waiting: never pruned
        done = s.prune("c", bodies_before=time.time() + 1, rows_before=None, batch=7)
        assert done["bodies"] == 20
        assert s.get_message(ids[0]).raw is None
        assert s.get_message(keep).raw is not None
        done = s.prune("c", bodies_before=None, rows_before=time.time() + 1, batch=7)
        assert done["rows"] == 20
        assert s.get_message(ids[0]) is None and s.get_message(keep) is not None
    finally:
        s.close()


def test_conversion_warnings_are_stored_replaced_on_replay_and_pruned(store_url: str) -> None:
    """Issue #14: the warnings a message's conversion raised live in message_warnings, on both stores."""
    s = st.Store(store_url)
    try:
        with s.write() as conn:
            a, b = s.insert_messages(conn, [new(1), new(2)])
            s.insert_warnings(conn, [(a, "field_dropped", "PID-7: no such date; PID-7 was left out"),
                                     (a, "charset_fallback", "MSH-18: declared 8859/1, bytes UTF-8"),
                                     (b, "encounter_keyed_by_message", "PV1-19: no visit number")])  # fmt: skip
            s.insert_warnings(conn, [])  # a batch without warnings writes nothing
            s.finish_messages(conn, [(a, st.PROCESSED, ""), (b, st.PROCESSED, "")])
        assert s.warnings_of(a) == [
            ("field_dropped", "PID-7: no such date; PID-7 was left out"),
            ("charset_fallback", "MSH-18: declared 8859/1, bytes UTF-8"),
        ]
        # a replay runs the conversion again, which records its own warnings
        assert s.replay([(a, None)], who="tester", why="fixed", criteria={}) == 1
        assert s.warnings_of(a) == [] and len(s.warnings_of(b)) == 1
        with s.write() as conn:
            s.finish_messages(conn, [(a, st.PROCESSED, "")])
        assert s.prune("c", bodies_before=None, rows_before=time.time() + 1)["rows"] == 2
        assert s.warnings_of(b) == []
        with s.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(st.W)).scalar_one() == 0
    finally:
        s.close()


def test_prune_returns_disk_space_on_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "big.db"
    s = st.Store(f"sqlite:///{db}")
    try:
        with s.write() as conn:
            ids = []
            for k in range(10):
                rows = [new(k * 100 + i) for i in range(100)]
                for r in rows:
                    r.raw = r.raw + b"X" * 20_000
                ids += s.insert_messages(conn, rows)
            s.finish_messages(conn, [(mid, st.PROCESSED, "") for mid in ids])
        s._raw_sql("PRAGMA wal_checkpoint(TRUNCATE)")  # empty the WAL: the main file holds every page
        before = db.stat().st_size
        s.prune("c", bodies_before=time.time() + 1, rows_before=time.time() + 1, batch=200)
        s._raw_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        after = db.stat().st_size
        assert before > 15_000_000 and after < before / 4  # pages handed back to the file system
    finally:
        s.close()
