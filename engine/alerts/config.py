"""The ``alerts:`` section of routes.yaml → a frozen, validated :class:`AlertsConfig`.

Like the rest of the config: every error names the file and the key path and says what to do, and an
unknown key is an error (a typo must never silently turn an alert off).  Secrets are not resolved here
(``sluice messages list`` must not need the webhook secret): the sinks resolve them when the engine
starts, and a missing one stops the start with the key path.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from engine.errors import ConfigError

if TYPE_CHECKING:  # engine.config imports this module
    from engine.config import ChannelConfig, DestinationConfig, _Section

ERROR_RATE = "error_rate"
QUEUE_DEPTH = "queue_depth"
OLDEST_PENDING = "oldest_pending"
DESTINATION_FAILING = "destination_failing"
CHANNEL_SILENT = "channel_silent"
TLS_EXPIRY = "tls_expiry"
RULE_KINDS = (ERROR_RATE, QUEUE_DEPTH, OLDEST_PENDING, DESTINATION_FAILING, CHANNEL_SILENT, TLS_EXPIRY)
CHANNEL_KINDS = frozenset({ERROR_RATE, CHANNEL_SILENT})
DESTINATION_KINDS = frozenset({QUEUE_DEPTH, OLDEST_PENDING, DESTINATION_FAILING})
SINK_KINDS = ("webhook", "log", "smtp")
# Message statuses that count as errors for error_rate (engine.store): processing failed, AR at intake,
# unreadable or conflicting content.
ERROR_STATUSES = ("error", "rejected", "quarantined")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DEFAULT_CLEAR_FOR = 300.0  # quiet needed before an incident is called resolved (Alertmanager's 5 minutes)

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_HOURS = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


def parse_duration(value: Any, *, file: str, key: str) -> float:
    """Seconds from a number (seconds) or text like ``30s``, ``10m``, ``1h30m``, ``14d``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"a duration cannot be negative ({value})", file=file, key=key)
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        parts = _DURATION.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return sum(float(n) * _UNITS[u] for n, u in parts)
    raise ConfigError(
        f"expected a duration, got {value!r}",
        file=file,
        key=key,
        hint="seconds as a number, or text like 30s, 10m, 1h30m, 14d",
    )


