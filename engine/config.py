"""Configuration: ``routes.yaml`` plus ``channels/*.yaml`` → frozen, validated config.

Every error names the file, the key path and what to do.  Unknown keys are
errors (a typo must never silently turn a setting off).  Settings can be
overridden by ``SLUICE_*`` environment variables and CLI flags (see
:func:`load`).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from engine import overlays
from engine.alerts.config import AlertsConfig, parse_alerts
from engine.errors import ConfigError
from engine.hl7 import parse_path
from engine.suggest import did_you_mean

DEFAULT_TYPES: dict[str, tuple[str, ...]] = {
    "ADT": (
        "A01", "A02", "A03", "A04", "A05", "A06", "A07", "A08", "A09", "A10", "A11", "A12", "A13",
        "A14", "A15", "A16", "A17", "A18", "A20", "A21", "A22", "A23", "A24", "A25", "A26", "A27",
        "A28", "A29", "A30", "A31", "A32", "A33", "A34", "A35", "A36", "A37", "A38", "A39", "A40",
        "A41", "A42", "A44", "A45", "A46", "A47", "A48", "A49", "A50", "A51", "A60",
    ),
    "ORU": ("R01",),
    "SIU": ("S12", "S13", "S14", "S15", "S16", "S17", "S26"),
    "VXU": ("V04",),
    "MDM": ("T01", "T02", "T03", "T04", "T05", "T06", "T07", "T08", "T09", "T10", "T11"),
    "PPR": ("PC1", "PC2", "PC3"),
    "DFT": ("P03", "P11"),
    "BAR": ("P01", "P02", "P05", "P06", "P12"),
    "ORM": ("O01",),
    "OML": ("O21", "O33"),
    "OMG": ("O19",),
    "OUL": ("R22", "R23", "R24"),
    "REF": ("I12", "I13", "I14"),
    "RDE": ("O01", "O11", "O25"),
    "RDS": ("O01", "O13"),
    "OMP": ("O09",),
}  # fmt: skip
DEFAULT_VERSIONS = (
    "2.1",
    "2.2",
    "2.3",
    "2.3.1",
    "2.4",
    "2.5",
    "2.5.1",
    "2.6",
    "2.7",
    "2.7.1",
    "2.8",
    "2.8.1",
    "2.8.2",
)
ACK_MODES = ("on-commit", "after-processing")
FAILURE_POLICIES = ("block", "dead-letter")


@dataclass(frozen=True)
class TLSConfig:
    cert: str
    key: str
    ca: str | None = None
    require_client_cert: bool = False


@dataclass(frozen=True)
class FhirPollConfig:
    """``source: {kind: fhir-poll, ...}``: incremental polling of a FHIR server (engine/sources/fhir_poll.py)."""

    base_url: str
    resources: tuple[str, ...]
    params: Mapping[str, str] = field(default_factory=dict)  # extra search parameters, every resource
    interval: float = 30.0  # seconds between polls
    overlap: float = 60.0  # seconds the search reaches back before the cursor (ties, clock skew)
    page_size: int = 100  # _count
    timeout: float = 30.0
    auth: Mapping[str, Any] = field(default_factory=dict)  # as the fhir destination's auth
    tls: Mapping[str, Any] = field(default_factory=dict)  # as the fhir destination's tls


@dataclass(frozen=True)
class HttpSourceConfig:
    """``source: {kind: http, ...}``: FHIR resources pushed over HTTP(S) (engine/sources/http.py)."""

    path: str = "/fhir"
    resources: tuple[str, ...] = ()  # accepted resource types; empty = any
    auth: Mapping[str, Any] = field(default_factory=dict)  # {type: bearer, token: {env: NAME}} or none
    max_body: int = 16 * 1024 * 1024
    max_backlog: int = 5000  # commits waiting in the store's writer past which requests get 503
    # where id-only and empty Subscription notifications are resolved: the focus resources are read from
    # fetch.base_url, an empty R4 rest-hook searches fetch.resources since a cursor (as fhir-poll does)
    fetch: FhirPollConfig | None = None


SOURCE_KINDS = ("mllp", "fhir-poll", "http")
# order_by of a FHIR source: Type.element.element... (the subset of FHIRPath engine/sources/resources.py reads)
_FHIR_PATH = re.compile(r"^[A-Z][A-Za-z]*(\.[a-z][A-Za-z0-9]*)+$")


@dataclass(frozen=True)
class SourceConfig:
    kind: str = "mllp"
    poll: FhirPollConfig | None = None  # kind fhir-poll
    http: HttpSourceConfig | None = None  # kind http (host, port and tls below are its own)
    host: str = "127.0.0.1"
    port: int = 2575
    tls: TLSConfig | None = None
    max_connections: int = 1000  # at the cap a new connection evicts an idle one (engine/limits.py)
    max_connections_per_peer: int = 0  # per remote host; 0 = only max_connections applies
    idle_timeout: float = 300.0  # counted from the last complete frame or ACK, not from any byte
    frame_timeout: float = 30.0
    handshake_timeout: float = 10.0  # TLS: the handshake must finish within this many seconds
    max_frame: int = 16 * 1024 * 1024  # routes key max_frame, or its alias max_frame_bytes
    max_junk: int = 1024 * 1024
    lenient_end: bool = False
    fallback_charset: str = "latin-1"
    # valid multi-byte UTF-8 under MSH-18 8859/1, ASCII or none is decoded as UTF-8 (with a stored warning)
    utf8_fallback: bool = True
    keepalive: bool = True


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = 5
    backoff: float = 2.0  # first retry delay, seconds; doubles each attempt
    max_backoff: float = 300.0
    jitter: float = 0.2  # +/- fraction


@dataclass(frozen=True)
class DestinationConfig:
    name: str
    kind: str
    options: Mapping[str, Any]
    retry: RetryConfig = field(default_factory=RetryConfig)
    on_failure: str = "block"  # retry holding the key's later messages; or "dead-letter": park and go on
    lanes: int = 4


@dataclass(frozen=True)
class RouteConfig:
    destination: str
    filter: Any = None  # a filter spec, like the channel's


@dataclass(frozen=True)
class DedupeConfig:
    enabled: bool = True
    window_days: float = 7.0
    on_conflict: str = "reject"  # "reject" (AE 205, quarantine) or "accept"


@dataclass(frozen=True)
class RetentionConfig:
    bodies_days: float | None = None
    rows_days: float | None = None


@dataclass(frozen=True)
class StoreEncryptionConfig:
    """``store_encryption:``: seal message bodies, ACKs and payloads with a key ring (engine/keyring.py)."""

    key_file: str | None = None  # absolute path of the key ring file
    env: str | None = None  # or the environment variable holding the ring


@dataclass(frozen=True)
class ChannelConfig:
    name: str
    file: str
    source: SourceConfig
    types: Mapping[str, tuple[str, ...]]  # message type → accepted triggers (empty tuple = any)
    versions: tuple[str, ...] = DEFAULT_VERSIONS
    processing_ids: tuple[str, ...] = ("P", "T", "D")
    site_tz: str = "America/Los_Angeles"
    ack: str = "on-commit"
    require: tuple[str, ...] = ()
    filter: Any = None
    transform: tuple[Any, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    order_by: str | None = None
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    batch: str = "accept"  # FHS/BHS batches: "accept" (one ACK for the batch) or "reject" (AR 200)
    enabled: bool = True
    validate: str = "off"  # or "structure": segments checked against HL7 with hl7apy (engine/validation.py)
    # a bad value in a non-key field: "lenient" drops it with a located warning, "strict" rejects (AE)
    strictness: str = "lenient"
    # the map files its transform steps name, with a hash of their bytes: a reload after a map file was
    # edited sees the channel changed (the YAML alone is the same) and gives it the new maps
    files: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class LogFloodConfig:
    """``logging.flood``: repeated lines are rate-limited and summarised (engine/logflood.py)."""

    per_peer: int = 10  # lines of one event from one connection per window; 0 = no limit
    per_kind: int = 100  # lines of one event from everywhere per window; 0 = no limit
    window: float = 10.0  # seconds


@dataclass(frozen=True)
class LoggingConfig:
    format: str = "auto"  # auto | json | console
    level: str = "info"
    flood: LogFloodConfig = field(default_factory=LogFloodConfig)


@dataclass(frozen=True)
class LimitsConfig:
    """``limits:`` in routes.yaml: memory bounds for what the MLLP listeners hold (engine/limits.py)."""

    inflight_bytes: int = 128 * 1024 * 1024  # all connections: read and not yet answered; 0 = no limit
    connection_inflight_bytes: int = 32 * 1024 * 1024  # one connection: complete frames not yet answered
    connection_frames: int = 32  # one connection: complete frames not yet answered
    unsent_ack_bytes: int = 64 * 1024  # one connection: ACK bytes the peer has not read yet
    batch_bytes: int = 16 * 1024 * 1024  # processing batches and delivery rounds: stored bytes; 0 = no limit


@dataclass(frozen=True)
class OIDCConfig:
    """``admin.oidc``: accept JWT bearer tokens from an identity provider (engine/admin/oidc.py)."""

    issuer: str
    audience: str
    jwks_url: str
    roles_claim: str = "roles"  # a dotted path, e.g. realm_access.roles
    role_map: Mapping[str, str] = field(default_factory=dict)  # provider group → viewer|operator|admin|phi
    leeway: float = 30.0  # seconds of clock skew allowed


@dataclass(frozen=True)
class AdminConfig:
    """``admin:``: the admin HTTP API served by ``sluice run`` (engine/admin/)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics_auth: bool = False  # GET /metrics needs a token too
    oidc: OIDCConfig | None = None


