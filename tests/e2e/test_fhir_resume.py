"""Issue 13: a split FHIR delivery keeps its progress in the store, so after the engine is killed (SIGKILL)
part-way through, the restarted engine resumes at the first request not yet applied.

The full demo ADT^A01 (16 entries) goes to the Medplum test server as transactions of at most 4 entries (4
chunks) or as per-resource requests (17).  A proxy forwards the first requests and holds the next one
unanswered; the test kills the engine while it waits for that answer, restarts it on the same store, and
counts the requests that reach the proxy again: only those from the held one on.  Without the saved progress
the retry would send every chunk again (harmless, the writes are conditional, but not what was asked).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from engine import store as st
from tests.e2e.test_fhir_full_demo import adt
from tests.e2e.test_fhir_series import only, send_all, wait_delivered
from tests.support.engine import EngineProcess, fhir_channel, free_port, write_config
from tests.support.faultproxy import ThreadedFaultProxy
from tests.support.fhirserver import FhirServer
from tests.support.polling import wait_for

pytestmark = [pytest.mark.fhirserver, pytest.mark.slow]


@pytest.mark.parametrize(
    ("opts", "requests", "before_kill"),
    [
        ({"mode": "transaction", "max_transaction_entries": 4}, 4, 2),  # 16 entries: 4 chunks of 4
        ({"mode": "per-resource"}, 17, 9),  # 16 writes and the two-phase update of the cycle
    ],
    ids=["transaction-4", "per-resource"],
)
def test_killed_mid_delivery_resumes_at_the_next_request(
    tmp_path: Path, fhir_server: FhirServer, opts: dict[str, Any], requests: int, before_kill: int
) -> None:
    fhir_server.reset()
    port = free_port()
    db = tmp_path / "sluice.db"
    proxy = ThreadedFaultProxy(fhir_server.base_url).start_sync()
    try:
        dest = {
            "kind": "fhir",
            "base_url": proxy.url,
            "timeout": 120,  # the held request stays in flight until the kill
            "retry": {"max_attempts": 5, "backoff": 0.1},
            **opts,
        }
        cfg = write_config(
            tmp_path, channels={"clinic": fhir_channel(port, "fhir")}, destinations={"fhir": dest}
        )
        proxy.forward(times=before_kill)
        proxy.stall(times=1)  # the next request never gets an answer: the engine dies waiting for it
        eng = EngineProcess(cfg, port).start()
        try:
            send_all(port, [adt("A01", "R1")])
            wait_for(lambda: len(proxy.log) > before_kill, timeout=60, what=lambda: f"requests: {proxy.log}")
            eng.kill()  # SIGKILL
        finally:
            eng.kill()
        with sqlite3.connect(db) as conn:
            (saved,) = conn.execute("SELECT count(*) FROM delivery_progress").fetchone()
        assert saved == 1  # the progress after the last answered request, in the store
        proxy.clear()
        seen = len(proxy.log)
        with EngineProcess(cfg, port) as eng:
            wait_delivered(db, 1, timeout=60)
        after = [a for _, _, a in proxy.log[seen:]]
    finally:
        proxy.stop_sync()
    # The restarted engine sent the held request again and the ones after it, nothing applied before.
    assert len(after) == requests - before_kill, after
    assert all(a == "forward" for a in after), after
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT status, detail FROM deliveries").fetchall()
        (left,) = conn.execute("SELECT count(*) FROM delivery_progress").fetchone()
    assert len(rows) == 1 and rows[0][0] == st.DELIVERED, rows
    assert "resumed after a failure" in rows[0][1], rows
    assert left == 0  # forgotten once delivered: the detail keeps each request's outcome
    if opts["mode"] == "transaction":
        assert rows[0][1].count("transaction HTTP 200: 4 entries") == 4, rows  # every chunk's outcome
    patient = only(fhir_server, "Patient")
    encounter = only(fhir_server, "Encounter")
    assert encounter["subject"]["reference"] == f"Patient/{patient['id']}"
    (condition,) = fhir_server.search("Condition")
    assert condition["encounter"]["reference"] == f"Encounter/{encounter['id']}"
    assert len(fhir_server.search("AllergyIntolerance")) == 2
