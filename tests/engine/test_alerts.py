"""Built-in alerts (issue #10): config, the pure evaluator on a fake clock, sinks against real servers on
127.0.0.1, the snapshot read from a real store, and the engine end to end."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import random
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import structlog
import yaml
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from engine import config as cfgmod
from engine.alerts import certs
from engine.alerts.config import AlertsConfig, parse_alerts, parse_duration
from engine.alerts.evaluator import (
    FIRING,
    RESOLVED,
    CertObs,
    ChannelObs,
    DestinationObs,
    Evaluator,
    Notice,
    Snapshot,
)
from engine.alerts.runner import AlertRunner, observe
from engine.alerts.sinks import LogSink, SmtpSink, WebhookSink, build_sinks
from engine.cli import main
from engine.config import ChannelConfig, SourceConfig, _Section
from engine.errors import ConfigError
from engine.store import NewMessage, Store
from tests.support.engine import EngineProcess, basic_channel, free_port, write_config

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = Path(__file__).parent / "samples"
LA = ZoneInfo("America/Los_Angeles")
MONDAY = dt.datetime(2026, 3, 2, tzinfo=LA).timestamp()  # 2026-03-02 00:00 in Los Angeles, a Monday


# --------------------------------------------------------------------------- helpers


class FakeClock:
    def __init__(self, t: float = MONDAY) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_config(
    rules: list[dict[str, Any]],
    *,
    sinks: dict[str, Any] | None = None,
    every: float = 10,
    channels: tuple[str, ...] = ("adt",),
    destinations: tuple[str, ...] = ("fhir",),
) -> AlertsConfig:
    chs = [
        ChannelConfig(
            name=c, file=f"channels/{c}.yaml", source=SourceConfig(), types={}, site_tz="America/Los_Angeles"
        )
        for c in channels
    ]
    sec = _Section({"evaluate_every": every, "rules": rules, "sinks": sinks or {}}, "routes.yaml", "alerts")
    return parse_alerts(sec, chs, list(destinations))


def drive(
    ev: Evaluator, clock: FakeClock, snap: Callable[[float], Snapshot], seconds: float, step: float = 10
) -> list[Notice]:
    """Evaluate every ``step`` seconds of fake time for ``seconds``; the notices in order."""
    out: list[Notice] = []
    end = clock.t + seconds
    while clock.t < end:
        out += ev.evaluate(snap(clock.t))
        clock.t += step
    return out


def states(notices: list[Notice]) -> list[str]:
    return [n.state for n in notices]


def dest_snap(pending: int = 0, oldest: float | None = None, fails: int = 0) -> Callable[[float], Snapshot]:
    return lambda t: Snapshot(
        at=t,
        destinations={
            "fhir": DestinationObs(pending=pending, oldest_pending_at=oldest, consecutive_failures=fails)
        },
    )


def chan_snap(
    counts: dict[str, int], last: float | None, window: float = 600.0
) -> Callable[[float], Snapshot]:
    return lambda t: Snapshot(
        at=t, channels={"adt": ChannelObs(counts={window: counts}, last_received_at=last)}
    )


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def make_cert(directory: Path, days: float, name: str = "server") -> tuple[Path, Path, float]:
    """A self-signed certificate (and key) expiring ``days`` from now; its notAfter as epoch seconds."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sluice-test")])
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    crt, pem_key = directory / f"{name}.crt", directory / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return crt, pem_key, cert.not_valid_after_utc.timestamp()