def format_duration(seconds: float) -> str:
    """``90`` → ``1m30s``; ``86400`` → ``1d`` (for notices and logs)."""
    if seconds < 1:
        return f"{seconds:.2f}s".replace(".00s", "s")
    out, rest = [], round(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(out[:2])


@dataclass(frozen=True)
class ActiveHours:
    """When a rule may open incidents: ``hours: "07:00-19:00"``, ``days: mon-fri``, in a time zone.

    ``end <= start`` is an overnight range (``22:00-06:00``); its days are the days it starts on.
    """

    start: int = 0  # minute of the day
    end: int = 24 * 60
    days: frozenset[int] = frozenset(range(7))  # 0 = Monday
    tz: str | None = None  # None: the subject channel's site_tz (see AlertsConfig.zone_for)

    def active_since(self, at: float, tz: str) -> float | None:
        """The start of the active period ``at`` falls in (epoch seconds), or None outside it."""
        local = datetime.fromtimestamp(at, ZoneInfo(tz))
        minute = local.hour * 60 + local.minute + local.second / 60
        day = local.weekday()

        def at_start(d: datetime) -> float:
            naive = datetime(d.year, d.month, d.day) + timedelta(minutes=self.start)
            return naive.replace(tzinfo=ZoneInfo(tz)).timestamp()

        if self.start < self.end:
            if day in self.days and self.start <= minute < self.end:
                return at_start(local)
            return None
        if minute >= self.start and day in self.days:
            return at_start(local)
        if minute < self.end and (day - 1) % 7 in self.days:
            return at_start(local - timedelta(days=1))
        return None


@dataclass(frozen=True)
class AlertRule:
    name: str
    kind: str
    channel: str | None = None  # channel kinds; None = every enabled channel
    destination: str | None = None  # destination kinds; None = every destination
    threshold: float = 0.0  # fraction (error_rate), count (queue_depth, destination_failing), else seconds
    window: float = 600.0  # error_rate: the window the rate is computed over
    min_messages: int = 1  # error_rate: fewer messages in the window than this never fire
    statuses: tuple[str, ...] = ERROR_STATUSES  # error_rate: message statuses that count as errors
    for_: float = 0.0  # the condition must hold this long before the incident opens
    clear_for: float = DEFAULT_CLEAR_FOR  # ...and be clear this long before it is resolved
    repeat_every: float | None = None  # remind while still firing, at most this often
    hours: ActiveHours | None = None
    sinks: tuple[str, ...] = ()
    files: tuple[str, ...] = ()  # tls_expiry: certificate files to watch besides the configured ones

    @property
    def subject_type(self) -> str:
        if self.kind in CHANNEL_KINDS:
            return "channel"
        if self.kind in DESTINATION_KINDS:
            return "destination"
        return "certificate"


@dataclass(frozen=True)
class WebhookSinkConfig:
    name: str
    url: str
    secret: Mapping[str, Any] | None = None  # {env: NAME} | {file: path}; None = unsigned
    headers: Mapping[str, Any] = field(default_factory=dict)
    timeout: float = 10.0
    kind: str = "webhook"


@dataclass(frozen=True)
class LogSinkConfig:
    name: str
    kind: str = "log"


@dataclass(frozen=True)
class SmtpSinkConfig:
    name: str
    host: str
    sender: str
    to: tuple[str, ...]
    port: int = 25
    starttls: bool = False
    ssl: bool = False
    username: str | None = None
    password: Mapping[str, Any] | None = None  # {env: NAME} | {file: path}
    timeout: float = 10.0
    subject_prefix: str = "[sluice]"
    kind: str = "smtp"


SinkConfig = WebhookSinkConfig | LogSinkConfig | SmtpSinkConfig
IMPLICIT_LOG = LogSinkConfig("log")


@dataclass(frozen=True)
class AlertsConfig:
    rules: tuple[AlertRule, ...] = ()
    sinks: Mapping[str, SinkConfig] = field(default_factory=dict)
    evaluate_every: float = 30.0
    enabled: bool = True
    file: str = "routes.yaml"
    base_dir: Path = Path(".")  # secret files and certificate paths resolve against it
    channel_zones: Mapping[str, str] = field(default_factory=dict)  # channel → site_tz

    @property
    def active(self) -> bool:
        return self.enabled and bool(self.rules)

    def windows(self) -> tuple[float, ...]:
        """The look-back windows the evaluator needs message counts for (error rate, silence)."""
        out = {r.window for r in self.rules if r.kind == ERROR_RATE}
        out |= {r.threshold for r in self.rules if r.kind == CHANNEL_SILENT}
        return tuple(sorted(out))

    def zone_for(self, rule: AlertRule, subject: str) -> str:
        """The time zone a rule's active hours are read in for a subject."""
        if rule.hours is not None and rule.hours.tz:
            return rule.hours.tz
        if rule.kind in CHANNEL_KINDS and subject in self.channel_zones:
            return self.channel_zones[subject]
        zones = set(self.channel_zones.values())
        return zones.pop() if len(zones) == 1 else "UTC"  # parse_alerts insists on tz otherwise


def _days(value: Any, *, file: str, key: str) -> frozenset[int]:
    items = value if isinstance(value, list) else str(value).split(",")
    out: set[int] = set()
    bad = ConfigError(
        f"cannot read the days {value!r}",
        file=file,
        key=key,
        hint="e.g. mon-fri, or [mon, wed, fri], or sat-sun (days: " + ", ".join(DAYS) + ")",
    )
    for item in items:
        text = str(item).strip().lower()
        if text in ("daily", "*", "all"):
            return frozenset(range(7))
        first, _, last = text.partition("-")
        lo, hi = first.strip()[:3], (last.strip() or first.strip())[:3]
        if lo not in DAYS or hi not in DAYS:
            raise bad
        i, j = DAYS.index(lo), DAYS.index(hi)
        while True:
            out.add(i)
            if i == j:
                break
            i = (i + 1) % 7
    if not out:
        raise bad
    return frozenset(out)


def _hours(sec: _Section) -> ActiveHours | None:
    text, days, tz = sec.get("hours"), sec.get("days"), sec.get("tz")
    if text is None and days is None:
        if tz is not None:
            raise ConfigError(
                "tz only matters with hours or days", file=sec.file, key=sec.key("tz"), hint="add hours:"
            )
        return None
    start, end = 0, 24 * 60
    if text is not None:
        m = _HOURS.match(str(text))
        bad = ConfigError(
            f"cannot read the hours {text!r}",
            file=sec.file,
            key=sec.key("hours"),
            hint='write "HH:MM-HH:MM" in 24-hour time, e.g. "07:00-19:00" or "22:00-06:00"',
        )
        if not m:
            raise bad
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if h1 > 23 or m1 > 59 or m2 > 59 or end > 24 * 60 or start == end:
            raise bad
    if tz is not None:
        try:
            ZoneInfo(str(tz))
        except Exception as exc:
            raise ConfigError(
                f"unknown time zone {tz!r}",
                file=sec.file,
                key=sec.key("tz"),
                hint="use an IANA name like America/New_York",
            ) from exc
    return ActiveHours(
        start=start,
        end=end,
        days=_days(days, file=sec.file, key=sec.key("days")) if days is not None else frozenset(range(7)),
        tz=str(tz) if tz is not None else None,
    )


def _secret_spec(sec: _Section, k: str) -> Mapping[str, Any] | None:
    v = sec.get(k)
    if v is None:
        return None
    if isinstance(v, Mapping) and (set(v) == {"env"} or set(v) == {"file"}):
        return dict(v)
    raise ConfigError(
        f"{k} must come from the environment or a file, not from the YAML",
        file=sec.file,
        key=sec.key(k),
        hint="write {env: VARIABLE_NAME} or {file: /run/secrets/name}",
    )


def _sink(name: str, sec: _Section) -> SinkConfig:
    kind = sec.text("kind", choices=SINK_KINDS)
    if kind is None:
        raise ConfigError(
            "missing 'kind'", file=sec.file, key=sec.key("kind"), hint=f"one of: {', '.join(SINK_KINDS)}"
        )
    out: SinkConfig
    if kind == "log":
        out = LogSinkConfig(name)
    elif kind == "webhook":
        url = sec.text("url")
        if not url or not url.startswith(("http://", "https://")):
            raise ConfigError(
                "a webhook sink needs url: an http:// or https:// URL", file=sec.file, key=sec.key("url")
            )
        headers = sec.get("headers") or {}
        if not isinstance(headers, Mapping):
            raise ConfigError(
                "headers must be a mapping of name: value", file=sec.file, key=sec.key("headers")
            )
        out = WebhookSinkConfig(
            name,
            url=url,
            secret=_secret_spec(sec, "secret"),
            headers=dict(headers),
            timeout=_positive(sec, "timeout", 10.0),
        )
    else:
        to = (
            [str(sec.get("to"))] if isinstance(sec.data.get("to"), str) else [str(x) for x in sec.items("to")]
        )
        host, sender = sec.text("host"), sec.text("from")
        for k, v in (("host", host), ("from", sender), ("to", to)):
            if not v:
                raise ConfigError(f"an smtp sink needs {k}", file=sec.file, key=sec.key(k))
        out = SmtpSinkConfig(
            name,
            host=host,
            sender=sender,
            to=tuple(to),
            port=sec.integer("port", 25),
            starttls=sec.flag("starttls", False),
            ssl=sec.flag("ssl", False),
            username=sec.text("username"),
            password=_secret_spec(sec, "password"),
            timeout=_positive(sec, "timeout", 10.0),
            subject_prefix=sec.text("subject_prefix", "[sluice]"),
        )
        if out.starttls and out.ssl:
            raise ConfigError("use starttls or ssl, not both", file=sec.file, key=sec.key("ssl"))
    sec.done()
    return out


def _positive(sec: _Section, k: str, default: float) -> float:
    v = parse_duration(sec.get(k, default), file=sec.file, key=sec.key(k))
    if v <= 0:
        raise ConfigError(f"{k} must be more than 0", file=sec.file, key=sec.key(k))
    return v


def _fraction(v: Any, *, file: str, key: str) -> float:
    if isinstance(v, str) and v.strip().endswith("%"):
        with contextlib.suppress(ValueError):
            v = float(v.strip()[:-1]) / 100
    if isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1:
        return float(v)
    raise ConfigError(
        f"expected a fraction between 0 and 1, got {v!r}",
        file=file,
        key=key,
        hint="e.g. 0.01 or '1%' for more than one message in a hundred",
    )


def _count(v: Any, *, file: str, key: str) -> float:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return float(v)
    raise ConfigError(f"expected a whole number, got {v!r}", file=file, key=key)


_THRESHOLD_DEFAULTS: dict[str, Any] = {
    ERROR_RATE: 0.01,
    DESTINATION_FAILING: 3,
    TLS_EXPIRY: "14d",
    QUEUE_DEPTH: None,
    OLDEST_PENDING: None,
    CHANNEL_SILENT: None,
}
_THRESHOLD_HINTS = {
    QUEUE_DEPTH: "the number of pending deliveries above which it fires, e.g. threshold: 1000",
    OLDEST_PENDING: "how long the oldest pending delivery may wait, e.g. threshold: 15m",
    CHANNEL_SILENT: "how long a channel may go without a message, e.g. threshold: 30m",
}


def _rule(
    sec: _Section,
    *,
    channels: Mapping[str, str],
    destinations: Sequence[str],
    sinks: Mapping[str, SinkConfig],
) -> AlertRule:
    file = sec.file
    name = sec.text("name")
    if not name:
        raise ConfigError(
            "a rule needs a name", file=file, key=sec.key("name"), hint="e.g. name: fhir-errors"
        )
    kind = sec.text("kind", choices=RULE_KINDS)
    if kind is None:
        raise ConfigError(
            "missing 'kind'", file=file, key=sec.key("kind"), hint=f"one of: {', '.join(RULE_KINDS)}"
        )
    channel = destination = None
    if kind in CHANNEL_KINDS or kind == TLS_EXPIRY:
        channel = sec.text("channel")
        if channel is not None and channel not in channels:
            raise ConfigError(
                f"unknown channel {channel!r}",
                file=file,
                key=sec.key("channel"),
                hint=f"known channels: {', '.join(sorted(channels)) or 'none'}; omit it for every channel",
            )
    if kind in DESTINATION_KINDS or kind == TLS_EXPIRY:
        destination = sec.text("destination")
        if destination is not None and destination not in destinations:
            raise ConfigError(
                f"unknown destination {destination!r}",
                file=file,
                key=sec.key("destination"),
                hint=f"known destinations: {', '.join(sorted(destinations)) or 'none'}; omit it for every one",
            )
    raw = sec.get("threshold", _THRESHOLD_DEFAULTS[kind])
    tkey = sec.key("threshold")
    if raw is None:
        raise ConfigError(
            f"a {kind} rule needs a threshold", file=file, key=tkey, hint=_THRESHOLD_HINTS[kind]
        )
    if kind == ERROR_RATE:
        threshold = _fraction(raw, file=file, key=tkey)
    elif kind in (QUEUE_DEPTH, DESTINATION_FAILING):
        threshold = _count(raw, file=file, key=tkey)
        if kind == DESTINATION_FAILING and threshold < 1:
            raise ConfigError("threshold must be at least 1 failed attempt", file=file, key=tkey)
    else:
        threshold = parse_duration(raw, file=file, key=tkey)
    extra: dict[str, Any] = {}
    if kind == ERROR_RATE:
        extra["window"] = _positive(sec, "window", 600.0)
        extra["min_messages"] = sec.integer("min_messages", 1)
        statuses = tuple(str(s) for s in sec.items("statuses")) or ERROR_STATUSES
        from engine.store import MESSAGE_STATUSES

        for j, s in enumerate(statuses):
            if s not in MESSAGE_STATUSES:
                raise ConfigError(
                    f"{s!r} is not a message status",
                    file=file,
                    key=sec.key(f"statuses[{j}]"),
                    hint=f"use some of: {', '.join(MESSAGE_STATUSES)}",
                )
        extra["statuses"] = statuses
    if kind == TLS_EXPIRY:
        extra["files"] = tuple(str(f) for f in sec.items("files"))
    hours = _hours(sec)
    if (
        hours is not None
        and hours.tz is None
        and kind not in CHANNEL_KINDS
        and len(set(channels.values())) > 1
    ):
        raise ConfigError(
            "the channels have different site time zones: say which one these hours are in",
            file=file,
            key=sec.key("tz"),
            hint="add tz: America/New_York (an IANA name)",
        )
    sink_names = sec.get("sinks")
    if sink_names is None:
        chosen = tuple(sinks) or ("log",)
    else:
        if isinstance(sink_names, str):
            sink_names = [sink_names]
        if not isinstance(sink_names, list) or not sink_names:
            raise ConfigError("sinks must be a list of sink names", file=file, key=sec.key("sinks"))
        chosen = tuple(str(s) for s in sink_names)
        for j, s in enumerate(chosen):
            if s not in sinks and s != "log":
                raise ConfigError(
                    f"unknown sink {s!r}",
                    file=file,
                    key=sec.key(f"sinks[{j}]"),
                    hint=f"define it under alerts.sinks (known: {', '.join(sorted(sinks)) or 'none'}; "
                    "'log' always exists)",
                )
    rep = sec.get("repeat_every")
    rule = AlertRule(
        name=name,
        kind=kind,
        channel=channel,
        destination=destination,
        threshold=threshold,
        for_=parse_duration(sec.get("for", 0), file=file, key=sec.key("for")),
        clear_for=parse_duration(
            sec.get("clear_for", DEFAULT_CLEAR_FOR), file=file, key=sec.key("clear_for")
        ),
        repeat_every=parse_duration(rep, file=file, key=sec.key("repeat_every")) if rep is not None else None,
        hours=hours,
        sinks=chosen,
        **extra,
    )
    if rule.repeat_every is not None and rule.repeat_every <= 0:
        raise ConfigError("repeat_every must be more than 0", file=file, key=sec.key("repeat_every"))
    sec.done()
    return rule


def parse_alerts(
    sec: _Section,
    channels: Sequence[ChannelConfig] = (),
    destinations: Mapping[str, DestinationConfig] | Sequence[str] = (),
) -> AlertsConfig:
    """Read the ``alerts:`` section (``sec``) against the loaded channels and destinations."""
    from engine.config import _Section as Section

    file = sec.file
    zones = {c.name: c.site_tz for c in channels}
    every = _positive(sec, "evaluate_every", 30.0)
    enabled = sec.flag("enabled", True)
    ssec = sec.sub("sinks")
    sinks: dict[str, SinkConfig] = {}
    for name in list(ssec.data):
        sinks[str(name)] = _sink(str(name), ssec.sub(str(name)))
    ssec.used.update(ssec.data)
    rules: list[AlertRule] = []
    for i, r in enumerate(sec.items("rules")):
        rsec = Section(r, file, sec.key(f"rules[{i}]"))
        rule = _rule(rsec, channels=zones, destinations=list(destinations), sinks=sinks)
        if any(x.name == rule.name for x in rules):
            raise ConfigError(
                f"two rules are named {rule.name!r}",
                file=file,
                key=rsec.key("name"),
                hint="rule names must be unique",
            )
        rules.append(rule)
    sec.done()
    return AlertsConfig(
        rules=tuple(rules),
        sinks=sinks,
        evaluate_every=every,
        enabled=enabled,
        file=file,
        base_dir=Path(file).resolve().parent,
        channel_zones=zones,
    )


def sink_config(alerts: AlertsConfig, name: str) -> SinkConfig:
    """A rule's sink by name ('log' exists without being defined)."""
    return alerts.sinks.get(name, IMPLICIT_LOG)