@dataclass(frozen=True)
class Config:
    file: str
    base_dir: Path
    store_url: str
    channels: tuple[ChannelConfig, ...]
    destinations: Mapping[str, DestinationConfig]
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    plugin_paths: tuple[Path, ...] = ()
    plugins: tuple[str, ...] = ()  # modules imported at start; they register stages/destinations
    node_id: str = "node-1"
    processing_workers: int = 1  # worker processes for channel pipelines; 0 = in the engine process
    alerts: AlertsConfig = field(default_factory=AlertsConfig)  # engine/alerts/
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    store_encryption: StoreEncryptionConfig | None = None  # None: bodies are stored plain
    # How it was loaded, so a live reload loads the same way (engine/reload.py)
    pid_file: str | None = None  # absolute; the running engine's pid, for `sluice reload` (SIGHUP)
    overrides: Mapping[str, Any] = field(default_factory=dict)  # CLI flags given to `sluice run`
    env: str | None = None  # the environment overlay (routes.<env>.yaml), from --env or SLUICE_ENV

    def channel(self, name: str) -> ChannelConfig:
        for ch in self.channels:
            if ch.name == name:
                return ch
        known = ", ".join(c.name for c in self.channels) or "none"
        guess = did_you_mean(name, [c.name for c in self.channels])
        raise ConfigError(
            f"no channel named {name!r}",
            file=self.file,
            hint=f"{guess + ' ' if guess else ''}known channels: {known}",
        )