class Receiver:
    """A webhook receiver on 127.0.0.1: records every POST; answers with queued status codes, then 200."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with outer.lock:
                    code = outer.statuses.pop(0) if outer.statuses else 200
                    if code == 200:
                        outer.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(b) for _, b in self.requests]


def verify(secret: bytes, headers: dict[str, str], body: bytes) -> bool:
    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers.get("x-sluice-signature", ""))


# --------------------------------------------------------------------------- config


DOC_EXAMPLE = re.compile(r"<!-- alerts-example -->\s*```yaml\n(.*?)```", re.S)


def _with_alerts(tmp_path: Path, alerts: Any, **kw: Any) -> Path:
    path = write_config(
        tmp_path,
        channels={"allscripts": basic_channel(free_port(), routes=[{"destination": "fhir-main"}])},
        destinations={
            "fhir-main": {"kind": "file", "directory": "out"},
            "lab-mllp": {"kind": "file", "directory": "o2"},
        },
        **kw,
    )
    routes = yaml.safe_load(path.read_text())
    routes["alerts"] = alerts
    path.write_text(yaml.safe_dump(routes, sort_keys=False))
    return path


def test_documented_example_loads(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    m = DOC_EXAMPLE.search(text)
    assert m, "docs/operations.md has the alerts example"
    alerts = yaml.safe_load(m.group(1))["alerts"]
    cfg = cfgmod.load(_with_alerts(tmp_path, alerts))
    a = cfg.alerts
    assert a.active and a.evaluate_every == 30
    kinds = {r.kind for r in a.rules}
    assert kinds == {
        "error_rate",
        "queue_depth",
        "oldest_pending",
        "destination_failing",
        "channel_silent",
        "tls_expiry",
    }
    rate = next(r for r in a.rules if r.kind == "error_rate")
    assert rate.channel == "allscripts" and rate.window == 600 and rate.threshold == 0.01 and rate.for_ == 120
    silent = next(r for r in a.rules if r.kind == "channel_silent")
    assert silent.hours is not None and silent.hours.days == frozenset(range(5)) and silent.threshold == 1800
    assert set(a.sinks) == {"ops-webhook", "log", "oncall-mail"}
    assert a.windows() == (600.0, 1800.0)


def test_no_alerts_section_means_off(tmp_path: Path) -> None:
    cfg = cfgmod.load(
        write_config(
            tmp_path,
            channels={"c": basic_channel(1234)},
            destinations={"out": {"kind": "file", "directory": "o"}},
        )
    )
    assert not cfg.alerts.active and cfg.alerts.rules == ()


@pytest.mark.parametrize(
    ("alerts", "key", "words"),
    [
        pytest.param({"rules": [{"name": "r", "kind": "queue_depth", "threshold": 5, "windw": "5m"}]},
                     "alerts.rules[0].windw", "allowed here", id="unknown-rule-key"),
        pytest.param({"rules": [{"name": "r", "kind": "queue_depth", "threshold": 5, "window": "5m"}]},
                     "alerts.rules[0].window", "allowed here", id="window-not-for-queue-depth"),
        pytest.param({"rules": [{"name": "r", "kind": "error_rate", "channel": "nope"}]},
                     "alerts.rules[0].channel", "known channels: allscripts", id="unknown-channel"),
        pytest.param({"rules": [{"name": "r", "kind": "queue_depth", "destination": "nope", "threshold": 1}]},
                     "alerts.rules[0].destination", "known destinations", id="unknown-destination"),
        pytest.param({"rules": [{"name": "r", "kind": "queue_depth"}]},
                     "alerts.rules[0].threshold", "pending deliveries", id="missing-threshold"),
        pytest.param({"rules": [{"name": "r", "kind": "oldest_pending", "threshold": "ten minutes"}]},
                     "alerts.rules[0].threshold", "30s, 10m", id="bad-duration"),
        pytest.param({"rules": [{"name": "r", "kind": "error_rate", "threshold": 5}]},
                     "alerts.rules[0].threshold", "fraction", id="rate-not-a-fraction"),
        pytest.param({"rules": [{"name": "r", "kind": "channel_silent", "threshold": "30m", "hours": "7-19"}]},
                     "alerts.rules[0].hours", "HH:MM-HH:MM", id="bad-hours"),
        pytest.param({"rules": [{"name": "r", "kind": "channel_silent", "threshold": "30m", "hours": "07:00-19:00", "days": "weekdays"}]},
                     "alerts.rules[0].days", "mon-fri", id="bad-days"),
        pytest.param({"rules": [{"name": "r", "kind": "tls_expiry", "sinks": ["pager"]}]},
                     "alerts.rules[0].sinks[0]", "define it under alerts.sinks", id="unknown-sink"),
        pytest.param({"rules": [{"name": "r", "kind": "bogus"}]}, "alerts.rules[0].kind", "error_rate", id="bad-kind"),
        pytest.param({"rules": [{"name": "r", "kind": "tls_expiry"}, {"name": "r", "kind": "tls_expiry"}]},
                     "alerts.rules[1].name", "unique", id="duplicate-rule"),
        pytest.param({"sinks": {"hook": {"kind": "webhook", "url": "http://127.0.0.1:9/x", "secret": "hunter2"}}},
                     "alerts.sinks.hook.secret", "{env: VARIABLE_NAME}", id="plain-secret-refused"),
        pytest.param({"sinks": {"hook": {"kind": "webhook"}}}, "alerts.sinks.hook.url", "http", id="webhook-needs-url"),
        pytest.param({"sinks": {"m": {"kind": "smtp", "host": "127.0.0.1", "from": "a@b"}}}, "alerts.sinks.m.to", "needs to", id="smtp-needs-to"),
        pytest.param({"evaluate_every": "soon"}, "alerts.evaluate_every", "duration", id="bad-every"),
        pytest.param({"rulez": []}, "alerts.rulez", "allowed here", id="unknown-section-key"),
    ],
)  # fmt: skip
def test_config_errors_name_file_and_key(tmp_path: Path, alerts: Any, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as ei:
        cfgmod.load(_with_alerts(tmp_path, alerts))
    msg = str(ei.value)
    assert "routes.yaml" in msg and f"{key}:" in msg and words in msg, msg


def test_durations() -> None:
    assert parse_duration("30s", file="f", key="k") == 30
    assert parse_duration("1h30m", file="f", key="k") == 5400
    assert parse_duration("14d", file="f", key="k") == 14 * 86400
    assert parse_duration(90, file="f", key="k") == 90
    with pytest.raises(ConfigError):
        parse_duration("5 parsecs", file="f", key="k")


def test_missing_secret_env_stops_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLUICE_TEST_NO_SUCH_SECRET", raising=False)
    a = make_config(
        [{"name": "r", "kind": "queue_depth", "threshold": 1, "sinks": ["hook"]}],
        sinks={
            "hook": {
                "kind": "webhook",
                "url": "http://127.0.0.1:9/h",
                "secret": {"env": "SLUICE_TEST_NO_SUCH_SECRET"},
            }
        },
    )
    with pytest.raises(ConfigError) as ei:
        build_sinks(a)
    assert "alerts.sinks.hook.secret" in str(ei.value) and "export SLUICE_TEST_NO_SUCH_SECRET" in str(
        ei.value
    )


def test_check_command_lists_rules_and_checks_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alerts = {
        "rules": [{"name": "down", "kind": "destination_failing", "sinks": ["hook", "log"]}],
        "sinks": {"hook": {"kind": "webhook", "url": "http://127.0.0.1:9/h", "secret": {"env": "SLUICE_TEST_CHECK_SECRET"}}},
    }  # fmt: skip
    path = _with_alerts(tmp_path, alerts)
    monkeypatch.delenv("SLUICE_TEST_CHECK_SECRET", raising=False)
    res = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert res.exit_code == 1 and "alerts.sinks.hook.secret" in res.output, res.output
    monkeypatch.setenv("SLUICE_TEST_CHECK_SECRET", "x")
    res = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert res.exit_code == 0 and "alert down: destination_failing → hook, log" in res.output, res.output


# --------------------------------------------------------------------------- the evaluator, rule by rule


def test_error_rate_fires_once_and_resolves_once() -> None:
    a = make_config(
        [
            {
                "name": "errs",
                "kind": "error_rate",
                "channel": "adt",
                "window": "10m",
                "threshold": 0.01,
                "clear_for": "1m",
            }
        ]
    )
    clock = FakeClock()
    ev = Evaluator(a, clock)
    assert (
        drive(ev, clock, chan_snap({"processed": 1000, "error": 10}, clock.t), 300) == []
    )  # 0.99%: not above 1%
    bad = drive(ev, clock, chan_snap({"processed": 1000, "error": 30, "rejected": 5}, clock.t), 600)
    assert states(bad) == [FIRING]
    n = bad[0]
    assert n.rule == "errs" and n.subject_type == "channel" and n.subject == "adt"
    assert n.value == pytest.approx(35 / 1035) and "35 of 1035 messages failed in the last 10m" in n.summary
    good = drive(ev, clock, chan_snap({"processed": 1000}, clock.t), 600)
    assert states(good) == [RESOLVED] and good[0].incident == n.incident
    assert good[0].at - good[0].opened_at >= 600


def test_error_rate_needs_min_messages_and_counts_chosen_statuses() -> None:
    a = make_config([
        {"name": "few", "kind": "error_rate", "min_messages": 20},
        {"name": "review", "kind": "error_rate", "statuses": ["review"], "threshold": "10%"},
    ])  # fmt: skip
    clock = FakeClock()
    ev = Evaluator(a, clock)
    # 3 errors in 6 messages: "few" wants 20 messages first; 1 review in 6 is above 10%
    out = drive(ev, clock, chan_snap({"error": 3, "processed": 2, "review": 1}, clock.t), 120)
    assert [(n.rule, n.state) for n in out] == [("review", FIRING)]
    out = drive(ev, clock, chan_snap({"error": 3, "processed": 100, "review": 1}, clock.t), 120)
    assert [(n.rule, n.state) for n in out] == [("few", FIRING)]  # 3 of 104 (2.9%); review still open


def test_queue_depth() -> None:
    a = make_config([{"name": "q", "kind": "queue_depth", "threshold": 100, "clear_for": "2m"}])
    clock = FakeClock()
    ev = Evaluator(a, clock)
    assert drive(ev, clock, dest_snap(pending=100), 300) == []  # at the threshold, not above
    fired = drive(ev, clock, dest_snap(pending=5000), 600)
    assert states(fired) == [FIRING] and fired[0].subject == "fhir" and fired[0].value == 5000
    assert "5000 deliveries pending (threshold 100)" in fired[0].summary
    assert drive(ev, clock, dest_snap(pending=3), 110) == []  # clear, but not for clear_for yet
    assert states(drive(ev, clock, dest_snap(pending=3), 600)) == [RESOLVED]


def test_oldest_pending_age() -> None:
    a = make_config([{"name": "old", "kind": "oldest_pending", "threshold": "15m"}])
    clock = FakeClock()
    ev = Evaluator(a, clock)
    since = clock.t
    early = drive(ev, clock, dest_snap(pending=4, oldest=since), 15 * 60)  # up to 14m50s old
    assert early == []
    fired = drive(ev, clock, dest_snap(pending=4, oldest=since), 60)
    assert states(fired) == [FIRING] and fired[0].value is not None and fired[0].value > 900
    assert states(drive(ev, clock, dest_snap(pending=0, oldest=None), 600)) == [RESOLVED]


def test_destination_failing() -> None:
    a = make_config([{"name": "down", "kind": "destination_failing", "threshold": 3}])
    clock = FakeClock()
    ev = Evaluator(a, clock)
    assert drive(ev, clock, dest_snap(fails=2), 120) == []
    fired = drive(ev, clock, dest_snap(pending=7, fails=3), 1800)
    assert states(fired) == [FIRING] and "3 delivery attempts failed in a row" in fired[0].summary
    assert states(drive(ev, clock, dest_snap(fails=0), 600)) == [RESOLVED]


def test_channel_silent() -> None:
    a = make_config([{"name": "quiet", "kind": "channel_silent", "threshold": "30m"}])
    clock = FakeClock()
    ev = Evaluator(a, clock)
    last = clock.t
    assert drive(ev, clock, chan_snap({"processed": 3}, last, window=1800), 30 * 60) == []
    fired = drive(ev, clock, chan_snap({}, last, window=1800), 3600)
    assert states(fired) == [FIRING] and "no message for 30m" in fired[0].summary
    # messages flow again
    out = drive(ev, clock, lambda t: chan_snap({"processed": 1}, t, window=1800)(t), 600)
    assert states(out) == [RESOLVED]


def test_tls_expiry_rule() -> None:
    a = make_config([{"name": "certs", "kind": "tls_expiry", "threshold": "14d"}])
    clock = FakeClock()
    ev = Evaluator(a, clock)

    def snap(not_after: float | None, error: str = "") -> Callable[[float], Snapshot]:
        obs = CertObs(not_after=not_after, error=error, owners=("channel adt",))
        return lambda t: Snapshot(at=t, certs={"/etc/sluice/adt.crt": obs})

    assert drive(ev, clock, snap(clock.t + 30 * 86400), 3600) == []
    fired = drive(ev, clock, snap(MONDAY + 3 * 86400), 3600)
    assert states(fired) == [FIRING]
    assert "/etc/sluice/adt.crt (channel adt) expires in 2d23h" in fired[0].summary
    assert states(drive(ev, clock, snap(clock.t + 365 * 86400), 3600)) == [RESOLVED]  # renewed
    unreadable = drive(ev, clock, snap(None, "No such file or directory"), 60)
    assert (
        states(unreadable) == [FIRING]
        and "cannot be read: No such file or directory" in unreadable[0].summary
    )


def test_for_must_hold_before_firing() -> None:
    a = make_config([{"name": "q", "kind": "queue_depth", "threshold": 10, "for": "2m"}])
    clock = FakeClock()
    ev = Evaluator(a, clock)
    for _ in range(5):  # bad for 90 s, then fine: never long enough
        assert drive(ev, clock, dest_snap(pending=50), 100) == []
        assert drive(ev, clock, dest_snap(pending=0), 30) == []
    start = clock.t
    fired = drive(ev, clock, dest_snap(pending=50), 600)
    assert states(fired) == [FIRING] and fired[0].opened_at - start >= 120


def test_repeat_every_reminds_while_firing() -> None:
    a = make_config([{"name": "q", "kind": "queue_depth", "threshold": 10, "repeat_every": "20m"}])
    clock = FakeClock()
    ev = Evaluator(a, clock)
    out = drive(ev, clock, dest_snap(pending=50), 3600 + 5)
    assert states(out) == [FIRING] * 4
    assert [n.reminder for n in out] == [0, 1, 2, 3] and len({n.incident for n in out}) == 1


def test_active_hours_channel_silent() -> None:
    """Clinic hours 07:00-19:00 Monday to Friday (Los Angeles): silence at night or on a weekend opens
    nothing, the silence before 07:00 does not count, and an incident open at 19:00 stays open."""
    a = make_config(
        [
            {
                "name": "clinic",
                "kind": "channel_silent",
                "threshold": "30m",
                "hours": "07:00-19:00",
                "days": "mon-fri",
            }
        ]
    )
    clock = FakeClock(MONDAY)  # Monday 00:00; the last message was on Sunday
    ev = Evaluator(a, clock)
    sunday = MONDAY - 6 * 3600
    assert drive(ev, clock, chan_snap({}, sunday, window=1800), 7 * 3600, step=60) == []  # to 07:00
    fired = drive(ev, clock, chan_snap({}, sunday, window=1800), 3600, step=60)  # 07:00 to 08:00
    assert states(fired) == [FIRING]
    opened = dt.datetime.fromtimestamp(fired[0].opened_at, LA)
    assert (opened.hour, opened.minute) == (7, 31)  # 30 minutes counted from 07:00, not from Sunday
    flowing = drive(
        ev, clock, lambda t: chan_snap({"processed": 1}, t, window=1800)(t), 10 * 3600 - 600, step=60
    )
    assert states(flowing) == [RESOLVED]  # 08:00 → 17:50
    last = clock.t
    evening = drive(ev, clock, chan_snap({}, last, window=1800), 14 * 3600, step=60)  # 17:50 → Tue 07:50
    assert states(evening) == [FIRING]  # opened 18:21, still open at night: no resolved notice
    assert dt.datetime.fromtimestamp(evening[0].opened_at, LA).hour == 18
    morning = drive(ev, clock, lambda t: chan_snap({"processed": 1}, t, window=1800)(t), 3600, step=60)
    assert states(morning) == [RESOLVED]
    # Saturday: silent all day, nothing
    clock.t = MONDAY + 5 * 86400
    sat = drive(ev, clock, chan_snap({}, clock.t - 86400, window=1800), 86400, step=60)
    assert sat == []


def test_active_hours_overnight_and_zone() -> None:
    a = make_config(
        [{"name": "night", "kind": "queue_depth", "threshold": 1, "hours": "22:00-06:00", "tz": "UTC"}]
    )
    clock = FakeClock(dt.datetime(2026, 3, 2, 12, 0, tzinfo=dt.UTC).timestamp())
    ev = Evaluator(a, clock)
    assert drive(ev, clock, dest_snap(pending=9), 9 * 3600, step=60) == []  # 12:00 → 21:00 UTC
    fired = drive(ev, clock, dest_snap(pending=9), 3 * 3600, step=60)
    assert states(fired) == [FIRING] and dt.datetime.fromtimestamp(fired[0].opened_at, dt.UTC).hour == 22


def test_rule_without_subject_watches_every_one() -> None:
    a = make_config([{"name": "q", "kind": "queue_depth", "threshold": 1}], destinations=("a", "b", "c"))
    clock = FakeClock()
    ev = Evaluator(a, clock)
    snap = Snapshot(
        at=clock.t,
        destinations={"a": DestinationObs(pending=5), "b": DestinationObs(), "c": DestinationObs(pending=2)},
    )
    out = ev.evaluate(snap)
    assert sorted(n.subject for n in out) == ["a", "c"] and len({n.incident for n in out}) == 2


# --------------------------------------------------------------------------- no alert storms


def test_flapping_destination_for_ten_minutes_is_one_incident() -> None:
    """Down and up at random for 10 minutes of fake clock (evaluated every 10 s): one firing notice, then
    one resolved notice once it has been steady for clear_for."""
    a = make_config([{"name": "down", "kind": "destination_failing", "threshold": 1}], every=10)
    clock = FakeClock()
    ev = Evaluator(a, clock)
    rnd = random.Random(10)
    notices: list[Notice] = []
    end = clock.t + 600
    down = True
    flips = 0
    while clock.t < end:
        period = clock.t + rnd.uniform(5, 90)
        while clock.t < min(period, end):
            notices += ev.evaluate(dest_snap(fails=3 if down else 0)(clock.t))
            clock.t += 10
        down, flips = not down, flips + 1
    assert flips >= 8
    assert states(notices) == [FIRING]
    notices += drive(ev, clock, dest_snap(fails=0), 900)  # steady again
    assert states(notices) == [FIRING, RESOLVED] and len({n.incident for n in notices}) == 1


def test_slow_flapper_is_damped() -> None:
    """Down a minute, up six (longer than clear_for), for three hours: each relapse needs twice the quiet
    to be called resolved, so a few incidents, not one every seven minutes."""
    a = make_config([{"name": "down", "kind": "destination_failing", "threshold": 1}], every=10)
    clock = FakeClock()
    ev = Evaluator(a, clock)
    notices: list[Notice] = []
    for _ in range(3 * 60 // 7):
        notices += drive(ev, clock, dest_snap(fails=2), 60)
        notices += drive(ev, clock, dest_snap(fails=0), 360)
    assert 1 <= states(notices).count(FIRING) <= 2, states(notices)
    notices += drive(ev, clock, dest_snap(fails=0), 3 * 3600)
    assert states(notices).count(RESOLVED) == states(notices).count(FIRING)


# --------------------------------------------------------------------------- sinks and the runner


def _notice(state: str = FIRING) -> Notice:
    return Notice(
        state=state,
        incident="abc123",
        rule="down",
        kind="destination_failing",
        subject_type="destination",
        subject="fhir-main",
        summary="destination fhir-main: 3 delivery attempts failed in a row",
        value=3.0,
        threshold=3.0,
        opened_at=MONDAY,
        at=MONDAY + 60,
        sinks=("hook",),
    )


def test_webhook_sink_signs_the_body(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_TEST_ALERT_SECRET", "s3cret-for-tests")
    with Receiver() as rx:
        a = make_config(
            [{"name": "down", "kind": "destination_failing", "sinks": ["hook"]}],
            sinks={"hook": {"kind": "webhook", "url": rx.url, "secret": {"env": "SLUICE_TEST_ALERT_SECRET"},
                            "headers": {"X-Team": "interfaces"}}},
        )  # fmt: skip
        sink = build_sinks(a, node="node-7")["hook"]
        assert isinstance(sink, WebhookSink)

        async def go() -> None:
            await sink.send(_notice())
            await sink.close()

        asyncio.run(go())
        ((headers, body),) = rx.requests
    assert verify(b"s3cret-for-tests", headers, body)
    assert not verify(b"another secret", headers, body)
    doc = json.loads(body)
    assert doc["event"] == "alert.firing" and doc["state"] == "firing" and doc["incident"] == "abc123"
    assert doc["subject"] == {"type": "destination", "name": "fhir-main"} and doc["node"] == "node-7"
    assert headers["x-sluice-timestamp"] == str(doc["sent_at"]) and abs(doc["sent_at"] - time.time()) < 300
    assert headers["x-sluice-event"] == "alert.firing" and headers["x-team"] == "interfaces"
    assert doc["opened_at"] == "2026-03-02T08:00:00Z" and headers["content-type"] == "application/json"


def test_failed_sink_retries_at_next_evaluation_in_order() -> None:
    """The webhook answers 500, then is unreachable; the notices wait and go out in order, once each;
    the log sink is not held up by it."""
    with Receiver() as rx:
        rx.statuses = [500]
        a = make_config(
            [{"name": "q", "kind": "queue_depth", "threshold": 1, "clear_for": 0, "sinks": ["hook", "log"]}],
            sinks={"hook": {"kind": "webhook", "url": rx.url, "timeout": 5}},
        )
        clock = FakeClock()
        pending = [5]

        async def snapshot() -> Snapshot:
            return dest_snap(pending=pending[0])(clock.t)

        sinks = build_sinks(a)
        runner = AlertRunner(a, snapshot, sinks, clock)

        async def go() -> None:
            with structlog.testing.capture_logs() as logs:
                assert states(await runner.tick()) == [FIRING]  # webhook: HTTP 500, kept
                assert [e["event"] for e in logs if e["event"].startswith("alert_")] == [
                    "alert_firing",
                    "alert_sink_failed",
                ]
                pending[0] = 0
                clock.t += 10
                assert states(await runner.tick()) == [RESOLVED]  # both go out, in order
            assert len(runner.outbox["hook"]) == 0 and runner.sent == {"hook": 2, "log": 2}
            await runner.close()

        asyncio.run(go())
        assert [b["state"] for b in rx.bodies()] == ["firing", "resolved"]


def test_snapshot_failure_is_logged_not_raised() -> None:
    a = make_config([{"name": "q", "kind": "queue_depth", "threshold": 1}])

    async def broken() -> Snapshot:
        raise RuntimeError("store is down")

    runner = AlertRunner(a, broken, {"log": LogSink()}, FakeClock())

    async def go() -> None:
        with structlog.testing.capture_logs() as logs:
            assert await runner.tick() == []
        assert logs[0]["event"] == "alert_snapshot_failed" and logs[0]["error"] == "RuntimeError"

    asyncio.run(go())


def test_log_sink_fields() -> None:
    async def go() -> list[dict[str, Any]]:
        with structlog.testing.capture_logs() as logs:
            await LogSink().send(_notice())
            await LogSink().send(_notice(RESOLVED))
        return logs

    firing, resolved = asyncio.run(go())
    assert firing["event"] == "alert_firing" and firing["log_level"] == "warning"
    assert (
        firing["rule"] == "down"
        and firing["subject"] == "fhir-main"
        and firing["subject_type"] == "destination"
    )
    assert resolved["event"] == "alert_resolved" and resolved["log_level"] == "info"


class TinySMTP:
    """Just enough SMTP on 127.0.0.1 to take a message: EHLO, MAIL, RCPT, DATA, QUIT."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sender, rcpts = "", []
        writer.write(b"220 tiny ready\r\n")
        while line := await reader.readline():
            cmd = line.decode().strip()
            verb = cmd.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                writer.write(b"250 tiny\r\n")
            elif verb == "MAIL":
                sender = cmd.split(":", 1)[1].strip(" <>")
                writer.write(b"250 ok\r\n")
            elif verb == "RCPT":
                rcpts.append(cmd.split(":", 1)[1].strip(" <>"))
                writer.write(b"250 ok\r\n")
            elif verb == "DATA":
                writer.write(b"354 go on\r\n")
                await writer.drain()
                data = b""
                while not data.endswith(b"\r\n.\r\n"):
                    data += await reader.readline()
                self.messages.append((sender, rcpts, data))
                writer.write(b"250 queued\r\n")
            elif verb == "QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def test_smtp_sink_sends_mail() -> None:
    async def go() -> TinySMTP:
        smtp = TinySMTP()
        await smtp.start()
        a = make_config(
            [{"name": "down", "kind": "destination_failing", "sinks": ["mail"]}],
            sinks={"mail": {"kind": "smtp", "host": "127.0.0.1", "port": smtp.port, "from": "sluice@example.org",
                            "to": ["oncall@example.org", "lead@example.org"]}},
        )  # fmt: skip
        sink = build_sinks(a, node="node-1")["mail"]
        assert isinstance(sink, SmtpSink)
        await sink.send(_notice())
        await smtp.stop()
        return smtp

    smtp = asyncio.run(go())
    ((sender, rcpts, data),) = smtp.messages
    text = data.decode()
    assert sender == "sluice@example.org" and rcpts == ["oncall@example.org", "lead@example.org"]
    assert "Subject: [sluice] FIRING: down on destination fhir-main" in text
    assert "3 delivery attempts failed in a row" in text


