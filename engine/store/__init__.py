"""The durable store: SQLAlchemy 2 models and the queries the engine needs, SQLite (WAL) or PostgreSQL.

A package of nouns: ``tables`` (models, Sealed, Table aliases, statuses), ``records`` (row types),
``connect`` (URL -> engine), ``keys`` (keyed hashes), ``migrations`` (every start-time schema and data
change, in order), ``base`` (the handle: engine, transactions, cursor helpers) and one query mixin per
concern: ``intake``, ``processing``, ``deliveries``, ``replay``, ``overview``, ``sources``, ``retention``.
:class:`Store` is all of them; this module re-exports every public name (``from engine.store import ...``).

Times are stored as UNIX epoch seconds (float): portable, sortable, cheap.
"""

from __future__ import annotations

from engine.store.base import StoreBase
from engine.store.connect import (
    open_failure,
)
from engine.store.deliveries import DeliveryQueries
from engine.store.intake import IntakeQueries
from engine.store.keys import (
    KEYED_PREFIX,
    ORDER_TAG,
    PATIENT_KEY_SETTING,
    SOURCE_RESOURCE_TAG,
    STATE_TAG,
    is_keyed,
    keyed,
)
from engine.store.migrations import OBSOLETE_INDEXES
from engine.store.overview import OverviewQueries
from engine.store.processing import ProcessingQueries, RankView
from engine.store.records import (
    ClaimedRow,
    Duplicate,
    LoadedDelivery,
    NewDelivery,
    NewMessage,
    PendingRow,
    stored_payload,
    within_bytes,
)
from engine.store.replay import ReplayQueries
from engine.store.retention import RetentionQueries
from engine.store.sources import SourceQueries
from engine.store.tables import (
    AUDIT,
    CURSORS,
    DEAD,
    DELIVERED,
    ERROR,
    FILTERED,
    IDEMPOTENCY,
    IGNORED,
    MESSAGE_STATUSES,
    PAUSES,
    PENDING,
    PROCESSED,
    PROCESSING,
    PROGRESS,
    QUARANTINED,
    RECEIVED,
    REJECTED,
    REVIEW,
    SETTINGS,
    SOURCE_RESOURCES,
    SUPERSEDED,
    TOKENS,
    WRITEBACK,
    WRITEBACK_LOG,
    AuditRow,
    Base,
    C,
    CounterRow,
    D,
    DeliveryProgressRow,
    DeliveryRow,
    IdempotencyRow,
    M,
    MessageRow,
    PauseRow,
    R,
    ReplayRow,
    ResourceStateRow,
    S,
    Sealed,
    SettingRow,
    SourceCursorRow,
    SourceResourceRow,
    TokenRow,
    W,
    WarningRow,
    WritebackLogRow,
    WritebackStateRow,
)


class Store(
    IntakeQueries,
    ProcessingQueries,
    DeliveryQueries,
    ReplayQueries,
    OverviewQueries,
    SourceQueries,
    RetentionQueries,
):
    """The engine's view of the database: every query mixin over one :class:`StoreBase` (a method is found
    on the class as before, so the intake path pays no extra look-up)."""


__all__ = [
    "AUDIT",
    "CURSORS",
    "DEAD",
    "DELIVERED",
    "ERROR",
    "FILTERED",
    "IDEMPOTENCY",
    "IGNORED",
    "KEYED_PREFIX",
    "MESSAGE_STATUSES",
    "OBSOLETE_INDEXES",
    "ORDER_TAG",
    "PATIENT_KEY_SETTING",
    "PAUSES",
    "PENDING",
    "PROCESSED",
    "PROCESSING",
    "PROGRESS",
    "QUARANTINED",
    "RECEIVED",
    "REJECTED",
    "REVIEW",
    "SETTINGS",
    "SOURCE_RESOURCES",
    "SOURCE_RESOURCE_TAG",
    "STATE_TAG",
    "SUPERSEDED",
    "TOKENS",
    "WRITEBACK",
    "WRITEBACK_LOG",
    "AuditRow",
    "Base",
    "C",
    "ClaimedRow",
    "CounterRow",
    "D",
    "DeliveryProgressRow",
    "DeliveryRow",
    "Duplicate",
    "IdempotencyRow",
    "LoadedDelivery",
    "M",
    "MessageRow",
    "NewDelivery",
    "NewMessage",
    "PauseRow",
    "PendingRow",
    "R",
    "RankView",
    "ReplayRow",
    "ResourceStateRow",
    "S",
    "Sealed",
    "SettingRow",
    "SourceCursorRow",
    "SourceResourceRow",
    "Store",
    "StoreBase",
    "TokenRow",
    "W",
    "WarningRow",
    "WritebackLogRow",
    "WritebackStateRow",
    "is_keyed",
    "keyed",
    "open_failure",
    "stored_payload",
    "within_bytes",
]