# ---------------------------------------------------------------------------
# small schema helpers


# The schema recorder (engine/schema.py): while set, every key read is noted with its kind, default and
# choices, so the channel reference is generated from the loader itself.  None (the normal case): no cost.
RECORDER: dict[tuple[str, str], dict[str, Any]] | None = None


def _note(
    sec: _Section, k: str, kind: str, default: Any = None, choices: tuple[str, ...] | None = None
) -> None:
    if RECORDER is not None:
        entry = RECORDER.setdefault((sec.file, sec.key(k)), {"kind": "any", "default": None, "choices": None})
        if kind != "any":
            entry.update(kind=kind, default=default, choices=choices)


class _Section:
    """A mapping being read, remembering its file and key path for errors."""

    def __init__(self, data: Any, file: str, path: str):
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping, got {type(data).__name__}", file=file, key=path or None)
        self.data = data
        self.file = file
        self.path = path
        self.used: set[str] = set()

    def key(self, k: str) -> str:
        return f"{self.path}.{k}" if self.path else k

    def get(self, k: str, default: Any = None) -> Any:
        self.used.add(k)
        if RECORDER is not None:
            _note(self, k, "any")
        return self.data.get(k, default)

    def has(self, k: str) -> bool:
        return k in self.data

    def text(self, k: str, default: str | None = None, *, choices: tuple[str, ...] | None = None) -> Any:
        if RECORDER is not None:
            _note(self, k, "text", default, choices)
        v = self.get(k, default)
        if v is None:
            return None
        if not isinstance(v, str | int | float) or isinstance(v, bool):
            raise ConfigError(f"expected text, got {type(v).__name__}", file=self.file, key=self.key(k))
        v = str(v)
        if choices and v not in choices:
            raise ConfigError(
                f"{v!r} is not allowed",
                file=self.file,
                key=self.key(k),
                hint=f"use one of: {', '.join(choices)}",
            )
        return v

    def integer(self, k: str, default: int) -> int:
        if RECORDER is not None:
            _note(self, k, "integer", default)
        v = self.get(k, default)
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, str):
                try:
                    return _size(v)
                except ValueError:
                    pass
            raise ConfigError(f"expected a whole number, got {v!r}", file=self.file, key=self.key(k))
        return v

    def number(self, k: str, default: float | None) -> Any:
        if RECORDER is not None:
            _note(self, k, "number", default)
        v = self.get(k, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"expected a number, got {v!r}", file=self.file, key=self.key(k))
        return float(v)

    def flag(self, k: str, default: bool) -> bool:
        if RECORDER is not None:
            _note(self, k, "boolean", default)
        v = self.get(k, default)
        if not isinstance(v, bool):
            raise ConfigError(f"expected true or false, got {v!r}", file=self.file, key=self.key(k))
        return v

    def items(self, k: str) -> list[Any]:
        if RECORDER is not None:
            _note(self, k, "list", [])
        v = self.get(k, [])
        if v is None:
            return []
        if not isinstance(v, list):
            raise ConfigError(f"expected a list, got {type(v).__name__}", file=self.file, key=self.key(k))
        return v

    def sub(self, k: str) -> _Section:
        if RECORDER is not None:
            _note(self, k, "mapping")
        return _Section(self.get(k), self.file, self.key(k))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            allowed = ", ".join(sorted(self.used))
            guess = did_you_mean(str(unknown[0]), sorted(self.used))
            raise ConfigError(
                f"unknown key {unknown[0]!r}"
                + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""),
                file=self.file,
                key=self.key(unknown[0]),
                hint=f"{guess or 'check the spelling'}; allowed here: {allowed}",
            )


def _size(v: str) -> int:
    s = v.strip().upper().replace(" ", "")
    for suffix, mult in (
        ("KIB", 1024),
        ("MIB", 1024**2),
        ("GIB", 1024**3),
        ("KB", 1000),
        ("MB", 1000**2),
        ("B", 1),
    ):
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * mult)
    return int(s)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file: {exc.strerror}", file=str(path), hint="check the path"
        ) from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        line = ""
        if mark is not None and 0 <= mark.line < len(text.splitlines()):
            line = f": {text.splitlines()[mark.line].rstrip()!r}"
        raise ConfigError(
            f"invalid YAML{where}{line}: {getattr(exc, 'problem', exc)}",
            file=str(path),
            hint="check the indentation there and on the line above: keys of one mapping start in the same "
            "column, indented with spaces (no tabs); quote a value that holds ': ' or starts with a special "
            "character",
        ) from exc


# ---------------------------------------------------------------------------
# sections


def _retry(sec: _Section) -> RetryConfig:
    r = RetryConfig(
        max_attempts=sec.integer("max_attempts", 5),
        backoff=sec.number("backoff", 2.0),
        max_backoff=sec.number("max_backoff", 300.0),
        jitter=sec.number("jitter", 0.2),
    )
    sec.done()
    if r.max_attempts < 1:
        raise ConfigError("max_attempts must be at least 1", file=sec.file, key=sec.key("max_attempts"))
    return r