def test_smtp_sink_unreachable_raises_for_retry() -> None:
    a = make_config(
        [{"name": "down", "kind": "destination_failing", "sinks": ["mail"]}],
        sinks={"mail": {"kind": "smtp", "host": "127.0.0.1", "port": free_port(), "from": "a@example.org", "to": "b@example.org", "timeout": 2}},
    )  # fmt: skip
    sink = build_sinks(a)["mail"]
    with pytest.raises(Exception, match="smtp mail: ConnectionRefusedError"):
        asyncio.run(sink.send(_notice()))


# --------------------------------------------------------------------------- certificates


def test_cert_not_after_matches_cryptography(tmp_path: Path) -> None:
    for days in (3, 400, 40000):  # 40000 days: past 2049, a GeneralizedTime
        crt, _, not_after = make_cert(tmp_path, days, name=f"c{days}")
        assert certs.file_not_after(crt) == not_after
        der = x509.load_pem_x509_certificate(crt.read_bytes()).public_bytes(serialization.Encoding.DER)
        (tmp_path / "c.der").write_bytes(der)
        assert certs.file_not_after(tmp_path / "c.der") == not_after
    (tmp_path / "junk.pem").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(certs.CertError):
        certs.file_not_after(tmp_path / "junk.pem")
    (tmp_path / "junk.der").write_bytes(b"\x30\x82\xff")
    with pytest.raises(certs.CertError):
        certs.file_not_after(tmp_path / "junk.der")


