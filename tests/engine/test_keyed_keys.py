"""Order keys and resource-state keys are stored as keyed hashes (issue #12), on SQLite and PostgreSQL: lanes
and status guards work as with plain keys, across nodes and restarts, and a store written with plain keys
is converted at start without changing which rows share a key."""

from __future__ import annotations

import time

from sqlalchemy import select, text

from engine import store as st
from engine.store import migrations
from tests.engine.test_store import new

MRN = "MRN88231"  # synthetic
STATE = f"Patient?identifier=urn:oid:2.16.840.1.113883.19.5|{MRN}"


def keys_in(s: st.Store) -> tuple[list[str], list[str], list[str]]:
    with s.engine.connect() as conn:
        m = [r[0] for r in conn.execute(select(st.M.c.order_key).order_by(st.M.c.id))]
        d = [r[0] for r in conn.execute(select(st.D.c.order_key).order_by(st.D.c.id))]
        k = [r[0] for r in conn.execute(select(st.S.c.key).order_by(st.S.c.key))]
    return m, d, k


def test_keys_are_stored_hashed_and_work_as_plain_keys(store_url: str) -> None:
    s = st.Store(store_url)
    other = st.Store(store_url)  # a second node (PostgreSQL) or a restart (SQLite): same installation key
    try:
        with s.write() as conn:
            ids = s.insert_messages(conn, [new(1, key=MRN), new(2, key=MRN), new(3, key="MRN2"), new(4)])
            for mid in ids:
                s.add_deliveries(conn, mid, "c", MRN, [st.NewDelivery("out", b"{}", "application/json")])
            view = s.rank_view(conn)
            view.set(ids[0], {STATE: 2})
            view.flush()
            s.set_resource_ranks(conn, ids[1], {STATE + "0": 1})
        m, d, k = keys_in(s)
        assert m[0] == m[1] == s.order_key(MRN) == other.order_key(MRN) and st.is_keyed(m[0])
        assert m[2] != m[0] and st.is_keyed(m[2]) and m[3] == ""  # no order_by: no key, as before
        assert d == [f"c|{m[0]}"] * 4
        assert sorted(k) == sorted([s.state_key(STATE), s.state_key(STATE + "0")])
        joined = "".join(m + d + k)
        assert MRN not in joined and "Patient" not in joined
        # the pending rows of one key are one lane, whichever node claims them
        pending = other.pending_deliveries("out", 10)
        assert {p.order_key for p in pending} == {f"c|{m[0]}"}
        with other.write() as conn:
            assert other.resource_ranks(conn, [STATE, STATE + "0", "Patient?identifier=x|y"]) == {
                STATE: 2,
                STATE + "0": 1,
            }
            other.set_resource_ranks(conn, ids[2], {STATE: 3})  # a higher rank replaces it in place
            assert other.resource_ranks(conn, [STATE]) == {STATE: 3}
        # an already stored key passed back in (a worker's claimed row) is not hashed twice
        assert s.order_key(m[0]) == m[0]
    finally:
        s.close()
        other.close()


def test_plain_keys_of_an_older_store_are_hashed_at_start_keeping_the_lanes(store_url: str) -> None:
    s = st.Store(store_url)
    try:
        now = time.time()
        with s.write() as conn:  # rows as an older version wrote them: keys in clear
            for i, key in enumerate((MRN, MRN, "MRN2", "")):
                mid = conn.execute(
                    st.M.insert().values(
                        channel="c", received_at=now, status=st.RECEIVED, order_key=key, control_id=str(i)
                    )
                ).inserted_primary_key[0]
                conn.execute(
                    st.D.insert().values(
                        message_id=mid, channel="c", destination="out", order_key=f"c|{key}", created_at=now
                    )
                )
            conn.execute(st.S.insert().values(key=STATE, rank=2, message_id=1, updated_at=now))
            conn.execute(st.S.insert().values(key=STATE + "0", rank=1, message_id=2, updated_at=now))
            # another node already wrote the hashed form of one key, with a lower rank
            conn.execute(
                st.S.insert().values(key=s.state_key(STATE + "0"), rank=0, message_id=3, updated_at=now)
            )
        # deliveries and messages with a key, states
        assert migrations.hash_plain_keys(s, batch=2) == 3 + 3 + 2
        m, d, k = keys_in(s)
        assert m == [s.order_key(MRN), s.order_key(MRN), s.order_key("MRN2"), ""]
        assert d == [f"c|{key}" for key in m]  # what a new delivery of each message would get
        assert MRN not in "".join(m + d + k) and len(k) == 2
        with s.write() as conn:
            assert s.resource_ranks(conn, [STATE, STATE + "0"]) == {STATE: 2, STATE + "0": 1}
            # a new message of the same patient joins the converted lane
            (mid,) = s.insert_messages(conn, [new(9, key=MRN)])
            s.add_deliveries(
                conn, mid, "c", s.order_key(MRN), [st.NewDelivery("out", b"{}", "application/json")]
            )
        m2, d2, _ = keys_in(s)
        assert m2[-1] == m[0] and d2[-1] == d[0]
        # done once: later starts skip the scan
        with s.write() as conn:
            conn.execute(st.M.update().where(st.M.c.control_id == "3").values(order_key="plain-again"))
        assert migrations.hash_plain_keys(s) == 0
        with s.engine.connect() as conn:
            assert (
                conn.execute(text("SELECT order_key FROM messages WHERE control_id = '3'")).scalar()
                == "plain-again"
            )
    finally:
        s.close()
