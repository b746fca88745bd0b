"""Shared fixtures: store URLs for SQLite and the real PostgreSQL, and the engine as a real process."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

# Re-exported for the test modules that import them from here; the definition is tests/support/ci.py.
from tests.support.ci import IN_CI, service_unavailable

__all__ = ["IN_CI", "service_unavailable"]

# Every engine a test starts serves the admin API (on by default, 127.0.0.1:8080): on any free port
# here, so engines never fight over 8080.  A test that talks to the API passes its own port.
os.environ.setdefault("SLUICE_ADMIN_PORT", "0")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """A command run in-process (``sluice convert``/``sluice test`` through click's runner) configures structlog
    for its own output (level warning); put back what the test started with, so a later test's info lines are
    not filtered away by an earlier test's command (seen: test_alerts's capture_logs got one line of two)."""
    import structlog

    from engine import logs

    saved = structlog.get_config()
    current, debug = logs._current, logs.DEBUG
    try:
        yield
    finally:
        structlog.configure(**saved)
        logs._current, logs.DEBUG = current, debug


PG_ADMIN_URL = os.environ.get("SLUICE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"sluice_t_{uuid.uuid4().hex[:10]}"
    try:
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        service_unavailable(f"PostgreSQL at 127.0.0.1:5432 unavailable: {type(exc).__name__}: {exc}")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(
                text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: object) -> str:
    """Run a store test on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    return str(request.getfixturevalue("pg_url"))
