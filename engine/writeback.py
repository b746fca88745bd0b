"""Write-back state: what a ``fhir-to-hl7`` channel last sent per resource, and the decision per message.

The step (transforms/fhir_to_v2) is pure: it hands over every message a resource may become.  Here,
inside the processing round's write transaction, the engine looks up what it last sent for the same
key, picks one with :func:`transforms.fhir_to_v2.outbound.decide` and records the choice: the key's row
in ``writeback_state`` and the message's row in ``writeback_log``.  A replay of a message repeats its
logged choice (it is not decided again against a state it changed itself).

Keys and digests are stored as HMAC-SHA256 with a per-installation key (``installation`` table, like
the patient search key): no placer id, MRN or content is in these tables (docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from engine.store import SETTINGS, WRITEBACK, WRITEBACK_LOG
from transforms.fhir_to_v2.outbound import ALREADY_CLOSED, NEVER_SENT, UNCHANGED, Outbound, Sent, decide

SECRET_SETTING = "writeback_hmac_key"

REASONS = {
    UNCHANGED: "nothing the HL7 message carries changed since the last message sent for this resource; "
    "nothing sent",
    NEVER_SENT: "cancelled, no-show or deleted before anything was sent for it: no cancel or delete message "
    "is sent for a resource the receiver never had (counted in sluice_writeback_skipped_total)",
    ALREADY_CLOSED: "already cancelled (or no-show) at the receiver; nothing sent",
}


@dataclass(frozen=True)
class Decision:
    message: str | None  # S12, A31, NW...; None: nothing is sent
    payload: bytes
    skipped: str = ""  # why nothing is sent (UNCHANGED, NEVER_SENT, ALREADY_CLOSED)

    @property
    def reason(self) -> str:
        return "write-back: " + REASONS.get(self.skipped, self.skipped)


def installation_secret(conn: Connection) -> tuple[bytes, bool]:
    """The per-installation HMAC key of the write-back tables, and whether it is committed already
    (``False``: made now, in this transaction, so not to be cached before it commits)."""
    row = conn.execute(select(SETTINGS.c.value).where(SETTINGS.c.key == SECRET_SETTING)).first()
    if row is not None:
        return bytes.fromhex(row[0]), True
    fresh = secrets.token_hex(32)
    conn.execute(insert(SETTINGS).values(key=SECRET_SETTING, value=fresh))
    return bytes.fromhex(fresh), False


def _keyed(secret: bytes, value: str) -> str:
    return hmac.new(secret, value.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:32]


def apply(
    conn: Connection, channel: str, message_id: int, facts: Mapping[str, Any], secret: bytes
) -> Decision:
    """Decide what message ``id`` sends (see the module doc) and record it; runs in the write transaction."""
    variants: Mapping[str, bytes] = facts.get("variants") or {}
    key = _keyed(secret, str(facts["key"]))
    logged = conn.execute(
        select(WRITEBACK_LOG.c.message, WRITEBACK_LOG.c.skipped).where(
            WRITEBACK_LOG.c.message_id == message_id
        )
    ).first()
    if logged is not None and (not logged.message or logged.message in variants):
        # a replay (or a redone round): the same choice as the first time
        if logged.message:
            return Decision(logged.message, variants[logged.message])
        return Decision(None, b"", logged.skipped)
    row = conn.execute(
        select(WRITEBACK).where(WRITEBACK.c.channel == channel, WRITEBACK.c.key == key)
    ).first()
    prev = Sent(row.state, row.content, row.timing, row.message) if row is not None else None
    out = Outbound(
        str(facts["resource_type"]),
        key,
        str(facts["state"]),
        _keyed(secret, str(facts["content"])),
        _keyed(secret, str(facts["timing"])),
        variants,
    )
    message, skipped = decide(out, prev)
    now = time.time()
    values = {"channel": channel, "key": key, "message": message or "", "skipped": skipped, "at": now}
    if logged is None:
        conn.execute(insert(WRITEBACK_LOG).values(message_id=message_id, **values))
    else:
        conn.execute(update(WRITEBACK_LOG).where(WRITEBACK_LOG.c.message_id == message_id).values(**values))
    if message is None:
        return Decision(None, b"", skipped)
    state = {
        "state": out.state,
        "content": out.content,
        "timing": out.timing,
        "message": message,
        "message_id": message_id,
        "updated_at": now,
    }
    if row is None:
        conn.execute(insert(WRITEBACK).values(channel=channel, key=key, **state))
    else:
        conn.execute(
            update(WRITEBACK).where(WRITEBACK.c.channel == channel, WRITEBACK.c.key == key).values(**state)
        )
    return Decision(message, variants[message])
