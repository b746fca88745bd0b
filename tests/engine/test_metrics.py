"""Prometheus metrics (engine/metrics.py) from a real engine: MLLP over real sockets, a real store, worker
processes converting, real destinations (a file directory, an HTTP peer, the Medplum FHIR server).

The engine runs in this process (``Server`` on an event loop in a thread) so the test reads
``server.metrics.render()`` directly, parsed with prometheus_client's own parser; the admin app's
``GET /metrics`` serves the same bytes.  Also here: the rejection classifier, the scrape-time store query
uses its index on SQLite and PostgreSQL, and every metric the Grafana dashboard and the alert rules use is
in the live output.
"""

from __future__ import annotations

import asyncio
import errno
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from engine import config as cfgmod
from engine.client import MLLPClient, parse_ack
from engine.destinations.fhir import mark_multiple_match
from engine.destinations.http import status_category, status_error, transport_error
from engine.destinations.mllp import nack_category
from engine.errors import REJECTION_CLASSES, DeliveryError, PermanentDeliveryError
from engine.metrics import CONTENT_TYPE, Metrics, rejection_class
from engine.server import Server
from engine.store import Store
from tests.support.engine import basic_channel, fhir_channel, free_port, write_config

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "sluice.json"
RULES = ROOT / "deploy" / "prometheus" / "sluice-alerts.yml"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- an engine in this process ---------------------------------------------------------------------
class LocalEngine:
    """``Server`` started on its own event loop in a thread; ``samples()`` parses ``metrics.render()``."""

    def __init__(self, routes: Path):
        data = yaml.safe_load(routes.read_text())
        data["admin"] = {"enabled": False}  # this test reads Metrics.render() itself
        routes.write_text(yaml.safe_dump(data, sort_keys=False))
        self.config = cfgmod.load(routes)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True)
        self.server: Server | None = None

    def _call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> LocalEngine:
        self.thread.start()

        async def start() -> Server:
            server = Server(self.config)
            await server.start()
            return server

        self.server = self._call(start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.server is not None:
                self.loop.call_soon_threadsafe(self.server.should_exit.set)  # as on SIGTERM
                self._call(self.server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.listeners[0].port

    def render(self) -> tuple[bytes, str]:
        assert self.server is not None
        return self.server.metrics.render()

    def samples(self) -> Samples:
        return parse(self.render()[0])

    def wait(self, what: str, pred: Callable[[Samples], bool], timeout: float = 30.0) -> Samples:
        deadline = time.monotonic() + timeout
        while True:
            s = self.samples()
            if pred(s):
                return s
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}; metrics now:\n{self.render()[0].decode()}"
                )
            time.sleep(0.05)


