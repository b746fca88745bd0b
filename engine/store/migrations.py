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
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, literal, select, update
from sqlalchemy.exc import IntegrityError

from engine.store.keys import KEYED_PREFIX
from engine.store.tables import SETTINGS, Base, D, M, S

if TYPE_CHECKING:
    from engine.store.base import StoreBase as Store


KEYS_HASHED_SETTING = "plain_keys_hashed"  # set once every order and resource-state key is a keyed hash

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


def _plain(column: Any, prefix_at: Any = 1, keyed_length: Any = 34) -> Any:
    """SQL: ``column`` is not a keyed hash (``k:`` + 32 hex digits at ``prefix_at``, 1-based)."""
    return ~and_(
        func.substr(column, prefix_at, len(KEYED_PREFIX)) == literal(KEYED_PREFIX),
        func.length(column) == keyed_length,
    )


def hash_plain_keys(store: Store, batch: int = 2000) -> int:
    """Replace the plain order keys (messages and deliveries) and resource-state keys written before they
    were hashed, in short transactions (one executemany each); the number of rows changed.  Run at start
    before any worker, so every key of one patient is in the same form (ordering lanes and status guards
    compare keys).  A delivery's key is rebuilt from its message's (``channel|key``): exactly what a new
    one gets."""
    with store.engine.connect() as conn:
        if conn.execute(select(SETTINGS.c.value).where(SETTINGS.c.key == KEYS_HASHED_SETTING)).first():
            return 0
    done = 0
    rows: Sequence[Any]
    # deliveries first: their messages' keys are still the plain values they were made from
    after = 0
    while True:
        with store.write() as conn:
            rows = conn.execute(
                select(D.c.id, D.c.channel, M.c.order_key)
                .join(M, M.c.id == D.c.message_id)
                .where(
                    D.c.id > after,
                    D.c.order_key != D.c.channel + "|",
                    _plain(D.c.order_key, func.length(D.c.channel) + 2, func.length(D.c.channel) + 35),
                )
                .order_by(D.c.id)
                .limit(batch)
            ).all()
            if rows:
                store._executemany(
                    conn,
                    "UPDATE deliveries SET order_key = ? WHERE id = ?",
                    [[f"{r.channel}|{store.order_key(r.order_key)}", r.id] for r in rows],
                )
        done += len(rows)
        if len(rows) < batch:
            break
        after = rows[-1].id
    after = 0
    while True:
        with store.write() as conn:
            rows = conn.execute(
                select(M.c.id, M.c.order_key)
                .where(M.c.id > after, M.c.order_key != "", _plain(M.c.order_key))
                .order_by(M.c.id)
                .limit(batch)
            ).all()
            if rows:
                store._executemany(
                    conn,
                    "UPDATE messages SET order_key = ? WHERE id = ?",
                    [[store.order_key(r.order_key), r.id] for r in rows],
                )
        done += len(rows)
        if len(rows) < batch:
            break
        after = rows[-1].id
    while True:
        with store.write() as conn:
            rows = conn.execute(select(S).where(_plain(S.c.key)).limit(batch)).all()
            hashed = {r.key: store.state_key(r.key) for r in rows}
            known = {
                k: rank
                for k, rank in conn.execute(
                    select(S.c.key, S.c.rank).where(S.c.key.in_(list(hashed.values())))
                )
            }
            moves = [[hashed[r.key], r.key] for r in rows if hashed[r.key] not in known]
            if moves:
                store._executemany(conn, "UPDATE resource_state SET key = ? WHERE key = ?", moves)
            for r in rows:  # a node already wrote the hashed form: keep the higher rank
                if hashed[r.key] in known:
                    if r.rank > known[hashed[r.key]]:
                        conn.execute(
                            update(S)
                            .where(S.c.key == hashed[r.key])
                            .values(rank=r.rank, message_id=r.message_id, updated_at=r.updated_at)
                        )
                    conn.execute(S.delete().where(S.c.key == r.key))
        done += len(rows)
        if len(rows) < batch:
            break
    try:
        with store.write() as conn:
            conn.execute(SETTINGS.insert().values(key=KEYS_HASHED_SETTING, value="1"))
    except IntegrityError:  # another node finished first
        pass
    return done


DATA: Sequence[Step] = (Step("plain_keys_hashed", hash_plain_keys),)


def upgrade_data(store: Store) -> dict[str, int]:
    """Run :data:`DATA` in order: the rows each step changed, by step name (steps that changed none left out)."""
    changed = {}
    for step in DATA:
        n = step.run(store)
        if n:
            changed[step.name] = n
    return changed