def _destination(name: str, sec: _Section) -> DestinationConfig:
    kind = sec.text("kind")
    if not kind:
        raise ConfigError("missing 'kind'", file=sec.file, key=sec.key("kind"), hint="e.g. kind: file")
    retry = _retry(sec.sub("retry"))
    on_failure = sec.text("on_failure", "block", choices=FAILURE_POLICIES)
    lanes = sec.integer("lanes", 4)
    options = {k: v for k, v in sec.data.items() if k not in ("kind", "retry", "on_failure", "lanes")}
    return DestinationConfig(name, kind, options, retry, on_failure, lanes)


def _types(sec_value: Any, file: str, key: str) -> dict[str, tuple[str, ...]]:
    if sec_value is None:
        return dict(DEFAULT_TYPES)
    out: dict[str, tuple[str, ...]] = {}
    if isinstance(sec_value, list):
        for t in sec_value:
            t = str(t).upper()
            out[t] = DEFAULT_TYPES.get(t, ())
        return out
    if isinstance(sec_value, Mapping):
        for t, triggers in sec_value.items():
            if triggers in (None, "*", "any"):
                out[str(t).upper()] = ()
            elif isinstance(triggers, list):
                out[str(t).upper()] = tuple(str(x).upper() for x in triggers)
            else:
                raise ConfigError("triggers must be a list or '*'", file=file, key=f"{key}.{t}")
        return out
    raise ConfigError("expected a list of types or a map of type → triggers", file=file, key=key)


def _check_path(p: str, file: str, key: str) -> str:
    try:
        parse_path(p)
    except ValueError as exc:
        raise ConfigError(str(exc), file=file, key=key) from exc
    return p


def _check_tls_file(t: _Section, k: str) -> None:
    """A listener's TLS file must exist when the config is checked, not only when the listener starts
    (``sluice check`` would pass and ``sluice run`` fail with a bare "No such file or directory")."""
    p = t.data.get(k)
    # the schema's examples (engine/schema.py) name no real files
    if RECORDER is not None or p is None or Path(str(p)).is_file():
        return
    where = Path(str(p))
    raise ConfigError(
        f"file {str(p)!r} not found" + ("" if where.is_absolute() else f" (looked in {Path.cwd()})"),
        file=t.file,
        key=t.key(k),
        hint="give the path of the PEM file; a relative path is read from the directory the engine runs in",
    )


def _source(sec: _Section) -> SourceConfig:
    kind = sec.text("kind", "mllp", choices=SOURCE_KINDS)
    if kind == "fhir-poll":
        return _fhir_poll(sec)
    tls = None
    if sec.has("tls") and sec.data.get("tls"):
        t = sec.sub("tls")
        tls = TLSConfig(
            cert=t.text("cert"),
            key=t.text("key"),
            ca=t.text("ca"),
            require_client_cert=t.flag("require_client_cert", False),
        )
        t.done()
        if not tls.cert or not tls.key:
            raise ConfigError("tls needs cert and key files", file=sec.file, key=sec.key("tls"))
        for k in ("cert", "key", "ca"):
            _check_tls_file(t, k)
    else:
        sec.get("tls")
    if kind == "http":
        return _http_source(sec, tls)
    src = SourceConfig(
        host=sec.text("host", "127.0.0.1"),
        port=sec.integer("port", 2575),
        tls=tls,
        max_connections=sec.integer("max_connections", 1000),
        max_connections_per_peer=sec.integer("max_connections_per_peer", 0),
        idle_timeout=sec.number("idle_timeout", 300.0),
        frame_timeout=sec.number("frame_timeout", 30.0),
        handshake_timeout=sec.number("handshake_timeout", 10.0),
        max_frame=_max_frame(sec),
        max_junk=sec.integer("max_junk", 1024 * 1024),
        lenient_end=sec.flag("lenient_end", False),
        fallback_charset=sec.text("fallback_charset", "latin-1"),
        utf8_fallback=sec.flag("utf8_fallback", True),
        keepalive=sec.flag("keepalive", True),
    )
    sec.done()
    if not 0 <= src.port <= 65535:
        raise ConfigError(
            f"port {src.port} is out of range",
            file=sec.file,
            key=sec.key("port"),
            hint="use a port from 1 to 65535 (0: any free port)",
        )
    for k in ("max_connections", "max_connections_per_peer"):
        if getattr(src, k) < 0:
            raise ConfigError(f"{k} must be 0 or more", file=sec.file, key=sec.key(k))
    for k in ("idle_timeout", "frame_timeout", "handshake_timeout"):
        if getattr(src, k) <= 0:
            raise ConfigError(f"{k} must be more than 0 seconds", file=sec.file, key=sec.key(k))
    return src


def _fhir_poll(sec: _Section) -> SourceConfig:
    """``kind: fhir-poll``: the poll keys; the auth and tls options are checked at start (as a destination's)."""
    poll = _poll_config(sec, "a fhir-poll source")
    return SourceConfig(kind="fhir-poll", poll=poll, host="", port=0)


