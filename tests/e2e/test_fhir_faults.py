"""Issue 4, faults: engine (a real process, MLLP in) → fault-injecting proxy → the real FHIR server (Medplum).

* Transient faults (500, 429 + Retry-After, a stall longer than the destination timeout, a connection reset,
  and a response lost *after* the server committed the transaction) are retried with backoff; every message
  is delivered and the server holds exactly one Patient and one Encounter.
* A permanently rejected bundle (422 + OperationOutcome) is dead-lettered at once with the server's
  diagnostics as the reason; ``sluice dead-letter list`` shows it; after the fault is removed
  ``sluice replay --channel X --status dead`` delivers it, still without duplicates.
* One entry of a bundle rejected by the real server (no injected fault: the server already holds two
  resources the entry's conditional update matches): Medplum rejects the whole transaction with HTTP 400
  naming that entry, writes nothing of it, and the message is dead-lettered with the server's reason, then
  replayed once the duplicate is removed.  A transaction never comes back as a 2xx with a failed entry from
  Medplum; parsing such a response is unit-tested in tests/destinations/test_fhir_entry_errors.py (a real
  batch-response from Medplum, and an invented transaction-response).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from engine import store as st
from engine.cli import main
from tests.e2e.test_fhir_series import adt, only, send_all
from tests.support.engine import EngineProcess, fhir_channel, free_port, write_config
from tests.support.faultproxy import ThreadedFaultProxy
from tests.support.fhirserver import FhirServer
from tests.support.polling import wait_for

pytestmark = pytest.mark.fhirserver

CHANNEL = "clinic"
TIMEOUT = 1.0  # the destination's per-request timeout; the stall below lasts longer


class TimedLog(list[tuple[str, str, str]]):
    """The proxy's request log, plus when each request arrived (monotonic seconds)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, entry: tuple[str, str, str]) -> None:
        self.times.append(time.monotonic())
        super().append(entry)


