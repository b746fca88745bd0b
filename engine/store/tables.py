"""The store's tables: SQLAlchemy 2 declarative models, the ``Sealed`` body column, the Core ``Table``
aliases the queries use (``M``, ``D``, ...) and the message and delivery status values.

Only declarations live here (no queries, no connection): every other module of ``engine.store`` and the
few outside it that write their own tables (tokens, audit, write-back state) read them from here.
Times are stored as UNIX epoch seconds (float): portable, sortable, cheap.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from engine import keyring


class Base(DeclarativeBase):
    pass


class Sealed(TypeDecorator[bytes]):
    """A body column (message raw and ACK, delivery payload): sealed with the store's key ring, if any.

    SQLAlchemy statements seal and open these values on their own; the ring is the engine's
    (``engine.dialect.sluice_keys``, set by :class:`Store`), so each store has its own.  The hot
    paths that use the DB-API cursor directly call :func:`engine.keyring.seal`/``unseal`` themselves.
    """

    impl = LargeBinary
    cache_ok = True

    def __init__(self, purpose: bytes):
        super().__init__()
        self.purpose = purpose

    def process_bind_param(self, value: bytes | None, dialect: Any) -> bytes | None:
        if value is None:
            return None
        return keyring.seal(getattr(dialect, "sluice_keys", None), bytes(value), self.purpose)

    def process_result_value(self, value: Any, dialect: Any) -> bytes | None:
        if value is None:
            return None
        return keyring.unseal(getattr(dialect, "sluice_keys", None), bytes(value), self.purpose)


class MessageRow(Base):
    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(100))
    received_at: Mapped[float] = mapped_column(Float)
    peer: Mapped[str] = mapped_column(String(100), default="")
    raw: Mapped[bytes | None] = mapped_column(Sealed(keyring.RAW), nullable=True)
    size: Mapped[int] = mapped_column(Integer, default=0)
    control_id: Mapped[str] = mapped_column(String(200), default="")
    sending_app: Mapped[str] = mapped_column(String(200), default="")
    sending_facility: Mapped[str] = mapped_column(String(200), default="")
    message_type: Mapped[str] = mapped_column(String(10), default="")
    trigger: Mapped[str] = mapped_column(String(10), default="")
    version: Mapped[str] = mapped_column(String(20), default="")
    patient_key: Mapped[str] = mapped_column(String(300), default="")
    order_key: Mapped[str] = mapped_column(String(300), default="")
    content_hash: Mapped[str] = mapped_column(String(64), default="")
    dedupe_key: Mapped[str] = mapped_column(String(700), default="")
    status: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str] = mapped_column(Text, default="")
    ack: Mapped[bytes | None] = mapped_column(Sealed(keyring.ACK), nullable=True)
    ack_code: Mapped[str] = mapped_column(String(4), default="")
    lease_owner: Mapped[str] = mapped_column(String(100), default="")
    lease_until: Mapped[float] = mapped_column(Float, default=0.0)
    processed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    replay_destinations: Mapped[str | None] = mapped_column(Text, nullable=True)
    override_guards: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (
        Index("ix_messages_channel_status_id", "channel", "status", "id"),
        Index("ix_messages_received", "received_at"),
        # One index serves the dedupe look-up at intake (control id and channel, then the key from the row:
        # find_duplicates) and the admin search by control id (engine/admin/search.py).  Control ids are
        # spread over it (each sender has its own), so a group commit writes about a page of it per
        # message: two such indexes (ix_messages_dedupe and ix_messages_control_id, ea29115) wrote ~30 %
        # more bytes per message than 815026c, and (control_id, channel, dedupe_key) still ~20 %; this one
        # writes what the dedupe index alone did (bench/README.md, "Intake before and after session 4").
        Index("ix_messages_control_channel", "control_id", "channel"),
        # admin search by the keyed patient hash
        Index("ix_messages_patient", "patient_key"),
    )


class DeliveryRow(Base):
    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(String(100))
    destination: Mapped[str] = mapped_column(String(100))
    payload: Mapped[bytes | None] = mapped_column(Sealed(keyring.PAYLOAD), nullable=True)
    content_type: Mapped[str] = mapped_column(String(100), default="")
    meta: Mapped[str] = mapped_column(Text, default="{}")
    order_key: Mapped[str] = mapped_column(String(300), default="")
    status: Mapped[str] = mapped_column(String(20), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    detail: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    next_attempt_at: Mapped[float] = mapped_column(Float, default=0.0)
    delivered_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Several nodes on one PostgreSQL store: a node leases the rows it is delivering.
    lease_owner: Mapped[str] = mapped_column(String(100), default="")
    lease_until: Mapped[float] = mapped_column(Float, default=0.0)

    __table_args__ = (
        Index("ix_deliveries_dest_status_id", "destination", "status", "id"),
        Index("ix_deliveries_message", "message_id"),
        # Only the pending rows (a small index however long the history): queue depth and the oldest
        # pending age per destination for every metrics scrape, read from the index alone (SQLite
        # before 3.42 needs the status column in the index to treat it as covering).
        Index(
            "ix_deliveries_pending",
            "destination",
            "status",
            "created_at",
            sqlite_where=text("status = 'pending'"),
            postgresql_where=text("status = 'pending'"),
        ),
    )


class DeliveryProgressRow(Base):
    """How far a multi-request delivery got (a split FHIR transaction: chunks applied, ids the server gave),
    so a retry, also after an engine crash, resends only what is not applied yet.  Only kinds with
    ``keeps_progress`` write it; the row goes when its delivery is delivered or dead-lettered."""

    __tablename__ = "delivery_progress"

    delivery_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(Text)  # JSON, the destination's own (no PHI)
    updated_at: Mapped[float] = mapped_column(Float)


class WarningRow(Base):
    """A located, PHI-free warning a channel's conversion raised for a message (what it dropped or changed
    instead of rejecting the message): the field's location and what was done, never a value.  Written with
    the message's processing result; a replay replaces them; retention removes them with their message."""

    __tablename__ = "message_warnings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(100))  # e.g. encounter_end_before_start, field_dropped
    text: Mapped[str] = mapped_column(Text)  # "PV1-45: discharge date/time is before ..."

    __table_args__ = (Index("ix_message_warnings_message", "message_id"),)