def _poll_config(sec: _Section, what: str, resources: tuple[str, ...] | None = None) -> FhirPollConfig:
    """The search keys of a fhir-poll source, or of an http source's ``fetch:`` section (``resources``
    given: the source's accepted types are the default, and there is no ``interval``)."""
    base = sec.text("base_url")
    if not isinstance(base, str) or not base.startswith(("http://", "https://")):
        raise ConfigError(
            f"{what} needs base_url, the server's FHIR base (http:// or https://)",
            file=sec.file,
            key=sec.key("base_url"),
            hint="e.g. base_url: https://portal.example.org/fhir",
        )
    kinds = [str(r) for r in sec.items("resources")] or list(resources or ())
    if not kinds or not all(k.isalpha() and k[:1].isupper() for k in kinds):
        raise ConfigError(
            f"{what} needs resources, a list of FHIR resource types"
            + (
                " (the subscribed types an empty notification is searched for)"
                if resources is not None
                else ""
            ),
            file=sec.file,
            key=sec.key("resources"),
            hint="e.g. resources: [Appointment]"
            + (" (or the source's own resources list)" if resources is not None else ""),
        )
    params = sec.get("params") or {}
    if not isinstance(params, Mapping) or any(
        str(k).startswith("_lastUpdated") or str(k) == "_sort" for k in params
    ):
        raise ConfigError(
            "params must be a mapping of search parameters other than _lastUpdated and _sort (the poller sets those)",
            file=sec.file,
            key=sec.key("params"),
            hint='e.g. params: {status: "booked,cancelled"}',
        )
    for k in ("auth", "tls"):
        if not isinstance(sec.get(k) or {}, Mapping):
            raise ConfigError(f"{k} must be a mapping", file=sec.file, key=sec.key(k))
    poll = FhirPollConfig(
        base_url=base.rstrip("/"),
        resources=tuple(dict.fromkeys(kinds)),
        params={str(k): str(v) for k, v in params.items()},
        interval=sec.number("interval", 30.0) if resources is None else 30.0,
        overlap=sec.number("overlap", 60.0),
        page_size=sec.integer("page_size", 100),
        timeout=sec.number("timeout", 30.0),
        auth=dict(sec.get("auth") or {}),
        tls=dict(sec.get("tls") or {}),
    )
    sec.done()
    for k in ("interval", "timeout"):
        if getattr(poll, k) <= 0:
            raise ConfigError(f"{k} must be more than 0 seconds", file=sec.file, key=sec.key(k))
    if poll.overlap < 0:
        raise ConfigError("overlap must be 0 or more seconds", file=sec.file, key=sec.key("overlap"))
    if not 1 <= poll.page_size <= 1000:
        raise ConfigError("page_size must be 1 to 1000", file=sec.file, key=sec.key("page_size"))
    return poll


def _http_source(sec: _Section, tls: TLSConfig | None) -> SourceConfig:
    """``kind: http``: host, port, path, tls (as the listener's), auth, resources, max_body, max_backlog."""
    auth = sec.get("auth") or {}
    if not isinstance(auth, Mapping) or auth.get("type", "none") not in ("none", "bearer"):
        raise ConfigError(
            "auth must be {type: bearer, token: {env: NAME}} (or none; mutual TLS is tls.require_client_cert)",
            file=sec.file,
            key=sec.key("auth"),
        )
    if auth.get("type") == "bearer" and not auth.get("token"):
        raise ConfigError("auth type bearer needs token", file=sec.file, key=sec.key("auth.token"))
    kinds = tuple(str(r) for r in sec.items("resources"))
    http = HttpSourceConfig(
        path=sec.text("path", "/fhir"),
        resources=kinds,
        auth=dict(auth),
        max_body=sec.integer("max_body", 16 * 1024 * 1024),
        max_backlog=sec.integer("max_backlog", 5000),
        fetch=_poll_config(sec.sub("fetch"), "fetch", kinds) if sec.get("fetch") is not None else None,
    )
    src = SourceConfig(
        kind="http", http=http, host=sec.text("host", "127.0.0.1"), port=sec.integer("port", 8443), tls=tls
    )
    sec.done()
    if not 0 <= src.port <= 65535:
        raise ConfigError(
            f"port {src.port} is out of range",
            file=sec.file,
            key=sec.key("port"),
            hint="use a port from 1 to 65535 (0: any free port)",
        )
    if not http.path.startswith("/"):
        raise ConfigError(
            "path must start with /", file=sec.file, key=sec.key("path"), hint="e.g. path: /fhir"
        )
    if http.max_body <= 0 or http.max_backlog <= 0:
        raise ConfigError(
            "max_body and max_backlog must be more than 0", file=sec.file, key=sec.key("max_body")
        )
    return src


def _max_frame(sec: _Section) -> int:
    """``max_frame``, or ``max_frame_bytes`` (the same setting under the name issue #12 gave it)."""
    plain, alias = sec.get("max_frame"), sec.get("max_frame_bytes")
    if plain is not None and alias is not None:
        raise ConfigError(
            "max_frame and max_frame_bytes are the same setting",
            file=sec.file,
            key=sec.key("max_frame_bytes"),
            hint="keep one of them",
        )
    return sec.integer("max_frame_bytes" if alias is not None else "max_frame", 16 * 1024 * 1024)


def _limits(sec: _Section) -> LimitsConfig:
    d = LimitsConfig()
    lim = LimitsConfig(
        inflight_bytes=sec.integer("inflight_bytes", d.inflight_bytes),
        connection_inflight_bytes=sec.integer("connection_inflight_bytes", d.connection_inflight_bytes),
        connection_frames=sec.integer("connection_frames", d.connection_frames),
        unsent_ack_bytes=sec.integer("unsent_ack_bytes", d.unsent_ack_bytes),
        batch_bytes=sec.integer("batch_bytes", d.batch_bytes),
    )
    sec.done()
    for k in ("inflight_bytes", "batch_bytes"):
        if getattr(lim, k) < 0:
            raise ConfigError(f"{k} must be 0 (no limit) or more", file=sec.file, key=f"limits.{k}")
    for k in ("connection_inflight_bytes", "connection_frames", "unsent_ack_bytes"):
        if getattr(lim, k) < 1:
            raise ConfigError(f"{k} must be at least 1", file=sec.file, key=f"limits.{k}")
    return lim


