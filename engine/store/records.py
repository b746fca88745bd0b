"""The store's row types in and out of its queries: what intake inserts (:class:`NewMessage`,
:class:`NewDelivery`), what processing and delivery read (:class:`ClaimedRow`, :class:`PendingRow`,
:class:`LoadedDelivery`), a dedupe hit (:class:`Duplicate`), and the stored form of a payload."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from engine import keyring, payloads
from engine.store.tables import RECEIVED


@dataclass
class NewMessage:
    """One row to insert at intake."""

    channel: str
    received_at: float
    peer: str
    raw: bytes
    control_id: str = ""
    sending_app: str = ""
    sending_facility: str = ""
    message_type: str = ""
    trigger: str = ""
    version: str = ""
    patient_key: str = ""
    order_key: str = ""
    content_hash: str = ""
    dedupe_key: str = ""
    status: str = RECEIVED
    reason: str = ""
    ack: bytes | None = None
    ack_code: str = ""
    processed_at: float | None = None

    def row(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "received_at": self.received_at,
            "peer": self.peer,
            "raw": self.raw,
            "size": len(self.raw),
            "control_id": self.control_id,
            "sending_app": self.sending_app,
            "sending_facility": self.sending_facility,
            "message_type": self.message_type,
            "trigger": self.trigger,
            "version": self.version,
            "patient_key": self.patient_key,
            "order_key": self.order_key,
            "content_hash": self.content_hash,
            "dedupe_key": self.dedupe_key,
            "status": self.status,
            "reason": self.reason,
            "ack": self.ack,
            "ack_code": self.ack_code,
            "processed_at": self.processed_at,
        }


@dataclass
class NewDelivery:
    destination: str
    payload: bytes
    content_type: str
    meta: dict[str, str] = field(default_factory=dict)
    packed: bool = False  # payload is already in its stored form (stored_payload: packed, then sealed)


class PendingRow(NamedTuple):
    """A pending delivery as the delivery loop schedules it (no payload)."""

    id: int
    order_key: str
    next_attempt_at: float
    attempts: int
    lease_owner: str
    lease_until: float
    size: int = 0  # stored bytes of its payload and message (a delivery round stops at limits.batch_bytes)


def within_bytes(sizes: Sequence[int], max_bytes: int) -> int:
    """How many of the leading items fit in ``max_bytes`` together (at least one; 0 = no limit)."""
    if max_bytes <= 0:
        return len(sizes)
    total = 0
    for n, size in enumerate(sizes):
        total += size
        if total > max_bytes and n:
            return n
    return len(sizes)


class LoadedDelivery(NamedTuple):
    """A delivery with what the destination needs: its payload and the message's header fields."""

    id: int
    message_id: int
    channel: str
    destination: str
    payload: bytes | None
    content_type: str
    meta: str
    order_key: str
    attempts: int
    raw: bytes | None
    control_id: str
    message_type: str
    trigger: str
    received_at: float  # the message's: delivery lag is measured from it


class ClaimedRow(NamedTuple):
    """A received message as a processing worker reads it (the columns of Store._CLAIM_COLUMNS)."""

    id: int
    channel: str
    raw: bytes  # a received message always has its body (retention only touches finished ones)
    control_id: str
    message_type: str
    trigger: str
    order_key: str
    replay_destinations: str | None
    override_guards: bool


@dataclass(frozen=True)
class Duplicate:
    """An earlier message with the same dedupe key inside the window."""

    message_id: int
    content_hash: str
    ack: bytes | None


def stored_payload(keys: keyring.KeyRing | None, payload: bytes) -> bytes:
    """A destination payload's stored form: compressed when that pays (engine.payloads), then sealed.

    Worker processes call this (compressing and encrypting in parallel, off the engine's GIL);
    :meth:`Store.load_deliveries` opens the seal and the delivery worker unpacks.
    """
    return keyring.seal(keys, payloads.pack(payload), keyring.PAYLOAD)