def parse(body: bytes) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def v(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; a missing series fails (it must exist, pre-bound, even at 0)."""
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"no sample {name}{labels}"
    return samples[key]


def adt(control: str, mrn: str = "MRN1", trigger: str = "A08") -> bytes:
    return (
        f"MSH|^~\\&|EHR|NORTH|SL|HOSP|20250101120000||ADT^{trigger}^ADT_A01|{control}|P|2.5.1\r"
        f"PID|1||{mrn}^^^NORTH^MR||Testpatient^Alex||19800101|F\r"
        "PV1|1|O\r"
    ).encode()


def merge(control: str) -> bytes:
    """A40: MRN2 absorbs MRN-NEVER-SEEN, a patient the engine never received."""
    return (
        f"MSH|^~\\&|EHR|NORTH|SL|HOSP|20250101120000||ADT^A40^ADT_A39|{control}|P|2.5.1\r"
        "EVN|A40|20250101120000\r"
        "PID|1||MRN2^^^NORTH^MR||Testpatient^Sam||19800101|F\r"
        "MRG|MRN-NEVER-SEEN^^^NORTH^MR\r"
    ).encode()


def send_all(port: int, messages: list[bytes], *, hold: Callable[[], None] | None = None) -> list[str]:
    """Send over one MLLP connection; MSA-1 of each ACK.  ``hold`` runs while the connection is open."""

    async def go() -> list[str]:
        codes = []
        async with MLLPClient("127.0.0.1", port) as client:
            for m in messages:
                codes.append(parse_ack(await client.send(m)).code)
            if hold is not None:
                await asyncio.to_thread(hold)
        return codes

    return asyncio.run(go())


def file_dest(directory: Path, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "file",
        "directory": str(directory),
        "pattern": "{control_id}.{ext}",
        "fsync": False,
        **extra,
    }


# -- counters and histograms move ------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 0], ids=["worker-process", "in-engine"])
def test_intake_processing_delivery_counted(tmp_path: Path, store_url: str, workers: int) -> None:
    ch = basic_channel(0, require=["PID-3"])
    cfg = write_config(
        tmp_path,
        channels={"c": ch},
        destinations={"out": file_dest(tmp_path / "out")},
        store=store_url,
        processing={"workers": workers},
    )
    no_pid3 = b"MSH|^~\\&|EHR|NORTH|SL|HOSP|20250101120000||ADT^A08^ADT_A01|E1|P|2.5.1\rPID|1\r"
    unsupported = b"MSH|^~\\&|EHR|NORTH|SL|HOSP|20250101120000||ZZZ^Z01|R1|P|2.5.1\r"
    with LocalEngine(cfg) as eng:
        before = eng.samples()
        assert v(before, "sluice_messages_received_total", channel="c") == 0
        assert v(before, "sluice_queue_depth", destination="out") == 0
        connected: list[float] = []
        codes = send_all(
            eng.port,
            [*(adt(f"C{i}") for i in range(5)), adt("C0"), unsupported, no_pid3],
            hold=lambda: connected.append(v(eng.samples(), "sluice_connections", channel="c")),
        )
        assert codes == ["AA"] * 6 + ["AR", "AE"]
        assert connected == [1]
        s = eng.wait(
            "five deliveries",
            lambda s: v(s, "sluice_deliveries_total", destination="out", outcome="delivered") == 5,
        )
        assert v(s, "sluice_messages_received_total", channel="c") == 8
        assert v(s, "sluice_acks_total", channel="c", code="AA") == 6
        assert v(s, "sluice_acks_total", channel="c", code="AR") == 1
        assert v(s, "sluice_acks_total", channel="c", code="AE") == 1
        assert v(s, "sluice_ack_latency_seconds_count", channel="c") == 8
        assert v(s, "sluice_ack_latency_seconds_bucket", channel="c", le="+Inf") == 8
        assert v(s, "sluice_ack_latency_seconds_sum", channel="c") > 0
        assert v(s, "sluice_duplicates_prevented_total", channel="c") == 1
        assert v(s, "sluice_messages_processed_total", channel="c", status="processed") == 5
        assert v(s, "sluice_messages_processed_total", channel="c", status="rejected") == 1
        assert v(s, "sluice_messages_processed_total", channel="c", status="error") == 1
        assert v(s, "sluice_delivery_lag_seconds_count", destination="out") == 5
        assert v(s, "sluice_delivery_lag_seconds_sum", destination="out") > 0
        assert v(s, "sluice_deliveries_total", destination="out", outcome="dead") == 0
        assert v(s, "sluice_queue_depth", destination="out") == 0
        assert v(s, "sluice_oldest_pending_age_seconds", destination="out") == 0
        assert v(s, "sluice_destination_up", destination="out") == 1
        assert v(s, "sluice_store_up") == 1
        assert v(s, "sluice_connections_accepted_total", channel="c") == 1
        # the connection is gone once the client closed it
        eng.wait("the connection closed", lambda s: v(s, "sluice_connections", channel="c") == 0)
        # nothing is counted twice on a later scrape (scrape-time families are recomputed, counters kept)
        again = eng.samples()
        assert v(again, "sluice_messages_processed_total", channel="c", status="processed") == 5
        assert v(again, "sluice_deliveries_total", destination="out", outcome="delivered") == 5
        ctype = eng.render()[1]
        assert ctype == CONTENT_TYPE and ctype.startswith("text/plain; version=0.0.4")


@pytest.fixture
def peer() -> Iterator[str]:
    """An HTTP receiver on 127.0.0.1 answering by the message's control id prefix (X-Sluice-Control-Id)."""
    replies = {"V": 422, "T": 429, "A": 401, "S": 500, "K": 200}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status = replies.get((self.headers.get("X-Sluice-Control-Id") or "?")[0], 200)
            body = b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"processing"}]}'
            self.send_response(status)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_rejections_by_class_and_dead_letters(tmp_path: Path, peer: str) -> None:
    dest = {
        "kind": "http",
        "url": peer,
        "payload": "hl7",
        "timeout": 5,
        "retry": {"max_attempts": 2, "backoff": 0.05, "max_backoff": 0.1},
    }
    cfg = write_config(
        tmp_path,
        channels={"c": basic_channel(0, routes=[{"destination": "hook"}])},
        destinations={"hook": dest},
        processing={"workers": 0},
    )
    with LocalEngine(cfg) as eng:
        send_all(eng.port, [adt("V1"), adt("T1"), adt("A1"), adt("S1"), adt("K1")])
        s = eng.wait(
            "every message settled",
            lambda s: (
                v(s, "sluice_deliveries_total", destination="hook", outcome="dead")
                + v(s, "sluice_deliveries_total", destination="hook", outcome="delivered")
                == 5
            ),
        )
        # 422 → validation (permanent); 429 → throttling and 500 → server, each tried twice; 401 → auth
        assert v(s, "sluice_rejections_total", channel="c", **{"class": "validation"}) == 1
        assert v(s, "sluice_rejections_total", channel="c", **{"class": "throttling"}) == 2
        assert v(s, "sluice_rejections_total", channel="c", **{"class": "server"}) == 2
        assert v(s, "sluice_rejections_total", channel="c", **{"class": "auth"}) == 1
        assert v(s, "sluice_rejections_total", channel="c", **{"class": "network"}) == 0
        assert v(s, "sluice_rejections_total", channel="c", **{"class": "conflict"}) == 0
        assert v(s, "sluice_deliveries_total", destination="hook", outcome="retry") == 2
        assert v(s, "sluice_deliveries_total", destination="hook", outcome="dead") == 4
        assert v(s, "sluice_deliveries_total", destination="hook", outcome="delivered") == 1
        assert v(s, "sluice_dead_letters_total", destination="hook") == 4
        assert v(s, "sluice_delivery_lag_seconds_count", destination="hook") == 1
        assert v(s, "sluice_queue_depth", destination="hook") == 0
        assert v(s, "sluice_destination_up", destination="hook") == 1  # K1 went through last