def _log_flood(sec: _Section) -> LogFloodConfig:
    d = LogFloodConfig()
    fl = LogFloodConfig(
        per_peer=sec.integer("per_peer", d.per_peer),
        per_kind=sec.integer("per_kind", d.per_kind),
        window=sec.number("window", d.window),
    )
    sec.done()
    if fl.per_peer < 0 or fl.per_kind < 0:
        raise ConfigError("per_peer and per_kind must be 0 (no limit) or more", file=sec.file, key=sec.path)
    if fl.window <= 0:
        raise ConfigError("window must be more than 0 seconds", file=sec.file, key=sec.key("window"))
    return fl


def _admin(sec: _Section, base: Path, port_override: Any) -> AdminConfig:
    tls_cert = tls_key = None
    if sec.data.get("tls"):
        t = sec.sub("tls")
        tls_cert, tls_key = t.text("cert"), t.text("key")
        t.done()
        if not tls_cert or not tls_key:
            raise ConfigError("admin.tls needs cert and key files", file=sec.file, key="admin.tls")
        tls_cert, tls_key = str((base / tls_cert).resolve()), str((base / tls_key).resolve())
    else:
        sec.get("tls")
    oidc = None
    if sec.data.get("oidc"):
        o = sec.sub("oidc")
        role_map = o.get("role_map") or {}
        if not isinstance(role_map, Mapping):
            raise ConfigError("expected a mapping of group → role", file=sec.file, key="admin.oidc.role_map")
        oidc = OIDCConfig(
            issuer=o.text("issuer") or "",
            audience=o.text("audience") or "",
            jwks_url=o.text("jwks_url") or "",
            roles_claim=o.text("roles_claim", "roles"),
            role_map={str(k): str(v) for k, v in role_map.items()},
            leeway=o.number("leeway", 30.0),
        )
        o.done()
        for k in ("issuer", "audience", "jwks_url"):
            if not getattr(oidc, k):
                raise ConfigError(f"admin.oidc needs {k}", file=sec.file, key=f"admin.oidc.{k}")
        for group, role in oidc.role_map.items():
            if role not in ("viewer", "operator", "admin", "phi"):
                raise ConfigError(
                    f"role_map maps {group!r} to {role!r}",
                    file=sec.file,
                    key=f"admin.oidc.role_map.{group}",
                    hint="map to viewer, operator, admin or phi",
                )
    else:
        sec.get("oidc")
    admin = AdminConfig(
        enabled=sec.flag("enabled", True),
        host=sec.text("host", "127.0.0.1"),
        port=sec.integer("port", 8080),
        tls_cert=tls_cert,
        tls_key=tls_key,
        metrics_auth=sec.flag("metrics_auth", False),
        oidc=oidc,
    )
    sec.done()
    if port_override not in (None, ""):
        try:
            admin = replace(admin, port=int(port_override))
        except ValueError:
            raise ConfigError(
                f"admin port {port_override!r} is not a number",
                key="admin.port",
                hint="check SLUICE_ADMIN_PORT",
            ) from None
    if not 0 <= admin.port <= 65535:
        raise ConfigError(
            f"port {admin.port} is out of range",
            file=sec.file,
            key="admin.port",
            hint="use a port from 1 to 65535 (0: any free port)",
        )
    return admin