def test_tls_expiry_from_the_engine_config(tmp_path: Path) -> None:
    """A channel listens with a certificate that expires in 3 days: the 14-day rule fires, naming the
    file and the channel; a rule's own extra file that does not exist fires as unreadable."""
    crt, key, not_after = make_cert(tmp_path, 3)
    port = free_port()
    path = write_config(
        tmp_path,
        channels={"adt": basic_channel(port, source={"host": "127.0.0.1", "port": port, "tls": {"cert": str(crt), "key": str(key)}})},
        destinations={"out": {"kind": "file", "directory": "o"}},
    )  # fmt: skip
    routes = yaml.safe_load(path.read_text())
    routes["alerts"] = {
        "rules": [
            {"name": "certs", "kind": "tls_expiry", "threshold": "14d"},
            {"name": "extra", "kind": "tls_expiry", "files": ["missing.crt"], "threshold": "2d"},
        ]
    }
    path.write_text(yaml.safe_dump(routes))
    cfg = cfgmod.load(path)
    store = Store(f"sqlite:///{tmp_path}/s.db")
    try:
        snap = observe(cfg, store, [], time.time())
    finally:
        store.close()
    assert snap.certs[str(crt)].not_after == not_after and snap.certs[str(crt)].owners == ("channel adt",)
    out = Evaluator(cfg.alerts, time.time).evaluate(snap)
    by_rule: dict[str, list[Notice]] = {}
    for n in out:
        by_rule.setdefault(n.rule, []).append(n)
    (c,) = by_rule["certs"]  # the engine's certificate, not the other rule's file
    # 3 days less however long the test took to get here: shown as 3d (rounded) or 2d23h
    assert c.subject == str(crt) and re.search(r"\(channel adt\) expires in (3d|2d23h)\b", c.summary), (
        c.summary
    )
    assert [n.subject for n in by_rule["extra"]] == [str(tmp_path / "missing.crt")]
    assert "cannot be read" in by_rule["extra"][0].summary