def test_destination_down_queue_depth_and_age(tmp_path: Path) -> None:
    dead_port = free_port()  # nothing listens here: connection refused
    dest = {
        "kind": "http",
        "url": f"http://127.0.0.1:{dead_port}/hook",
        "timeout": 2,
        "retry": {"max_attempts": 1000, "backoff": 0.05, "max_backoff": 0.2},
    }
    cfg = write_config(
        tmp_path,
        channels={"c": basic_channel(0, routes=[{"destination": "hook"}])},
        destinations={"hook": dest},
        processing={"workers": 0},
    )
    with LocalEngine(cfg) as eng:
        assert v(eng.samples(), "sluice_destination_up", destination="hook") == 1
        send_all(eng.port, [adt("D1"), adt("D2")])
        s = eng.wait(
            "a network rejection",
            lambda s: v(s, "sluice_rejections_total", channel="c", **{"class": "network"}) >= 2,
        )
        assert v(s, "sluice_destination_up", destination="hook") == 0
        assert v(s, "sluice_queue_depth", destination="hook") == 2
        assert v(s, "sluice_deliveries_total", destination="hook", outcome="retry") >= 2
        assert v(s, "sluice_deliveries_total", destination="hook", outcome="delivered") == 0
        first = v(s, "sluice_oldest_pending_age_seconds", destination="hook")
        time.sleep(0.3)
        later = v(eng.samples(), "sluice_oldest_pending_age_seconds", destination="hook")
        assert 0 < first < later