def load_channel(
    path: Path, destinations: Mapping[str, DestinationConfig], overrides: Mapping[str, Any] | None = None
) -> ChannelConfig:
    """One channel file; ``overrides`` maps channel names to a partial channel merged over the file
    (``channel_overrides`` of an environment, engine/overlays.py)."""
    file = str(path)
    data = _read_yaml(path)
    if overrides and isinstance(data, Mapping):
        override = overrides.get(str(data.get("name") or path.stem))
        if override is not None:
            data = overlays.deep_merge(data, override)
            file = f"{file} + channel_overrides"
    sec = _Section(data, file, "")
    name = sec.text("name") or path.stem
    source = _source(sec.sub("source"))
    accept = sec.sub("accept")
    types = _types(accept.get("types"), file, "accept.types")
    versions = tuple(str(v) for v in accept.items("versions")) or DEFAULT_VERSIONS
    pids = tuple(str(v).upper() for v in accept.items("processing_ids")) or ("P", "T", "D")
    accept.done()
    site_tz = sec.text("site_tz", "America/Los_Angeles")
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(site_tz)
    except Exception as exc:
        raise ConfigError(
            f"unknown time zone {site_tz!r}",
            file=file,
            key="site_tz",
            hint="use an IANA name like America/New_York",
        ) from exc
    routes: list[RouteConfig] = []
    for i, r in enumerate(sec.items("routes")):
        rs = _Section(r if isinstance(r, Mapping) else {"destination": r}, file, f"routes[{i}]")
        dest = rs.text("destination")
        if dest not in destinations:
            known = ", ".join(sorted(destinations)) or "none defined"
            raise ConfigError(
                f"unknown destination {dest!r}",
                file=file,
                key=f"routes[{i}].destination",
                hint=f"define it under destinations: in routes.yaml (known: {known})",
            )
        routes.append(RouteConfig(dest, rs.get("filter")))
        rs.done()
    order_by = sec.text("order_by")
    if order_by and source.kind == "mllp":
        _check_path(order_by, file, "order_by")
    elif order_by and not _FHIR_PATH.match(order_by):
        raise ConfigError(
            f"order_by {order_by!r} is not a FHIRPath of element names",
            file=file,
            key="order_by",
            hint="a FHIR source orders by a path such as Appointment.participant.actor.reference",
        )
    require = tuple(_check_path(str(p), file, f"require[{i}]") for i, p in enumerate(sec.items("require")))
    ds = sec.sub("dedupe")
    dedupe = DedupeConfig(
        enabled=ds.flag("enabled", True),
        window_days=ds.number("window_days", 7.0),
        on_conflict=ds.text("on_conflict", "reject", choices=("reject", "accept")),
    )
    ds.done()
    rt = sec.sub("retention")
    retention = RetentionConfig(
        bodies_days=rt.number("bodies_days", None), rows_days=rt.number("rows_days", None)
    )
    rt.done()
    transform = sec.items("transform")
    validate = "off"
    if sec.get("validate") is not False:  # YAML reads a bare `off` as false
        validate = sec.text("validate", "off", choices=("off", "structure"))
    if validate == "structure":
        from engine.validation import require_hl7apy

        require_hl7apy(file)
    ch = ChannelConfig(
        name=name,
        file=str(path),
        source=source,
        types=types,
        versions=versions,
        processing_ids=pids,
        site_tz=site_tz,
        ack=sec.text("ack", "on-commit", choices=ACK_MODES),
        require=require,
        filter=sec.get("filter"),
        transform=tuple(transform),
        routes=tuple(routes),
        order_by=order_by,
        dedupe=dedupe,
        retention=retention,
        batch=sec.text("batch", "accept", choices=("accept", "reject")),
        enabled=sec.flag("enabled", True),
        validate=validate,
        strictness=sec.text("strictness", "lenient", choices=("lenient", "strict")),
    )
    sec.done()
    return ch


def referenced_files(transform: Any, base: Path) -> tuple[tuple[str, str], ...]:
    """(path, BLAKE2b of the bytes) of every map file a channel's transform steps name: each text value
    ending in .csv/.yaml/.yml that resolves as the steps resolve a map (transforms/settings.py)."""
    import hashlib

    from transforms.settings import resolve_map_path

    refs: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, str):
            if v.lower().endswith((".csv", ".yaml", ".yml")):
                refs.append(v)
        elif isinstance(v, Mapping):
            for x in v.values():
                walk(x)
        elif isinstance(v, list | tuple):
            for x in v:
                walk(x)

    walk(transform)
    out: dict[str, str] = {}
    for ref in refs:
        path = resolve_map_path(ref, base)
        if path is None:
            continue  # a missing map is the step's error to report, with its key
        try:
            out[str(path)] = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
        except OSError:
            continue
    return tuple(sorted(out.items()))


ENV_PREFIX = "SLUICE_"


