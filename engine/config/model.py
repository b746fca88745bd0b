"""The frozen config types a loaded configuration is made of, and the defaults they share.

Pure data: the readers that build them live beside this module (``reader``, ``sources``, ``channels``,
``destinations``, ``admin``, ``settings``, ``loader``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.alerts.config import AlertsConfig
from engine.errors import ConfigError
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