class ReplayRow(Base):
    __tablename__ = "replays"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float)
    who: Mapped[str] = mapped_column(String(200))
    why: Mapped[str] = mapped_column(Text, default="")
    selection: Mapped[str] = mapped_column(Text)
    message_ids: Mapped[str] = mapped_column(Text)
    count: Mapped[int] = mapped_column(Integer)


class CounterRow(Base):
    __tablename__ = "counters"

    channel: Mapped[str] = mapped_column(String(100), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[int] = mapped_column(Integer, default=0)


class ResourceStateRow(Base):
    """Highest status rank applied per FHIR business key (so a lower status never overwrites a higher one)."""

    __tablename__ = "resource_state"

    key: Mapped[str] = mapped_column(String(500), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer)
    message_id: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[float] = mapped_column(Float)


class WritebackStateRow(Base):
    """What a write-back channel (``fhir-to-hl7``) last sent per resource key (engine/writeback.py).

    The key and the digests are keyed hashes (HMAC with the installation key): no identifier or
    content is stored in the clear (docs/security.md)."""

    __tablename__ = "writeback_state"

    channel: Mapped[str] = mapped_column(String(100), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(20))  # active | cancelled | noshow | deleted
    content: Mapped[str] = mapped_column(String(64))
    timing: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(String(10))  # S12, A31, NW... last sent
    message_id: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[float] = mapped_column(Float)


class WritebackLogRow(Base):
    """The write-back decision per stored message (a replay repeats it, it does not decide again)."""

    __tablename__ = "writeback_log"

    message_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel: Mapped[str] = mapped_column(String(100))
    key: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(String(10), default="")  # what was sent; empty: nothing
    skipped: Mapped[str] = mapped_column(String(40), default="")  # why nothing was sent
    at: Mapped[float] = mapped_column(Float)


class SourceCursorRow(Base):
    """Where an incremental source (``kind: fhir-poll``) is: the newest ``meta.lastUpdated`` committed per
    channel and resource type (engine/sources/fhir_poll.py).  Written with the page's messages."""

    __tablename__ = "source_cursors"

    channel: Mapped[str] = mapped_column(String(100), primary_key=True)
    resource: Mapped[str] = mapped_column(String(64), primary_key=True)
    cursor: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[float] = mapped_column(Float)


class SourceResourceRow(Base):
    """The newest stored version of each resource a ``fhir-poll`` channel took (its message id), keyed by a
    keyed hash of ``Type/id``: a deletion read from the server's history is stored as that version marked
    deleted (engine/sources/history.py).  Written with the page's messages."""

    __tablename__ = "source_resources"

    channel: Mapped[str] = mapped_column(String(100), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    message_id: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[float] = mapped_column(Float)

    # retention drops a row with its message (the body a tombstone would be built from is gone)
    __table_args__ = (Index("ix_source_resources_message", "message_id"),)


class IdempotencyRow(Base):
    """An HTTP source's answer per ``Idempotency-Key`` (SHA-256 of the key): a retried request gets it
    again and creates nothing (engine/sources/http.py).  Written in the transaction of the messages."""

    __tablename__ = "http_requests"

    channel: Mapped[str] = mapped_column(String(100), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[int] = mapped_column(Integer)
    body: Mapped[str] = mapped_column(Text)
    at: Mapped[float] = mapped_column(Float)


class AuditRow(Base):
    """Who did what, when, to which message or setting (PHI views, replays, pauses, token changes).

    Never pruned by message retention: the audit trail outlives the bodies it refers to.
    """

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float)
    actor: Mapped[str] = mapped_column(String(200))  # token name, OIDC subject or OS user
    actor_kind: Mapped[str] = mapped_column(String(20))  # token | oidc | os
    action: Mapped[str] = mapped_column(String(50))  # phi.view, replay, pause, resume, token.create ...
    target: Mapped[str] = mapped_column(String(300), default="")  # message:12, channel:adt, token:ops
    reason: Mapped[str] = mapped_column(Text, default="")
    detail: Mapped[str] = mapped_column(Text, default="{}")  # JSON, never PHI
    source: Mapped[str] = mapped_column(String(100), default="")  # api from 127.0.0.1, cli, engine

    __table_args__ = (
        Index("ix_audit_at", "at"),
        Index("ix_audit_action_id", "action", "id"),
        Index("ix_audit_target", "target"),
    )


class TokenRow(Base):
    """An admin API token: only a hash of the secret is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    phi: Mapped[bool] = mapped_column(Boolean, default=False)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(200), default="")
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_used_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class PauseRow(Base):
    """A paused channel (processing holds) or destination (delivery holds); shared by every node."""

    __tablename__ = "pauses"

    kind: Mapped[str] = mapped_column(String(20), primary_key=True)  # channel | destination
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    at: Mapped[float] = mapped_column(Float)
    who: Mapped[str] = mapped_column(String(200), default="")


class SettingRow(Base):
    """Per-installation values every node shares (e.g. the patient-search HMAC key)."""

    __tablename__ = "installation"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


M = cast(Table, MessageRow.__table__)
D = cast(Table, DeliveryRow.__table__)
R = cast(Table, ReplayRow.__table__)
W = cast(Table, WarningRow.__table__)
C = cast(Table, CounterRow.__table__)
S = cast(Table, ResourceStateRow.__table__)
PROGRESS = cast(Table, DeliveryProgressRow.__table__)
AUDIT = cast(Table, AuditRow.__table__)
TOKENS = cast(Table, TokenRow.__table__)
PAUSES = cast(Table, PauseRow.__table__)
SETTINGS = cast(Table, SettingRow.__table__)
WRITEBACK = cast(Table, WritebackStateRow.__table__)
WRITEBACK_LOG = cast(Table, WritebackLogRow.__table__)
CURSORS = cast(Table, SourceCursorRow.__table__)
SOURCE_RESOURCES = cast(Table, SourceResourceRow.__table__)
IDEMPOTENCY = cast(Table, IdempotencyRow.__table__)

# Message statuses
RECEIVED = "received"  # stored, waiting for a processing worker
PROCESSING = "processing"
PROCESSED = "processed"  # deliveries created
FILTERED = "filtered"
ERROR = "error"  # processing failed: a message-level dead letter
REVIEW = "review"  # held for manual review (e.g. a lower status after a higher one)
REJECTED = "rejected"  # AR at intake, kept for audit
QUARANTINED = "quarantined"  # bad content at intake (charset, garbage, duplicate id with other content)
IGNORED = "ignored"  # inbound ACKs and other messages never processed
MESSAGE_STATUSES = (RECEIVED, PROCESSING, PROCESSED, FILTERED, ERROR, REVIEW, REJECTED, QUARANTINED, IGNORED)

# Delivery statuses
PENDING = "pending"
DELIVERED = "delivered"
DEAD = "dead"
SUPERSEDED = "superseded"  # replaced by a replay