@pytest.mark.parametrize("ack", ["on-commit", "after-processing"])
def test_patient_match_failure_unknown_prior_patient(tmp_path: Path, ack: str) -> None:
    ch = fhir_channel(0, "out", ack=ack)
    cfg = write_config(
        tmp_path,
        channels={"c": ch},
        destinations={"out": file_dest(tmp_path / "out")},
        processing={"workers": 1},
    )
    with LocalEngine(cfg) as eng:
        codes = send_all(eng.port, [adt("P1", mrn="MRN2", trigger="A01"), merge("M1")])
        # after-processing answers the merge itself: AE 204; on-commit accepted it before processing
        assert codes == ["AA", "AE" if ack == "after-processing" else "AA"]
        s = eng.wait(
            "the merge recorded as an error",
            lambda s: v(s, "sluice_messages_processed_total", channel="c", status="error") == 1,
        )
        assert v(s, "sluice_patient_match_failures_total", channel="c") == 1
        assert v(s, "sluice_messages_processed_total", channel="c", status="processed") == 1


@pytest.mark.fhirserver
@pytest.mark.parametrize("mode", ["transaction", "per-resource"])
def test_patient_match_failure_fhir_multiple_matches(tmp_path: Path, mode: str) -> None:
    from tests.conftest import service_unavailable
    from tests.support.fhirserver import FhirServer, FhirServerUnavailable

    srv = FhirServer()
    try:
        srv.start()
    except FhirServerUnavailable as exc:
        service_unavailable(f"FHIR test server unavailable: {exc}")
    try:
        twin = {
            "resourceType": "Patient",
            "identifier": [{"system": "urn:sluice:authority:NORTH", "value": "MRN-TWIN"}],
        }
        srv.request("POST", "/Patient", twin)
        srv.request("POST", "/Patient", twin)  # two Patients with one MRN: no conditional write can pick
        dest = {"kind": "fhir", "base_url": srv.base_url, "mode": mode, "retry": {"max_attempts": 1}}
        cfg = write_config(
            tmp_path,
            channels={"c": fhir_channel(0, "fhir")},
            destinations={"fhir": dest},
            processing={"workers": 1},
        )
        with LocalEngine(cfg) as eng:
            send_all(eng.port, [adt("F1", mrn="MRN-TWIN")])
            s = eng.wait(
                "the delivery dead-lettered",
                lambda s: v(s, "sluice_dead_letters_total", destination="fhir") == 1,
            )
            assert v(s, "sluice_patient_match_failures_total", channel="c") == 1
            assert v(s, "sluice_rejections_total", channel="c", **{"class": "conflict"}) == 1
    finally:
        srv.stop()


# -- the dashboard and the alert rules use only metrics that exist ------------------------------------
_METRIC = re.compile(r"\bsluice_[a-z_]+\b")


