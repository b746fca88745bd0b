"""Crash safety with the FHIR destination: SIGKILL while sending, restart, resend what was not ACKed.

Every AA-acknowledged message ends up on the real FHIR server exactly once: one Patient per patient,
nothing left in flight, and the store passes its integrity check.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine import store as st
from tests.engine.test_engine_e2e import send_through_kills
from tests.support.engine import EngineProcess, fhir_channel, free_port, write_config
from tests.support.fhirserver import FhirServer

pytestmark = [pytest.mark.fhirserver, pytest.mark.slow]


def test_kill_9_with_fhir_destination_exactly_once(tmp_path: Path, fhir_server: FhirServer) -> None:
    fhir_server.reset()
    port = free_port()
    channel = fhir_channel(port, "fhir", order_by="PID-3.1")
    dest = {
        "kind": "fhir",
        "base_url": fhir_server.base_url,
        "lanes": 8,
        "retry": {"max_attempts": 50, "backoff": 0.2, "max_backoff": 1},
    }
    cfg = write_config(tmp_path, channels={"c": channel}, destinations={"fhir": dest})
    ids = [f"KF{i:04d}" for i in range(400)]  # each id is its own patient (MRN M<id>)
    per_conn = [ids[i::10] for i in range(10)]
    acked: set[str] = set()
    eng = EngineProcess(cfg, port).start()
    try:
        send_through_kills(eng, per_conn, acked, kills=3, seed=11, timeout=180)
        assert acked == set(ids)
        s = st.Store(f"sqlite:///{tmp_path}/sluice.db")
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                counts = s.delivery_counts()
                if counts.get(("fhir", st.DELIVERED), 0) >= len(ids) and not counts.get(("fhir", st.PENDING)):
                    break
                time.sleep(0.2)
            counts = s.delivery_counts()
            assert counts.get(("fhir", st.DELIVERED), 0) == len(ids), (
                counts,
                [d.reason for d in s.dead_letters()][:3],
            )
            assert not counts.get(("fhir", st.DEAD)) and not counts.get(("fhir", st.PENDING))
            assert sorted(r.control_id for r in s.list_messages(limit=10_000)) == sorted(ids)
            assert s.check() == "ok"
        finally:
            s.close()
    finally:
        eng.stop()
    patients = fhir_server.search("Patient")
    mrns = sorted(i["value"] for p in patients for i in p["identifier"] if i["value"].startswith("MKF"))
    assert mrns == sorted(f"M{c}" for c in ids)  # one Patient per message's patient: no duplicates
