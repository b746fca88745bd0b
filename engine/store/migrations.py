"""Every start-time change to the store's schema and stored data, in one ordered list of named steps.

:data:`SCHEMA` runs each time a :class:`~engine.store.Store` opens with ``create=True`` (the engine, the
CLI, tests): a new SQLite file gets incremental auto-vacuum, tables and indexes added since the store was
made are created, indexes an earlier version had and a newer one replaces are dropped (only after their
replacement exists), and the installation key is made.  :data:`DATA` runs once at engine start, after
``recover`` and before any worker (engine/server.py): rows an older version wrote in an older form are
converted (plain order and resource-state keys become keyed hashes), each step marked done in the
``installation`` table so it never scans again.  Every step is idempotent, and safe when several nodes
on one PostgreSQL store start at once (``IF NOT EXISTS``/``checkfirst``; the loser of a race on a
``installation`` row ignores the IntegrityError).

This list is the seam where Alembic slots in when several active nodes on PostgreSQL arrive: each step
becomes a revision (the names below are their ids), ``SCHEMA`` is ``alembic upgrade head`` and ``DATA``
its data revisions.  Add a new schema or data change here, at the end, never anywhere else.
(The patient keys of stores from before the patient search was hashed are converted in the background
by ``engine.admin.search.rehash_legacy``, not here: it needs no step before the workers start.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.store.tables import Base

if TYPE_CHECKING:
    from engine.store import Store


# Indexes of earlier versions that ix_messages_control_channel replaces: dropped once it exists.
OBSOLETE_INDEXES = ("ix_messages_dedupe", "ix_messages_control_id", "ix_messages_control_dedupe")


@dataclass(frozen=True)
class Step:
    """One named start-time change; ``run`` is idempotent and returns how many rows it changed (or 0)."""

    name: str
    run: Callable[[Store], int]


def _incremental_vacuum(store: Store) -> int:
    if store.is_sqlite:
        # A new database gets incremental auto-vacuum so pruning returns disk space.  (The
        # setting needs a VACUUM once WAL mode has written the header; cheap while empty.)
        (exists,) = store._raw_sql("SELECT count(*) FROM sqlite_master WHERE name = 'messages'")
        if not exists:
            store._raw_sql("PRAGMA auto_vacuum=INCREMENTAL", "VACUUM")
    return 0


def _create_tables(store: Store) -> int:
    Base.metadata.create_all(store.engine)
    return 0


def _create_indexes(store: Store) -> int:
    for table in Base.metadata.sorted_tables:  # indexes added to a table since it was created
        for index in table.indexes:
            index.create(store.engine, checkfirst=True)
    return 0


def _drop_obsolete_indexes(store: Store) -> int:
    with store.engine.begin() as conn:  # replaced ones go only after their replacement exists
        for name in OBSOLETE_INDEXES:
            conn.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
    return 0


def _installation_key(store: Store) -> int:
    store.installation_key()  # made now, outside any transaction that hashes a key with it
    return 0


SCHEMA: Sequence[Step] = (
    Step("sqlite_incremental_vacuum", _incremental_vacuum),
    Step("create_tables", _create_tables),
    Step("create_indexes", _create_indexes),
    Step("drop_obsolete_indexes", _drop_obsolete_indexes),
    Step("installation_key", _installation_key),
)


def upgrade_schema(store: Store) -> None:
    """Run :data:`SCHEMA` in order (``Store.create_schema`` wraps a failure in a StoreError)."""
    for step in SCHEMA:
        step.run(store)