def load(
    path: str | Path = "routes.yaml", overrides: Mapping[str, Any] | None = None, *, env: str | None = None
) -> Config:
    """Load routes.yaml (plus the overlay of ``env``, or of ``SLUICE_ENV``) and its channels.

    ``overrides`` (from CLI flags) and ``SLUICE_STORE``, ``SLUICE_HOST``, ``SLUICE_PORT``,
    ``SLUICE_LOG_FORMAT``, ``SLUICE_LOG_LEVEL``, ``SLUICE_NODE_ID`` win over the file.
    ``host``/``port`` overrides apply to the first channel (the demo case).
    """
    p = Path(path)
    file = str(p)
    if not p.exists():
        raise ConfigError(
            "config file not found", file=file, hint="run sluice from the project folder or pass --config"
        )
    base = p.resolve().parent
    env_name = (env if env is not None else os.environ.get(ENV_PREFIX + "ENV")) or None
    sec = _Section(_with_overlay(p, env_name), file if not env_name else f"{file} + {env_name} overlay", "")
    environ = os.environ
    ov = dict(overrides or {})
    file_store = sec.text("store", "sqlite:///var/sluice.db")
    store_url = ov.get("store") or environ.get(ENV_PREFIX + "STORE") or file_store
    store_url = _resolve_sqlite(store_url, base)
    store_encryption = _store_encryption(sec.sub("store_encryption"), base)
    dsec = sec.sub("destinations")
    destinations: dict[str, DestinationConfig] = {}
    for name in list(dsec.data):
        destinations[str(name)] = _destination(str(name), dsec.sub(str(name)))
    dsec.used.update(dsec.data)
    lsec = sec.sub("logging")
    file_format = lsec.text("format", "auto", choices=("auto", "json", "console"))
    file_level = lsec.text("level", "info")
    logging = LoggingConfig(
        format=environ.get(ENV_PREFIX + "LOG_FORMAT") or file_format,
        level=environ.get(ENV_PREFIX + "LOG_LEVEL") or file_level,
        flood=_log_flood(lsec.sub("flood")),
    )
    lsec.done()
    limits = _limits(sec.sub("limits"))
    admin = _admin(sec.sub("admin"), base, ov.get("admin_port") or environ.get(ENV_PREFIX + "ADMIN_PORT"))
    plugin_paths = tuple((base / str(x)).resolve() for x in sec.items("plugin_paths"))
    plugins = tuple(str(x) for x in sec.items("plugins"))
    patterns = sec.get("channels", "channels/*.yaml")
    if isinstance(patterns, str):
        patterns = [patterns]
    files: list[Path] = []
    for pat in patterns:
        matched = sorted(glob.glob(str(base / str(pat))))
        files.extend(Path(m) for m in matched if not m.endswith("_test.yaml"))
    psec = sec.sub("processing")
    default_workers = max(1, os.cpu_count() or 1)  # niced: they use the CPU the listener leaves
    workers = psec.integer("workers", default_workers)
    psec.done()
    if workers < 0:
        raise ConfigError("processing.workers must be 0 or more", file=file, key="processing.workers")
    pid_text = sec.text("pid_file", "var/sluice.pid")
    pid_file = str((base / pid_text).resolve()) if pid_text else None
    file_node = sec.text("node_id", "node-1")
    node_id = environ.get(ENV_PREFIX + "NODE_ID") or file_node
    alerts_sec = sec.sub("alerts")  # read once the channels are known (rules name them)
    channel_overrides = sec.get("channel_overrides") or {}
    if not isinstance(channel_overrides, Mapping) or not all(
        isinstance(v, Mapping) for v in channel_overrides.values()
    ):
        raise ConfigError(
            "expected a mapping of channel name → channel settings",
            file=sec.file,
            key="channel_overrides",
            hint="e.g. channel_overrides: {adt: {source: {port: 2600}}}",
        )
    sec.done()
    channels = [load_channel(f, destinations, channel_overrides) for f in files]
    channels = [replace(ch, files=referenced_files(ch.transform, base)) for ch in channels]
    unknown = sorted(set(map(str, channel_overrides)) - {c.name for c in channels})
    if unknown:
        raise ConfigError(
            f"channel_overrides names no channel {unknown[0]!r}",
            file=sec.file,
            key=f"channel_overrides.{unknown[0]}",
            hint=f"known channels: {', '.join(c.name for c in channels)}",
        )
    if not channels:
        raise ConfigError(
            f"no channel files match {patterns}", file=file, key="channels", hint="add channels/<name>.yaml"
        )
    names = [c.name for c in channels]
    for n in names:
        if names.count(n) > 1:
            raise ConfigError(
                f"two channels are named {n!r}",
                file=file,
                key="channels",
                hint="channel names must be unique",
            )
    host = ov.get("host") or environ.get(ENV_PREFIX + "HOST")
    port = ov.get("port") or environ.get(ENV_PREFIX + "PORT")
    if host or port:
        first = channels[0]
        src = replace(
            first.source, host=host or first.source.host, port=int(port) if port else first.source.port
        )
        channels[0] = replace(first, source=src)
    ports = [(c.source.host, c.source.port) for c in channels if c.enabled and c.source.port]
    for hp in ports:
        if ports.count(hp) > 1:
            raise ConfigError(
                f"two channels listen on {hp[0]}:{hp[1]}", file=file, hint="give each channel its own port"
            )
    return Config(
        file=file,
        base_dir=base,
        store_url=store_url,
        channels=tuple(channels),
        destinations=destinations,
        logging=logging,
        admin=admin,
        plugin_paths=plugin_paths,
        plugins=plugins,
        node_id=node_id,
        processing_workers=int(environ.get(ENV_PREFIX + "PROCESSING_WORKERS") or workers),
        alerts=parse_alerts(alerts_sec, channels, destinations),
        limits=limits,
        store_encryption=store_encryption,
        pid_file=pid_file,
        overrides=ov,
        env=env_name,
    )


def _with_overlay(path: Path, env: str | None) -> Any:
    """routes.yaml's data, with ``routes.<env>.yaml`` deep-merged over it when ``env`` is given."""
    data = _read_yaml(path)
    if not env:
        return data
    if not overlays.valid_env(env):
        raise ConfigError(
            f"environment name {env!r} is not usable",
            key="env",
            hint="use letters, digits, '-' and '_' (e.g. prod); check --env or SLUICE_ENV",
        )
    op = overlays.overlay_path(path, env)
    if not op.exists():
        raise ConfigError(
            f"no overlay file for environment {env!r}",
            file=str(op),
            hint=f"create {op.name} beside {path.name}, or check --env / SLUICE_ENV",
        )
    overlay = _read_yaml(op)
    if overlay is not None and not isinstance(overlay, Mapping):
        raise ConfigError(f"expected a mapping, got {type(overlay).__name__}", file=str(op))
    return overlays.deep_merge(data or {}, overlay or {})


def _store_encryption(sec: _Section, base: Path) -> StoreEncryptionConfig | None:
    """``store_encryption: {key_file: PATH}`` or ``{env: NAME}``; absent or empty: off.

    Only the shape is checked here; the keys are read when the store is opened (``keyring.from_config``).
    """
    key_file, env = sec.text("key_file"), sec.text("env")
    sec.done()
    if not sec.data:
        return None
    if bool(key_file) == bool(env):
        raise ConfigError(
            "store_encryption needs exactly one of key_file and env",
            file=sec.file,
            key="store_encryption",
            hint="key_file: a key ring made by `sluice keys create --out PATH`; env: a variable holding one",
        )
    if key_file:
        return StoreEncryptionConfig(key_file=str((base / key_file).resolve()))
    return StoreEncryptionConfig(env=env)


def _resolve_sqlite(url: str, base: Path) -> str:
    """Relative SQLite paths are relative to routes.yaml's folder."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        return prefix + str((base / url[len(prefix) :]).resolve())
    return url
