"""The intake queries: dedupe look-up, message/delivery/warning inserts and counters, in the committer's
write transaction (engine/intake.py).

The hot path: these statements use the DB-API cursor directly (no SQLAlchemy Core per message) and
stay methods of :class:`engine.store.Store` itself (a mixin, no delegate to look up per message).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from engine import keyring
from engine.store.base import StoreBase
from engine.store.records import Duplicate, NewDelivery, NewMessage, stored_payload
from engine.store.tables import PENDING, QUARANTINED, REJECTED, C, W


class IntakeQueries(StoreBase):
    """What the intake committer writes per batch (and the per-channel counters it bumps)."""

    def find_duplicates(
        self,
        conn: Connection,
        channel: str,
        keys: Sequence[str],
        since: float,
        control_ids: Sequence[str] | None = None,
    ) -> dict[str, Duplicate]:
        """The earliest non-quarantined message per dedupe key received since ``since``.

        ``control_ids``: the control ids (MSH-10) of those keys' messages.  With them the look-up seeks
        ``ix_messages_control_channel``; without them it reads every row of the channel (tests only).
        """
        if not keys:
            return {}
        uniq = list(dict.fromkeys(keys))
        p = "?" if self.is_sqlite else "%s"
        args: list[Any] = [channel, *uniq]
        by_cid = ""
        if control_ids is not None:
            cids = list(dict.fromkeys(control_ids))
            by_cid = f"control_id IN ({self._p(len(cids))}) AND "
            args = [*cids, *args]
        sql = (
            f"SELECT id, dedupe_key, content_hash, ack FROM messages WHERE {by_cid}channel = {p} "
            f"AND dedupe_key IN ({self._p(len(uniq))}) AND received_at >= {p} "
            f"AND status NOT IN ({p}, {p}) ORDER BY id"
        )
        cur = self._cursor(conn)
        try:
            cur.execute(sql, [*args, since, QUARANTINED, REJECTED])
            rows = cur.fetchall()
        finally:
            cur.close()
        out: dict[str, Duplicate] = {}
        for mid, key, chash, ack in rows:
            if key not in out:
                out[key] = Duplicate(
                    mid,
                    chash,
                    keyring.unseal(self.keys, bytes(ack), keyring.ACK) if ack is not None else None,
                )
        return out

    _MSG_COLS = (
        "channel", "received_at", "peer", "raw", "size", "control_id", "sending_app", "sending_facility",
        "message_type", "trigger", "version", "patient_key", "order_key", "content_hash", "dedupe_key",
        "status", "reason", "ack", "ack_code", "processed_at", "lease_owner", "lease_until", "override_guards",
    )  # fmt: skip

    def insert_messages(self, conn: Connection, rows: Sequence[NewMessage]) -> list[int]:
        if not rows:
            return []
        cols = self._MSG_COLS
        sql = f"INSERT INTO messages ({', '.join(cols)}) VALUES ({self._p(len(cols))}) RETURNING id"
        cur = self._cursor(conn)
        ids: list[int] = []
        keys = self.keys
        try:
            for r in rows:
                r.order_key = self.order_key(r.order_key)  # the caller's later add_deliveries uses it too
                d = r.row()
                d["lease_owner"], d["lease_until"], d["override_guards"] = "", 0.0, False
                d["raw"] = keyring.seal(keys, r.raw, keyring.RAW)
                if r.ack is not None:
                    d["ack"] = keyring.seal(keys, r.ack, keyring.ACK)
                cur.execute(sql, [d[c] for c in cols])
                ids.append(int(cur.fetchone()[0]))
        finally:
            cur.close()
        return ids

    def add_deliveries(
        self,
        conn: Connection,
        message_id: int,
        channel: str,
        order_key: str,
        deliveries: Iterable[NewDelivery],
    ) -> None:
        self.insert_deliveries(conn, self.delivery_rows(message_id, channel, order_key, deliveries))

    def delivery_rows(
        self, message_id: int, channel: str, order_key: str, deliveries: Iterable[NewDelivery]
    ) -> list[dict[str, Any]]:
        """Rows for :meth:`insert_deliveries` (batch them across messages: one statement).  ``order_key``:
        the message's, as stored (a plain one is hashed the same way)."""
        now = time.time()
        order_key = self.order_key(order_key)
        return [
            {
                "message_id": message_id,
                "channel": channel,
                "destination": d.destination,
                "payload": d.payload if d.packed else stored_payload(self.keys, d.payload),
                "content_type": d.content_type,
                "meta": json.dumps(d.meta),
                "order_key": f"{channel}|{order_key}",
                "status": PENDING,
                "attempts": 0,
                "created_at": now,
                "next_attempt_at": 0.0,
            }
            for d in deliveries
        ]

    _DLV_COLS = ("message_id", "channel", "destination", "payload", "content_type", "meta", "order_key",
                 "status", "attempts", "created_at", "next_attempt_at", "last_error", "detail",
                 "lease_owner", "lease_until")  # fmt: skip
    _DLV_DEFAULTS: ClassVar[dict[str, Any]] = {
        "last_error": "",
        "detail": "",
        "lease_owner": "",
        "lease_until": 0.0,
    }

    def insert_deliveries(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        cols = self._DLV_COLS
        sql = f"INSERT INTO deliveries ({', '.join(cols)}) VALUES ({self._p(len(cols))})"
        cur = self._cursor(conn)
        try:
            dflt = self._DLV_DEFAULTS
            cur.executemany(sql, [[r[c] if c in r else dflt[c] for c in cols] for r in rows])
        finally:
            cur.close()

    def insert_warnings(self, conn: Connection, rows: Sequence[tuple[int, str, str]]) -> None:
        """(message id, kind, text) rows, in one executemany statement (the processing result's batch)."""
        if not rows:
            return
        self._executemany(
            conn,
            "INSERT INTO message_warnings (message_id, kind, text) VALUES (?, ?, ?)",
            [[mid, kind[:100], text[:2000]] for mid, kind, text in rows],
        )

    def warnings_of(self, message_id: int) -> list[tuple[str, str]]:
        """A message's warnings as (kind, text), in the order the conversion raised them."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(W.c.kind, W.c.text).where(W.c.message_id == message_id).order_by(W.c.id)
            ).all()
        return [(r.kind, r.text) for r in rows]

    def bump(self, conn: Connection, channel: str, name: str, by: int = 1) -> None:
        """Add to a per-channel counter (e.g. duplicates prevented)."""
        res = conn.execute(
            update(C).where(C.c.channel == channel, C.c.name == name).values(value=C.c.value + by)
        )
        if res.rowcount == 0:
            conn.execute(insert(C).values(channel=channel, name=name, value=by))

    def counters(self, channel: str | None = None) -> dict[tuple[str, str], int]:
        with self.engine.connect() as conn:
            q = select(C)
            if channel:
                q = q.where(C.c.channel == channel)
            return {(r.channel, r.name): r.value for r in conn.execute(q)}
