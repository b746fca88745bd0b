"""The source side's queries: the newest stored version of each resource a ``fhir-poll`` channel took
(its deletions are stored as that version marked deleted).  The source cursors and the HTTP source's
idempotency answers are written by the sources themselves (engine/sources/) on the tables in
tables.py, in the transaction of their messages.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from engine.store.base import StoreBase
from engine.store.keys import SOURCE_RESOURCE_TAG, keyed
from engine.store.tables import SOURCE_RESOURCES, M


class SourceQueries(StoreBase):
    """The fhir-poll channel's newest stored version per resource."""

    def remember_resources(self, conn: Connection, channel: str, stored: Sequence[tuple[str, int]]) -> None:
        """(``Type/id``, message id) of versions a fhir-poll channel stored now: each becomes that
        resource's newest stored version (:class:`SourceResourceRow`); in the caller's transaction."""
        if not stored:
            return
        key = self.installation_key()
        newest = {keyed(key, SOURCE_RESOURCE_TAG, ref): mid for ref, mid in stored}
        T = SOURCE_RESOURCES
        have = {
            r[0]
            for r in conn.execute(
                select(T.c.key).where(T.c.channel == channel, T.c.key.in_(list(newest)))
            ).all()
        }
        now = time.time()
        for k, mid in newest.items():
            if k in have:
                conn.execute(
                    update(T)
                    .where(T.c.channel == channel, T.c.key == k)
                    .values(message_id=mid, updated_at=now)
                )
            else:
                conn.execute(insert(T).values(channel=channel, key=k, message_id=mid, updated_at=now))

    def last_resource_body(self, conn: Connection, channel: str, ref: str) -> bytes | None:
        """The stored body of the newest version of ``ref`` (``Type/id``) the channel took; ``None`` when it
        took none or retention dropped the body."""
        T = SOURCE_RESOURCES
        k = keyed(self.installation_key(), SOURCE_RESOURCE_TAG, ref)
        row = conn.execute(
            select(M.c.raw).join(T, T.c.message_id == M.c.id).where(T.c.channel == channel, T.c.key == k)
        ).first()
        return bytes(row[0]) if row is not None and row[0] is not None else None
