"""Tokens, roles and the audit trail on a real store (SQLite and PostgreSQL), without a server."""

from __future__ import annotations

import sqlite3
import time

import pytest

from engine.admin import audit, operations, tokens
from engine.admin.roles import ADMIN, OPERATE, PHI, READ, Principal
from engine.store import Store

ROOT = Principal("root", "os", "admin", phi=True)


@pytest.mark.parametrize(
    ("role", "phi", "granted"),
    [
        ("viewer", False, {READ}),
        ("operator", False, {READ, OPERATE}),
        ("admin", False, {READ, OPERATE, ADMIN}),
        ("viewer", True, {READ, PHI}),
        (None, True, {PHI}),
    ],
)
def test_roles(role: str | None, phi: bool, granted: set[str]) -> None:
    who = Principal("x", "token", role, phi)
    assert {p for p in (READ, OPERATE, ADMIN, PHI) if who.can(p)} == granted


def test_create_verify_revoke(store_url: str) -> None:
    store = Store(store_url)
    secret = tokens.create(store, "ops", "operator", phi=True, by=ROOT, source="test")
    assert secret.startswith("slc_") and len(secret) > 40
    verifier = tokens.TokenVerifier(store, cache_s=0)
    assert verifier.verify(secret) == Principal("ops", "token", "operator", True)
    assert verifier.verify(secret + "x") is None
    assert verifier.verify("slc_" + "A" * 43) is None
    (info,) = tokens.listing(store)
    assert info.active and info.last_used_at is not None and info.created_by == "root"
    with pytest.raises(tokens.TokenExists, match="revoke it first"):
        tokens.create(store, "ops", "viewer", by=ROOT)
    tokens.revoke(store, "ops", by=ROOT)
    assert verifier.verify(secret) is None
    with pytest.raises(tokens.TokenError, match="no active token"):
        tokens.revoke(store, "ops", by=ROOT)
    actions = [(e.action, e.target, e.actor) for e in audit.entries(store)]
    assert actions == [("token.revoke", "token:ops", "root"), ("token.create", "token:ops", "root")]
    store.close()


def test_expiry_and_bad_input(tmp_path: object) -> None:
    store = Store(f"sqlite:///{tmp_path}/t.db")
    secret = tokens.create(store, "brief", "viewer", expires_in=60, by=ROOT)
    verifier = tokens.TokenVerifier(store)
    assert verifier.verify(secret) is not None
    assert verifier.verify(secret, now=time.time() + 61) is None  # a cached answer never outlives expiry
    with pytest.raises(tokens.TokenError, match="unknown role"):
        tokens.create(store, "x", "superuser", by=ROOT)
    with pytest.raises(tokens.TokenError, match="not allowed"):
        tokens.create(store, "has space", "viewer", by=ROOT)
    assert tokens.parse_duration("90d") == 90 * 86400
    assert tokens.parse_duration("12h") == 12 * 3600
    with pytest.raises(tokens.TokenError, match="90d"):
        tokens.parse_duration("soon")
    store.close()


def test_only_a_hash_of_the_secret_is_stored(tmp_path: object) -> None:
    path = f"{tmp_path}/t.db"
    store = Store(f"sqlite:///{path}")
    secret = tokens.create(store, "ops", "admin", by=ROOT)
    store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(FULL)")
        dump = "\n".join(conn.iterdump())
    assert secret not in dump and tokens.hash_secret(secret) in dump


def test_pause_is_idempotent_and_audited(store_url: str) -> None:
    store = Store(store_url)
    assert operations.set_paused(store, ROOT, "destination", "fhir", True, reason="maintenance")
    assert not operations.set_paused(store, ROOT, "destination", "fhir", True)
    assert ("destination", "fhir") in operations.paused(store)
    assert operations.set_paused(store, ROOT, "destination", "fhir", False)
    assert operations.paused(store) == {}
    assert [e.action for e in audit.entries(store)] == ["resume", "pause"]
    with pytest.raises(operations.OperationError, match="channel or destination"):
        operations.set_paused(store, ROOT, "listener", "x", True)
    store.close()


def test_when() -> None:
    now = 1_800_000_000.0
    assert operations.parse_when("2h", now=now) == now - 7200
    assert operations.parse_when("2026-11-23T08:00") == 1795420800.0
    assert operations.parse_when("2026-11-23T08:00+01:00") == 1795417200.0
    assert operations.parse_when(None) is None
    with pytest.raises(operations.OperationError, match="2h"):
        operations.parse_when("yesterday-ish")
    with pytest.raises(operations.OperationError, match="before the year 1"):
        operations.parse_when("174653661d")


def test_retention_never_prunes_the_audit_trail(tmp_path: object) -> None:
    from engine.store import PROCESSED, NewMessage

    store = Store(f"sqlite:///{tmp_path}/t.db")
    with store.write() as conn:
        (mid,) = store.insert_messages(
            conn,
            [NewMessage("c", time.time() - 90 * 86400, "p", b"MSH|x", status=PROCESSED, processed_at=1.0)],
        )
        audit.record(conn, ROOT, audit.PHI_VIEW, target=f"message:{mid}", at=time.time() - 90 * 86400)
    done = store.prune("c", bodies_before=time.time(), rows_before=time.time())
    assert done["rows"] == 1
    assert [e.target for e in audit.entries(store)] == [f"message:{mid}"]
    store.close()
