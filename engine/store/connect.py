"""URL → SQLAlchemy engine: SQLite (WAL, ``synchronous=FULL``, a private file, ``BEGIN IMMEDIATE`` for
writers) or PostgreSQL (``postgresql+psycopg://...``, a pool per process).

:func:`open_engine` is what :class:`engine.store.Store` opens; the Sealed columns read the key ring from
the engine's dialect, so each store has its own.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine

from engine import keyring
from engine.errors import StoreError


def safe_url(url: str) -> str:
    """The URL with any password hidden, for logs and errors."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<store url>"


def open_failure(where: str, exc: BaseException) -> str:
    """What is wrong when the store cannot be opened, and what to do: the driver's own words (without
    SQLAlchemy's background link), with a hint for the usual causes."""
    lines = [x for x in str(getattr(exc, "orig", None) or exc).splitlines() if "sqlalche.me" not in x]
    text = " ".join(x.strip() for x in lines if x.strip())
    low = text.lower()
    if "refused" in low or "could not connect" in low or "could not translate host" in low:
        hint = "is the database server running there? Check the host and port of store: (or SLUICE_STORE)"
    elif "database" in low and "does not exist" in low:
        hint = "create the database (e.g. createdb NAME) or correct its name in store: (or SLUICE_STORE)"
    elif "password authentication failed" in low or "no password supplied" in low:
        hint = "give the password in PGPASSWORD or ~/.pgpass (never in routes.yaml)"
    else:
        hint = "check that the database exists and is writable"
    return f"cannot open the store {where}: {text}; {hint}"


def open_engine(url: str, keys: keyring.KeyRing | None) -> Engine:
    """The engine for ``url`` with the SQLite set-up (a new file 0600, pragmas, BEGIN) or PostgreSQL's pool."""
    is_sqlite = url.startswith("sqlite")
    # hide_parameters: a failed statement's error text (logged, stored as a reason) never quotes its
    # values, which may be message content.
    kwargs: dict[str, Any] = {"future": True, "hide_parameters": True}
    if is_sqlite:
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30, "isolation_level": None}
        if ":memory:" not in url:
            _private_sqlite_file(url.split("///", 1)[-1])
    else:
        kwargs["pool_size"] = 10
        kwargs["max_overflow"] = 10
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(url, **kwargs)
    except Exception as exc:  # bad URL, missing driver
        raise StoreError(f"cannot open store {safe_url(url)}: {exc}") from exc
    engine.dialect.sluice_keys = keys  # type: ignore[attr-defined]  # read by Sealed columns
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
        # SQLite via pysqlite: let SQLAlchemy emit BEGIN itself so transactions are real.
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def _private_sqlite_file(path: str) -> None:
    """Create a new SQLite database file 0600 in a directory created 0700, whatever the umask.

    SQLite gives its -wal and -shm files the database file's permissions, so they are private too.
    An existing file or directory keeps its mode (``sluice check`` warns when it is readable by others).
    """
    import os
    from pathlib import Path

    p = Path(path)
    if not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError:
        return  # unwritable here: SQLite itself reports it with the path
    os.close(fd)
    os.chmod(p, 0o600)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    # Writers take the write lock up front (no deadlocking lock upgrades); readers stay deferred.
    opts = conn.get_execution_options()
    if opts.get("sluice_write"):
        # FULL (fsync at commit) unless the caller says the write may be redone after a power loss.
        mode = "NORMAL" if opts.get("sluice_relaxed") else "FULL"
        dbapi = conn.connection.driver_connection
        cur = dbapi.cursor()  # type: ignore[union-attr]
        if conn.info.get("sluice_sync") != mode:
            cur.execute(f"PRAGMA synchronous={mode}")
            conn.info["sluice_sync"] = mode
        cur.execute("BEGIN IMMEDIATE")
        cur.close()
    else:
        conn.exec_driver_sql("BEGIN")
