"""A channel's ``source:``: the MLLP listener (with TLS), a ``fhir-poll`` source, an ``http`` source."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from engine.config import reader
from engine.config.model import SOURCE_KINDS, FhirPollConfig, HttpSourceConfig, SourceConfig, TLSConfig
from engine.config.reader import _Section
from engine.errors import ConfigError


def _check_tls_file(t: _Section, k: str) -> None:
    """A listener's TLS file must exist when the config is checked, not only when the listener starts
    (``sluice check`` would pass and ``sluice run`` fail with a bare "No such file or directory")."""
    p = t.data.get(k)
    # the schema's examples (engine/schema.py) name no real files
    if reader.RECORDER is not None or p is None or Path(str(p)).is_file():
        return
    where = Path(str(p))
    raise ConfigError(
        f"file {str(p)!r} not found" + ("" if where.is_absolute() else f" (looked in {Path.cwd()})"),
        file=t.file,
        key=t.key(k),
        hint="give the path of the PEM file; a relative path is read from the directory the engine runs in",
    )


def _check_port(sec: _Section, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(
            f"port {port} is out of range",
            file=sec.file,
            key=sec.key("port"),
            hint="use a port from 1 to 65535 (0: any free port)",
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
    _check_port(sec, src.port)
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
    _check_port(sec, src.port)
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
