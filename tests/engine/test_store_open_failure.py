"""The store that cannot be opened says what is wrong and what to do (a real PostgreSQL, a closed port)."""

from __future__ import annotations

import pytest

from engine.errors import StoreError
from engine.store import Store
from tests.conftest import PG_ADMIN_URL


def test_a_database_that_does_not_exist_says_create_it(pg_url: str) -> None:
    # pg_url proves the server is up (and fails under CI when it is not); the name next to it does not exist
    missing = PG_ADMIN_URL.rsplit("/", 1)[0] + "/sluice_no_such_database_docs"
    with pytest.raises(StoreError) as ei:
        Store(missing)
    text = str(ei.value)
    assert (
        "cannot open the store" in text and 'database "sluice_no_such_database_docs" does not exist' in text
    )
    assert "create the database" in text and "sqlalche.me" not in text


def test_a_closed_port_says_check_the_server_host_and_port() -> None:
    with pytest.raises(StoreError) as ei:
        Store("postgresql+psycopg://postgres@127.0.0.1:1/nothing")
    text = str(ei.value)
    assert "refused" in text.lower() and "Check the host and port of store:" in text