# --------------------------------------------------------------------------- observing a real store


def test_observe_reads_counts_and_queues(tmp_path: Path, store_url: str) -> None:
    path = _with_alerts(
        tmp_path,
        {"rules": [{"name": "errs", "kind": "error_rate", "window": "10m"}, {"name": "quiet", "kind": "channel_silent", "threshold": "1h"}]},
        store=store_url,
    )  # fmt: skip
    cfg = cfgmod.load(path)
    store = Store(store_url)
    now = time.time()
    try:
        with store.write() as conn:
            rows = [
                NewMessage(channel="allscripts", received_at=now - 7200, peer="", raw=b"old", status="error")
            ]
            rows += [
                NewMessage(
                    channel="allscripts", received_at=now - 30 * i, peer="", raw=b"x", status="processed"
                )
                for i in range(1, 11)
            ]
            rows += [
                NewMessage(channel="allscripts", received_at=now - 1500, peer="", raw=b"y", status="rejected")
            ]
            rows += [
                NewMessage(channel="allscripts", received_at=now - 60, peer="", raw=b"z", status="error")
            ]
            ids = store.insert_messages(conn, rows)
            from engine.store import NewDelivery

            for i, mid in enumerate(ids[:3]):
                store.add_deliveries(
                    conn, mid, "allscripts", "", [NewDelivery("fhir-main", b"{}", "application/json")]
                )
                if i == 0:
                    conn.exec_driver_sql("UPDATE deliveries SET created_at = created_at - 900")

        class Worker:
            class config:
                name = "fhir-main"

            consecutive_failures, delivered, failed, dead = 4, 10, 6, 1

        snap = observe(cfg, store, [Worker()], now)
    finally:
        store.close()
    ch = snap.channels["allscripts"]
    assert ch.counts[600.0] == {"processed": 10, "error": 1}
    assert ch.counts[3600.0] == {"processed": 10, "error": 1, "rejected": 1}
    assert ch.last_received_at == pytest.approx(now - 30)
    d = snap.destinations["fhir-main"]
    assert d.pending == 3 and d.oldest_pending_at is not None and now - d.oldest_pending_at >= 899
    assert d.consecutive_failures == 4 and d.failed == 6
    assert snap.destinations["lab-mllp"] == DestinationObs()
    assert snap.certs == {}


