"""Crash safety with the FHIR destination: SIGKILL while sending and delivering, restart, resend what was
not ACKed.

Every AA-acknowledged message is stored once, gets one delivery row, and its transaction reaches the real
FHIR server at least once; it reaches it twice only when an engine process was killed after sending it and
before recording that, and then from the next process.  Each engine process talks to the server through
its own counting proxy, so every transaction that reached the server is counted, per process.  Re-sent
transactions are idempotent: the server holds one Patient per message's patient.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import pytest

from engine import store as st
from tests.engine.test_engine_e2e import (
    check_deliveries_through_kills,
    delivery_rows,
    recorded_delivered,
    send_through_kills,
)
from tests.support.engine import EngineProcess, fhir_channel, free_port, write_config
from tests.support.faultproxy import ThreadedFaultProxy
from tests.support.fhirserver import FhirServer
from tests.support.polling import wait_for

pytestmark = [pytest.mark.fhirserver, pytest.mark.slow]


class CountingProxy(ThreadedFaultProxy):
    """Forwards everything to the server and counts each transaction that reached it by its patient's MRN."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.sent: collections.Counter[str] = collections.Counter()
        self.total = 0  # sum of the above, readable from the test's thread while this one counts

    async def _forward(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        result = await super()._forward(method, path, headers, body)  # forwarded: the server has it
        bundle = json.loads(body)
        (mrn,) = {
            i["value"]
            for e in bundle["entry"]
            if e["resource"]["resourceType"] == "Patient"
            for i in e["resource"]["identifier"]
            if i["value"].startswith("MKF")
        }
        self.sent[mrn[1:]] += 1  # the message's control id (MRN is "M" + control id)
        self.total += 1
        return result


def test_kill_9_with_fhir_destination_delivers_each_message(tmp_path: Path, fhir_server: FhirServer) -> None:
    fhir_server.reset()
    port = free_port()
    db = tmp_path / "sluice.db"
    proxies: list[CountingProxy] = []

    def configure(g: int) -> None:
        """Engine process ``g`` (0 = the first) delivers through a proxy of its own."""
        proxies.append(CountingProxy(fhir_server.base_url).start_sync())
        dest: dict[str, Any] = {
            "kind": "fhir",
            "base_url": proxies[g].url,
            "lanes": 8,
            "retry": {"max_attempts": 50, "backoff": 0.2, "max_backoff": 1},
        }
        channel = fhir_channel(port, "fhir", order_by="PID-3.1")
        write_config(tmp_path, channels={"c": channel}, destinations={"fhir": dest})

    recorded_at_kill: list[set[str]] = []

    def delivering(n: int) -> bool:  # the process about to be killed has sent a few dozen transactions
        return proxies[n - 1].total >= (40, 90, 20)[n - 1]

    def between(n: int) -> None:
        recorded_at_kill.append(recorded_delivered(db, "fhir"))
        configure(n)

    configure(0)
    ids = [f"KF{i:04d}" for i in range(400)]  # each id is its own patient (MRN M<id>)
    per_conn = [ids[i::10] for i in range(10)]
    acked: set[str] = set()
    eng = EngineProcess(tmp_path / "routes.yaml", port).start()
    try:
        send_through_kills(
            eng, per_conn, acked, kills=3, seed=11, timeout=180, kill_when=delivering, between=between
        )
        assert acked == set(ids)
        s = st.Store(f"sqlite:///{db}")
        try:
            wait_for(
                lambda: s.delivery_counts().get(("fhir", st.DELIVERED), 0) >= len(ids),
                timeout=120,
                what=lambda: (
                    f"all delivered: {s.delivery_counts()}, {[d.reason for d in s.dead_letters()][:3]}"
                ),
            )
            counts = s.delivery_counts()
            assert not counts.get(("fhir", st.DEAD)) and not counts.get(("fhir", st.PENDING)), counts
            assert sorted(r.control_id for r in s.list_messages(limit=10_000)) == sorted(ids)
            assert s.check() == "ok"
        finally:
            s.close()
    finally:
        eng.stop()
        for p in proxies:
            p.stop_sync()
    # one delivery row per message, delivered at the first recorded attempt (a retry would count here)
    by_row = delivery_rows(db)
    assert set(by_row) == {(c, "fhir") for c in ids}
    bad = {k: v for k, v in by_row.items() if v != [(st.DELIVERED, 1)]}
    assert not bad, list(bad.items())[:5]
    per_process = [p.sent for p in proxies]
    redelivered = check_deliveries_through_kills(ids, per_process, recorded_at_kill)
    patients = fhir_server.search("Patient")
    mrns = sorted(i["value"] for p in patients for i in p["identifier"] if i["value"].startswith("MKF"))
    assert mrns == sorted(f"M{c}" for c in ids)  # one Patient per message's patient, re-sends included
    print(
        f"\nkill -9 x3, 400 messages to FHIR: transactions per engine process "
        f"{[sum(c.values()) for c in per_process]}, {redelivered} sent again by the next process"
    )