def dashboard_names() -> set[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, val in node.items():
                if k in ("expr", "query", "definition") and isinstance(val, str):
                    exprs.append(val)
                else:
                    walk(val)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(board)
    assert exprs, "the dashboard has no queries"
    return {m for e in exprs for m in _METRIC.findall(e)}


def rule_names() -> set[str]:
    rules = yaml.safe_load(RULES.read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert exprs, "no alert rules"
    return {m for e in exprs for m in _METRIC.findall(e)}


def test_dashboard_and_alert_rules_use_live_metric_names(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path, channels={"c": basic_channel(0)}, destinations={"out": file_dest(tmp_path / "o")}
    )
    with LocalEngine(cfg) as eng:
        live = {name for name, _ in eng.samples()}
    used = dashboard_names() | rule_names()
    missing = sorted(used - live)
    assert not missing, f"used by deploy/ but not exported: {missing}"
    # and the families the issue asks for are all there
    for name in (
        "sluice_messages_received_total",
        "sluice_acks_total",
        "sluice_ack_latency_seconds_bucket",
        "sluice_messages_processed_total",
        "sluice_deliveries_total",
        "sluice_delivery_lag_seconds_bucket",
        "sluice_queue_depth",
        "sluice_oldest_pending_age_seconds",
        "sluice_duplicates_prevented_total",
        "sluice_patient_match_failures_total",
        "sluice_rejections_total",
        "sluice_dead_letters_total",
        "sluice_connections",
    ):
        assert name in live, name


def test_alert_rules_file_is_valid() -> None:
    rules = yaml.safe_load(RULES.read_text())
    names: set[str] = set()
    records: set[str] = set()
    for group in rules["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert rule["expr"].strip()
            if "record" in rule:
                assert set(rule) <= {"record", "expr", "labels"}, rule
                records.add(rule["record"])
                continue
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule
            assert rule["alert"] not in names
            names.add(rule["alert"])
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            # a recording rule an alert uses is defined in this file
            for used in re.findall(r"\bsluice:[a-z_]+", rule["expr"]):
                assert used in records, used
    assert {
        "SluiceMessageErrorRate",
        "SluiceQueueDepthHigh",
        "SluiceDeliveryLagHigh",
        "SluiceDestinationDown",
        "SluiceChannelSilent",
    } <= names
    promtool = shutil.which("promtool")
    if promtool is not None:  # Debian's prometheus package ships it; the YAML checks above run regardless
        res = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        # the rules' own unit tests: clinic hours, error rate, destination down, queue depth
        res = subprocess.run(
            [promtool, "test", "rules", RULES.with_name("sluice-alerts.test.yml").name],
            cwd=RULES.parent,
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stdout + res.stderr


def test_dashboard_is_importable() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["title"] and board["uid"] and board["panels"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for p in board["panels"]:
        if p["type"] != "row":
            assert p["targets"], p["title"]
            assert p["datasource"]["uid"] == "${datasource}", p["title"]


def test_every_metric_is_documented() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    section = doc[doc.index("\n## Metrics") :]

    class Stats:
        connections = accepted_total = refused_total = evicted_total = framing_errors = 0

    class FakeListener:
        channel_name = "c"
        stats = Stats()

    class FakeStore:
        def pending_summary(self) -> dict[str, tuple[int, float]]:
            return {}

    class FakeCommitter:
        backlog = 0

    m = Metrics(channels=["c"], destinations=["d"])
    m.watch_store(FakeStore())  # type: ignore[arg-type]
    m.watch_listener(FakeListener())
    m.watch_committer(FakeCommitter())
    names = {f.name + ("_total" if f.type == "counter" else "") for f in m.registry.collect()}
    assert len(names) >= 19
    missing = sorted(n for n in names if f"`{n}`" not in section)
    assert not missing, f"document these in the Metrics section of docs/operations.md: {missing}"


# -- the scrape-time query reads an index --------------------------------------------------------------
def test_pending_summary_uses_the_partial_index(store_url: str) -> None:
    store = Store(store_url)
    try:
        with store.engine.connect() as conn:
            if store.is_sqlite:
                plan = " ".join(
                    str(r[-1])
                    for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + store.PENDING_SUMMARY_SQL)
                )
                assert "USING COVERING INDEX ix_deliveries_pending" in plan, plan
            else:
                conn.exec_driver_sql(
                    "SET enable_seqscan = off"
                )  # an empty table: make the planner show its hand
                plan = " ".join(
                    str(r[0]) for r in conn.exec_driver_sql("EXPLAIN " + store.PENDING_SUMMARY_SQL)
                )
                assert "Index Only Scan using ix_deliveries_pending" in plan, plan
        assert store.pending_summary() == {}
    finally:
        store.close()


def test_pending_index_added_to_an_existing_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    store = Store(url)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_deliveries_pending")  # a store made before the index existed
    store.close()
    store = Store(url)
    try:
        with store.engine.connect() as conn:
            names = {
                r[0] for r in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'index'")
            }
        assert "ix_deliveries_pending" in names
    finally:
        store.close()


# -- units ----------------------------------------------------------------------------------------------
def test_several_engines_in_one_process_keep_apart() -> None:
    a, b = Metrics(channels=["x"]), Metrics(channels=["x"])
    a.channel("x").received.inc(3)
    assert v(parse(a.render()[0]), "sluice_messages_received_total", channel="x") == 3
    assert v(parse(b.render()[0]), "sluice_messages_received_total", channel="x") == 0


def test_unknown_ack_code_and_status_still_counted() -> None:
    m = Metrics()
    cm = m.channel("c")
    cm.ack("ZZ")
    cm.ack("")
    cm.processed("weird")
    s = parse(m.render()[0])
    assert v(s, "sluice_acks_total", channel="c", code="ZZ") == 1
    assert v(s, "sluice_acks_total", channel="c", code="none") == 1
    assert v(s, "sluice_messages_processed_total", channel="c", status="weird") == 1


def test_store_down_at_scrape_is_reported_not_raised() -> None:
    class Broken:
        def pending_summary(self) -> dict[str, tuple[int, float]]:
            raise OSError("database is locked")

    m = Metrics(destinations=["d"])
    m.watch_store(Broken())  # type: ignore[arg-type]
    s = parse(m.render()[0])
    assert v(s, "sluice_store_up") == 0
    assert not any(name == "sluice_queue_depth" for name, _ in s)


@pytest.mark.parametrize(
    ("status", "klass"),
    [
        (400, "validation"),
        (422, "validation"),
        (404, "validation"),
        (401, "auth"),
        (403, "auth"),
        (429, "throttling"),
        (503, "throttling"),
        (500, "server"),
        (502, "server"),
        (504, "server"),
        (409, "conflict"),
        (412, "conflict"),
        (408, "network"),
        (302, "server"),
    ],
)
def test_http_status_classes(status: int, klass: str) -> None:
    assert status_category(status) == klass
    err = status_error(status, "reason", what="dest POST")
    assert err.category == klass
    assert rejection_class(err) == klass


def test_rejection_classifier() -> None:
    request = httpx.Request("POST", "http://127.0.0.1:9/x")
    # what the destinations raise say so themselves
    assert (
        rejection_class(transport_error(httpx.ConnectError("refused", request=request), what="d"))
        == "network"
    )
    assert rejection_class(transport_error(httpx.ReadTimeout("slow", request=request), what="d")) == "network"
    assert rejection_class(DeliveryError("x", category="auth")) == "auth"
    # without a category: the classifier
    assert rejection_class(ConnectionRefusedError(errno.ECONNREFUSED, "refused")) == "network"
    assert rejection_class(TimeoutError()) == "network"
    assert rejection_class(OSError(errno.ENETUNREACH, "unreachable")) == "network"
    assert rejection_class(PermissionError(errno.EACCES, "denied")) == "auth"
    assert rejection_class(OSError(errno.ENOSPC, "full")) == "server"
    assert rejection_class(httpx.ConnectError("refused", request=request)) == "network"
    resp = httpx.Response(429, request=request)
    assert rejection_class(httpx.HTTPStatusError("busy", request=request, response=resp)) == "throttling"
    assert rejection_class(DeliveryError("plugin: try later")) == "server"  # retryable, no category
    assert rejection_class(PermanentDeliveryError("plugin: refused")) == "validation"
    assert rejection_class(ValueError("bad payload")) == "validation"
    assert rejection_class(RuntimeError("bug")) == "server"
    for c in REJECTION_CLASSES:
        assert rejection_class(DeliveryError("x", category=c)) == c
    with pytest.raises(ValueError, match="unknown rejection category"):
        DeliveryError("x", category="bogus")


def test_file_destination_errors_classified(tmp_path: Path) -> None:
    from engine.destinations.file import FileDestination

    assert FileDestination._error("p", PermissionError(errno.EACCES, "denied")).category == "auth"
    assert FileDestination._error("p", OSError(errno.ENOSPC, "full")).category == "server"


@pytest.mark.parametrize(
    ("code", "err", "text", "klass"),
    [
        ("AE", "101", "required field missing", "validation"),
        ("CE", "", "", "validation"),
        ("AR", "200", "unsupported message type", "validation"),
        ("AR", "207", "internal error", "server"),
        ("AR", "", "", "server"),
        ("CR", "", "", "server"),
        ("AR", "206", "record locked", "conflict"),
        ("AR", "", "System busy, try again later", "throttling"),
        ("AE", "", "receiver overloaded", "throttling"),
    ],
)
def test_mllp_nack_classes(code: str, err: str, text: str, klass: str) -> None:
    assert nack_category(code, err, text) == klass


def test_fhir_multiple_matches_marked() -> None:
    entries = [
        {
            "resource": {"resourceType": "Patient"},
            "request": {"method": "PUT", "url": "Patient?identifier=a|1"},
        },
        {
            "resource": {"resourceType": "Encounter"},
            "request": {"method": "PUT", "url": "Encounter?identifier=a|2"},
        },
    ]
    # Medplum transaction pre-check (400), pointing at the entry
    e = status_error(
        400,
        "error invalid: Conditional PUT matched multiple resources (at Bundle.entry[1].request.url)",
        what="d transaction",
    )
    assert mark_multiple_match(e, entries=entries).match_failure == "Encounter"
    assert e.category == "conflict"
    # FHIR issue code multiple-matches (412) on a per-resource request
    e = status_error(412, "error multiple-matches: Multiple resources found matching condition", what="d")
    assert mark_multiple_match(e, resource_type="Patient").match_failure == "Patient"
    # HAPI-style text naming the match URL
    e = status_error(
        412, 'Failed to UPDATE: match URL "Patient?identifier=a|1" matched 2 resources', what="d"
    )
    assert mark_multiple_match(e).match_failure == "Patient"
    # a plain version conflict is left alone
    e = status_error(412, "error conflict: version mismatch", what="d")
    assert mark_multiple_match(e, resource_type="Patient").match_failure is None
    assert e.category == "conflict"


def test_tallies_expose_what_prometheus_client_would() -> None:
    """The per-message tallies (plain ints, read at scrape: ACKs and their latency, messages processed,
    deliveries and their lag) render exactly as prometheus-client's own Counter and Histogram do for the
    same updates: names, HELP, labels, bucket bounds (a value on a bound counts in that bucket), sample
    order."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from engine.metrics import ACK_LATENCY_BUCKETS, DELIVERY_LAG_BUCKETS, OUTCOMES, STATUSES

    values = (0.0, 0.0001, 0.0005, 0.001, 0.003, 0.25, 1.0, 2.5, 10.0, 11.0)
    m = Metrics(channels=["a"])
    ref = CollectorRegistry()
    lat = Histogram(
        "sluice_ack_latency_seconds",
        "Time from a complete MLLP frame received to its ACK written to the connection.",
        ["channel"],
        buckets=ACK_LATENCY_BUCKETS,
        registry=ref,
    )
    acks = Counter(
        "sluice_acks",
        "Acknowledgements written back to senders, by MSA-1 code.",
        ["channel", "code"],
        registry=ref,
    )
    processed = Counter(
        "sluice_messages_processed",
        "Messages that reached a final status: at intake (rejected, quarantined, error, ignored) or "
        "by processing (processed, filtered, error, review).",
        ["channel", "status"],
        registry=ref,
    )
    deliveries = Counter(
        "sluice_deliveries",
        "Delivery attempts by outcome: delivered, retry (failed, tried again later), dead (dead-lettered).",
        ["destination", "outcome"],
        registry=ref,
    )
    lag = Histogram(
        "sluice_delivery_lag_seconds",
        "Time from the message received to its delivery confirmed by the destination (the sync lag).",
        ["destination"],
        buckets=DELIVERY_LAG_BUCKETS,
        registry=ref,
    )
    for ch in ("a", "b"):
        cm = m.channel(ch)
        for code in ("AA", "AE", "AR", "CA", "CE", "CR"):
            acks.labels(ch, code)
        for status in STATUSES:
            processed.labels(ch, status)
        for x in values:
            cm.ack_latency.observe(x)
            lat.labels(ch).observe(x)
        for code in ("AA", "AA", "ZZ", ""):
            cm.ack(code)
            acks.labels(ch, code or "none").inc()
        for status, n in (("processed", 3), ("weird", 1), ("error", 2), ("processed", 1)):
            cm.processed(status, n)
            processed.labels(ch, status).inc(n)
    for d in ("d1", "d2"):
        dm = m.destination(d)
        for outcome in OUTCOMES:
            deliveries.labels(d, outcome)
        for outcome in ("delivered", "delivered", "dead", "retry"):
            dm.outcomes[outcome].inc()
            deliveries.labels(d, outcome).inc()
        for x in (*values, 0.05, 30.0, 86400.0, 100000.0):
            dm.lag.observe(x)
            lag.labels(d).observe(x)
    ours = m.render()[0].decode()
    for family in generate_latest(ref).decode().split("# HELP ")[1:]:
        assert "# HELP " + family in ours