# --------------------------------------------------------------------------- the engine, end to end


def test_engine_alerts_a_failing_destination_once_and_its_recovery_once(tmp_path: Path) -> None:
    """A real engine whose file destination cannot write: the webhook gets one signed firing notice;
    once the directory is back and the message delivered, one resolved notice for the same incident."""
    port = free_port()
    out = tmp_path / "blocked"
    out.write_text("a file where the directory should be")
    dest = {"kind": "file", "directory": str(out), "pattern": "{control_id}.{ext}", "fsync": False,
            "retry": {"max_attempts": 1000, "backoff": 0.05, "max_backoff": 0.2}}  # fmt: skip
    path = write_config(tmp_path, channels={"c": basic_channel(port)}, destinations={"out": dest})
    secret = "e2e-alert-secret"
    with Receiver() as rx:
        routes = yaml.safe_load(path.read_text())
        routes["alerts"] = {
            "evaluate_every": 0.2,
            "rules": [
                {"name": "out-down", "kind": "destination_failing", "threshold": 2, "clear_for": "1s", "sinks": ["hook", "log"]},
                {"name": "out-queue", "kind": "queue_depth", "threshold": 1000, "sinks": ["hook"]},
            ],
            "sinks": {"hook": {"kind": "webhook", "url": rx.url, "secret": {"env": "SLUICE_E2E_ALERT_SECRET"}}},
        }  # fmt: skip
        path.write_text(yaml.safe_dump(routes, sort_keys=False))
        eng = EngineProcess(path, port, env={"SLUICE_E2E_ALERT_SECRET": secret})
        out.unlink()  # the destination makes its directory at start: block it once it runs
        with eng:
            out.rmdir() if out.is_dir() else None
            out.write_text("blocked")
            res = CliRunner().invoke(
                main, ["send", str(SAMPLES / "adt_a01.hl7"), "--to", f"127.0.0.1:{port}"]
            )
            assert "\tAA\t" in res.output, res.output
            wait_for(lambda: [b for b in rx.bodies() if b["state"] == "firing"], what="the firing notice")
            out.unlink()
            out.mkdir()
            wait_for(lambda: (out / "DEMO0001.hl7").exists(), what="delivery after recovery")
            wait_for(lambda: [b for b in rx.bodies() if b["state"] == "resolved"], what="the resolved notice")
        bodies = rx.bodies()
        requests = list(rx.requests)
    assert [(b["rule"], b["state"]) for b in bodies] == [("out-down", "firing"), ("out-down", "resolved")]
    assert bodies[0]["incident"] == bodies[1]["incident"] and bodies[0]["subject"] == {
        "type": "destination",
        "name": "out",
    }
    assert all(verify(secret.encode(), h, b) for h, b in requests)
    log = (tmp_path / "engine.log").read_text()
    assert '"alert_firing"' in log and '"alerts_started"' in log
    for phi in ("Sampleton", "MRN100234", "19760412"):
        assert phi not in log and all(phi not in b.decode() for _, b in requests)