class LossyProxy(ThreadedFaultProxy):
    """The fault proxy plus a fault it lacks: ``lose_responses`` forwards the request (the server commits
    it), then drops the connection instead of answering, so the engine cannot know it succeeded and must
    retry."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.timed = TimedLog()
        self.log = self.timed
        self.lose_responses = 0

    async def _forward(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        result = await super()._forward(method, path, headers, body)
        if self.lose_responses > 0:
            self.lose_responses -= 1
            self.log[-1] = (method, path, f"forwarded ({result[0]}), response lost")
            raise ConnectionResetError("test: response dropped after the upstream committed")
        return result


@pytest.fixture
def proxy(fhir_server: FhirServer) -> Any:
    fhir_server.reset()
    p = LossyProxy(fhir_server.base_url).start_sync()
    try:
        yield p
    finally:
        p.stop_sync()


def engine_via(
    tmp_path: Path, proxy: LossyProxy, channel_extra: dict[str, Any] | None = None, **dest_extra: Any
) -> tuple[EngineProcess, Path, Path]:
    port = free_port()
    channel = fhir_channel(port, "fhir", **(channel_extra or {}))
    dest = {
        "kind": "fhir",
        "base_url": proxy.url,
        "timeout": TIMEOUT,
        "retry": {"max_attempts": 8, "backoff": 0.2, "max_backoff": 1},
        **dest_extra,
    }
    cfg = write_config(tmp_path, channels={CHANNEL: channel}, destinations={"fhir": dest})
    return EngineProcess(cfg, port), cfg, tmp_path / "sluice.db"


def wait_settled(db: Path, n: int, timeout: float = 60) -> dict[tuple[str, str], int]:
    """Until ``n`` deliveries exist and none is pending; returns the delivery counts."""
    s = st.Store(f"sqlite:///{db}")
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = s.delivery_counts()
            done = counts.get(("fhir", st.DELIVERED), 0) + counts.get(("fhir", st.DEAD), 0)
            if done >= n and not counts.get(("fhir", st.PENDING)):
                return counts
            errors = s.list_messages(status=st.ERROR)
            assert not errors, f"processing errors: {[r.reason for r in errors]}"
            time.sleep(0.1)
        raise AssertionError(f"not settled in time: {s.delivery_counts()}")
    finally:
        s.close()


def deliveries(db: Path) -> list[Any]:
    s = st.Store(f"sqlite:///{db}")
    try:
        return [d for m in sorted(s.list_messages(), key=lambda m: m.id) for d in s.deliveries_of(m.id)]
    finally:
        s.close()


SERIES = [
    adt("A04", "F1", cls="O"),
    adt("A08", "F2", cls="O", addr="2 Changed Street"),
    adt("A01", "F3", cls="I", addr="2 Changed Street", admit="20250314090000"),
    adt("A03", "F4", cls="I", addr="2 Changed Street", admit="20250314090000", discharge="20250316110000"),
]


def test_transient_faults_retried_without_duplicates(
    tmp_path: Path, proxy: LossyProxy, fhir_server: FhirServer
) -> None:
    # on_failure: block (the default) keeps the series in order while the first message is retried.
    eng, _cfg, db = engine_via(tmp_path, proxy, on_failure="block")
    proxy.http_error(500, body=b'{"resourceType":"OperationOutcome","issue":[]}')
    proxy.http_error(429, retry_after=1)
    proxy.stall(seconds=TIMEOUT + 0.5)  # longer than the destination timeout
    proxy.reset()
    proxy.lose_responses = 1  # the next forwarded request is committed upstream but its answer is lost
    with eng:
        send_all(eng.port, SERIES)
        counts = wait_settled(db, len(SERIES))
    assert counts == {("fhir", st.DELIVERED): len(SERIES)}, counts

    actions = [a for _m, _p, a in proxy.log]
    assert actions[:5] == ["500", "429", "stall", "reset", "forwarded (200), response lost"], actions
    assert all(a == "forward" for a in actions[5:]) and len(actions) == 5 + len(SERIES), actions
    assert proxy.forwarded == 1 + len(SERIES)  # the A04 reached the server twice

    rows = deliveries(db)
    first = rows[0]
    assert first.status == st.DELIVERED and first.attempts == 6, first  # 5 faults, then success
    assert [d.attempts for d in rows[1:]] == [1, 1, 1]
    assert first.detail.startswith("transaction HTTP 200"), first.detail

    # backoff: each retry waited; the 429's Retry-After (1 s) was honoured, not the 0.2 s backoff
    gaps = [b - a for a, b in zip(proxy.timed.times, proxy.timed.times[1:], strict=False)]
    assert gaps[0] >= 0.15, gaps  # after the 500: backoff 0.2 s ± 20 % jitter
    assert gaps[1] >= 0.95, gaps  # after the 429: Retry-After: 1
    assert gaps[2] >= TIMEOUT * 0.9, gaps  # the stall lasted until the destination timed out

    # nothing duplicated although the A04 transaction was applied twice
    patient = only(fhir_server, "Patient")
    assert patient["address"][0]["line"] == ["2 Changed Street"]
    encounter = only(fhir_server, "Encounter")
    assert encounter["status"] == "finished"


def test_transient_faults_many_patients_default_policy(
    tmp_path: Path, proxy: LossyProxy, fhir_server: FhirServer
) -> None:
    """Independent patients (order_by PID-3.1: a lane each) under the default policy: each fault hits
    another message, a failing patient waits for its retry while the others go on; all get through."""
    eng, _cfg, db = engine_via(tmp_path, proxy, channel_extra={"order_by": "PID-3.1"})
    msgs = [
        adt("A04", f"P{i}", cls="O").replace("E2E100^", f"E2E2{i:02d}^").replace("V900^", f"V92{i:02d}^")
        for i in range(12)
    ]
    proxy.http_error(503, retry_after=1, times=2)
    proxy.http_error(502, times=2)
    proxy.reset(times=2)
    proxy.stall(times=1, seconds=TIMEOUT + 0.5)
    # 2xx that do not confirm the transaction: retried, never counted as delivered
    proxy.http_error(200, body=b'{"resourceType":"Bundle","type":"transaction-response","entry":[]}')
    proxy.http_error(200, body=b"<html>maintenance</html>", content_type="text/html")
    proxy.lose_responses = 2
    with eng:
        send_all(eng.port, msgs)
        counts = wait_settled(db, len(msgs))
    assert counts == {("fhir", st.DELIVERED): len(msgs)}, counts
    rows = deliveries(db)
    assert sum(d.attempts for d in rows) == len(msgs) + 11, [d.attempts for d in rows]  # one per fault
    srv = fhir_server
    patients = srv.search("Patient")
    assert len(patients) == len(msgs), f"{len(patients)} Patients for {len(msgs)} distinct MRNs"
    mrns = sorted(
        ident["value"] for p in patients for ident in p["identifier"] if ident["value"].startswith("E2E2")
    )
    assert mrns == sorted(f"E2E2{i:02d}" for i in range(12))
    assert len(srv.search("Encounter")) == len(msgs)


OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [
        {
            "severity": "error",
            "code": "business-rule",
            "diagnostics": "Synthetic rule EHR-7: encounter class must be enabled for this facility",
            "expression": ["Bundle.entry[1].resource.class"],
        }
    ],
}


def test_rejected_bundle_dead_letter_then_replay(
    tmp_path: Path, proxy: LossyProxy, fhir_server: FhirServer
) -> None:
    eng, cfg, db = engine_via(tmp_path, proxy)
    proxy.http_error(422, times=50, body=json.dumps(OUTCOME).encode())  # rejects whatever comes
    runner = CliRunner()
    with eng:
        send_all(eng.port, [SERIES[0]])
        counts = wait_settled(db, 1, timeout=20)
        assert counts == {("fhir", st.DEAD): 1}, counts
        (d,) = deliveries(db)
        assert d.attempts == 1, "a 422 is permanent: dead-lettered without retries"
        assert proxy.forwarded == 0
        assert "HTTP 422" in d.last_error and "fix the message or mapping, then replay" in d.last_error
        assert "Synthetic rule EHR-7: encounter class must be enabled" in d.last_error
        assert "(at Bundle.entry[1].resource.class)" in d.last_error

        listing = runner.invoke(main, ["dead-letter", "list", "--config", str(cfg), "--json"])
        assert listing.exit_code == 0, listing.output
        (entry,) = [json.loads(line) for line in listing.output.splitlines() if line.strip()]
        assert entry["channel"] == CHANNEL and entry["where"] == "fhir" and entry["control_id"] == "F1"
        assert "Synthetic rule EHR-7: encounter class must be enabled" in entry["reason"]
        assert "Fixture" not in listing.output and "E2E100" not in listing.output  # no PHI in the listing

        assert fhir_server.search("Patient") == []
        proxy.clear()  # the fault is removed
        rep = runner.invoke(
            main,
            [
                "replay",
                "--config",
                str(cfg),
                "--channel",
                CHANNEL,
                "--status",
                "dead",
                "--why",
                "EHR rule fixed",
            ],
        )
        assert rep.exit_code == 0 and "1 message(s) queued" in rep.output, rep.output
        counts = wait_settled(db, 1, timeout=20)
        # replay it a second time on purpose (an operator's double click): still one of each resource
        s = st.Store(f"sqlite:///{db}")
        try:
            deadline = time.monotonic() + 20
            while s.delivery_counts().get(("fhir", st.DELIVERED), 0) < 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert s.delivery_counts().get(("fhir", st.DELIVERED), 0) == 1, s.delivery_counts()
            assert not s.dead_letters()
            assert s.replays()[0].why == "EHR rule fixed"
            (m,) = s.list_messages()
            again = runner.invoke(
                main, ["replay", "--config", str(cfg), "--id", str(m.id), "--status", "processed"]
            )
            assert again.exit_code == 0, again.output
            deadline = time.monotonic() + 20
            while s.delivery_counts().get(("fhir", st.DELIVERED), 0) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert s.delivery_counts().get(("fhir", st.DELIVERED), 0) == 2, s.delivery_counts()
        finally:
            s.close()
    srv = fhir_server
    only(srv, "Patient")
    only(srv, "Encounter")
    assert proxy.forwarded == 2
    # the server's diagnostics go into the dead-letter reason, never into the logs; nor does PHI
    log = (tmp_path / "engine.log").read_text()
    assert "delivery_dead_lettered" in log
    assert "Synthetic rule EHR-7" not in log and "E2E100" not in log and "Fixture" not in log


def replay_dead(cfg: Path, why: str) -> None:
    rep = CliRunner().invoke(
        main, ["replay", "--config", str(cfg), "--channel", CHANNEL, "--status", "dead", "--why", why]
    )
    assert rep.exit_code == 0 and "1 message(s) queued" in rep.output, rep.output


IDENT = {
    "Patient": {"system": "urn:sluice:authority:NORTHCLINIC", "value": "E2E100"},  # PID-3 of SERIES
    "Encounter": {"system": "urn:sluice:authority:NORTHCLINIC", "value": "V900"},  # PV1-19 of SERIES
}
DUPLICATE = {  # what the EHR already holds twice: valid resources carrying the message's identifier
    "Patient": {"resourceType": "Patient", "name": [{"family": "Fixture"}]},
    "Encounter": {
        "resourceType": "Encounter",
        "status": "planned",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
    },
}


def converted(tmp_path: Path, cfg: Path, message: str) -> dict[str, Any]:
    """The bundle the channel hands the destination for ``message`` (``sluice convert``, same pipeline)."""
    src = tmp_path / "message.hl7"
    src.write_bytes(message.encode())
    res = CliRunner().invoke(main, ["convert", "--config", str(cfg), str(src)])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("{"))
    bundle: dict[str, Any] = json.loads(line)
    return bundle


@pytest.mark.parametrize(
    ("rtype", "server"), [("Patient", "validating"), ("Encounter", "validating"), ("Encounter", "stock")]
)
def test_real_server_rejects_one_entry_dead_letter_then_replay(
    tmp_path: Path, rtype: str, server: str, request: pytest.FixtureRequest
) -> None:
    """No injected fault: the EHR already holds two resources of type ``rtype`` with the message's
    identifier, so that one entry's conditional update is ambiguous.  Medplum rejects the entry and with it
    the whole transaction (HTTP 400, the entry's path in the OperationOutcome), writes none of the other,
    valid, entries, and the message is dead-lettered with the server's own diagnostics.  The operator
    merges the duplicate on the server and replays: one Patient, one Encounter, the surviving one kept.
    On the validating test server and on the stock router (MemoryRepository, no code of ours)."""
    srv: FhirServer = request.getfixturevalue(
        "fhir_server" if server == "validating" else "stock_fhir_server"
    )
    srv.reset()
    ids = [
        srv.request("POST", f"/{rtype}", {**DUPLICATE[rtype], "identifier": [IDENT[rtype]]})["id"]
        for _ in range(2)
    ]
    with LossyProxy(srv.base_url) as proxy:
        eng, cfg, db = engine_via(tmp_path, proxy)
        bundle = converted(tmp_path, cfg, SERIES[0])
        with eng:
            send_all(eng.port, [SERIES[0]])
            assert wait_settled(db, 1, timeout=20) == {("fhir", st.DEAD): 1}
            (d,) = deliveries(db)
            assert d.attempts == 1 and "HTTP 400" in d.last_error, d.last_error  # permanent: no retries
            assert "matched multiple resources" in d.last_error, d.last_error  # the server's own words
            where = re.search(r"\(at Bundle\.entry\[(\d+)\]\.request\.url\)", d.last_error)
            assert where, d.last_error
            rejected = bundle["entry"][int(where.group(1))]
            assert rejected["resource"]["resourceType"] == rtype  # the server named the ambiguous entry
            others = {e["resource"]["resourceType"] for e in bundle["entry"]} - {rtype}
            assert {"Patient", "Encounter", "Practitioner", "Location", "Provenance"} - {rtype} <= others
            listing = CliRunner().invoke(main, ["dead-letter", "list", "--config", str(cfg)])
            assert "matched multiple" in listing.output and "\tF1\t" in listing.output, listing.output
            # all-or-nothing: not one of the bundle's valid entries was written
            assert [r["id"] for r in srv.search(rtype)] == ids
            for other in sorted(others):
                assert srv.search(other) == [], f"{other} written by a rejected transaction"

            srv.request("DELETE", f"/{rtype}/{ids[1]}")  # the operator merges the duplicate
            replay_dead(cfg, f"duplicate {rtype} merged in the EHR")
            s = st.Store(f"sqlite:///{db}")
            try:
                wait_for(
                    lambda: s.delivery_counts().get(("fhir", st.DELIVERED)) == 1,
                    timeout=20,
                    what=lambda: f"the replay delivered: {s.delivery_counts()}",
                )
            finally:
                s.close()
        assert proxy.forwarded == 2  # the rejected transaction and the replay
    patient, encounter = only(srv, "Patient"), only(srv, "Encounter")
    assert (patient if rtype == "Patient" else encounter)["id"] == ids[0]
    assert encounter["subject"]["reference"] == f"Patient/{patient['id']}"
    assert patient["name"][0]["family"] == "Fixture"
    assert encounter["identifier"][0]["value"] == "V900"


def test_transient_fault_does_not_reorder_a_series_by_default(
    tmp_path: Path, proxy: LossyProxy, fhir_server: FhirServer
) -> None:
    eng, _cfg, db = engine_via(tmp_path, proxy)  # default on_failure
    proxy.http_error(500)  # one transient fault on the first request (the A04)
    with eng:
        send_all(eng.port, SERIES)
        assert wait_settled(db, len(SERIES)) == {("fhir", st.DELIVERED): len(SERIES)}
    patient = only(fhir_server, "Patient")
    encounter = only(fhir_server, "Encounter")
    assert (encounter["status"], patient["address"][0]["line"]) == ("finished", ["2 Changed Street"])
