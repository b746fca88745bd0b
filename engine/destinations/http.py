"""HTTP webhook destination (kind ``http``) and the HTTP rules shared with the FHIR destination.

Status rules (same for ``fhir``): 2xx delivered; 429/503 retryable honouring ``Retry-After``; 408/409/412/425
and other 5xx retryable; timeouts and connection errors retryable; any other 4xx (and 3xx) is a
:class:`PermanentDeliveryError` whose text carries the server's OperationOutcome diagnostics (or the start of
its error body), so the dead-letter reason says what to fix.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import ssl
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from engine import exactjson
from engine.destinations.base import (
    CONTENT_FHIR,
    CONTENT_HL7,
    CONTENT_JSON,
    Destination,
    DestinationContext,
    Outbound,
    secret,
)
from engine.errors import ConfigError, DeliveryError, PermanentDeliveryError
from engine.ratelimit import Limiter
from engine.registry import destination

RETRYABLE_4XX = frozenset({408, 409, 412, 425, 429})
REASON_MAX = 1000  # cap on the text carried into a dead-letter reason
USER_AGENT = "sluice"


# --------------------------------------------------------------------------- shared helpers


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` (delta-seconds or HTTP-date) → seconds from now (>= 0), or None if absent/unparseable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def operation_outcome_text(data: Any) -> str | None:
    """The issues of an OperationOutcome as ``severity code: diagnostics (at expression)``, joined by ``; ``."""
    if not isinstance(data, Mapping) or data.get("resourceType") != "OperationOutcome":
        return None
    parts: list[str] = []
    for issue in data.get("issue") or []:
        if not isinstance(issue, Mapping):
            continue
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or ""
        where = issue.get("expression") or issue.get("location") or []
        piece = f"{issue.get('severity', 'error')} {issue.get('code', '?')}: {text}".rstrip(": ")
        if where:
            piece += f" (at {', '.join(str(w) for w in where)})"
        parts.append(piece)
    return "; ".join(parts) if parts else None


def error_body_text(body: bytes) -> str:
    """What to quote from an error response: OperationOutcome diagnostics, else the start of the body."""
    if not body:
        return "empty body"
    try:
        oo = operation_outcome_text(orjson.loads(body))
    except orjson.JSONDecodeError:
        oo = None
    if oo:
        return _cap(oo)
    text = re.sub(r"\s+", " ", body[:300].decode("utf-8", "replace")).strip()
    return _cap(f"body: {text}")


def _cap(text: str) -> str:
    return text if len(text) <= REASON_MAX else text[: REASON_MAX - 3] + "..."


def status_category(status: int) -> str:
    """The rejection class (``engine.errors.REJECTION_CLASSES``) of a non-2xx HTTP status.

    400/422 (and other 4xx) validation, 401/403/407 auth, 429/503/425 throttling, 409/412 conflict,
    408 network (the server gave up waiting for the request), other 5xx and 3xx server.
    """
    if status in (429, 503, 425):
        return "throttling"
    if status in (409, 412):
        return "conflict"
    if status in (401, 403, 407):
        return "auth"
    if status == 408:
        return "network"
    if 400 <= status < 500:
        return "validation"
    return "server"


def status_error(status: int, reason: str, *, what: str, retry_after: float | None = None) -> DeliveryError:
    """The DeliveryError for a non-2xx ``status``; ``reason`` is the already-extracted server text."""
    head = f"{what}: HTTP {status}"
    category = status_category(status)
    if status in (429, 503):
        hint = f"; retry after {retry_after:g}s" if retry_after is not None else ""
        return DeliveryError(
            f"{head} (server busy{hint}): {reason}",
            retryable=True,
            retry_after=retry_after,
            category=category,
        )
    if status in (409, 412):
        return DeliveryError(
            f"{head} (version conflict, will retry): {reason}",
            retryable=True,
            retry_after=retry_after,
            category=category,
        )
    if status in RETRYABLE_4XX or status >= 500:
        return DeliveryError(
            f"{head} (will retry): {reason}", retryable=True, retry_after=retry_after, category=category
        )
    if status in (401, 403):
        return PermanentDeliveryError(
            f"{head} (not authorised: check the destination's credentials/auth settings, then replay): {reason}",
            category=category,
        )
    if 300 <= status < 400:
        return PermanentDeliveryError(
            f"{head} (redirected: point the destination's URL at the final address, then replay): {reason}",
            category=category,
        )
    return PermanentDeliveryError(
        f"{head} (rejected; fix the message or mapping, then replay): {reason}", category=category
    )


def response_error(resp: httpx.Response, *, what: str) -> DeliveryError:
    return status_error(
        resp.status_code,
        error_body_text(resp.content),
        what=what,
        retry_after=parse_retry_after(resp.headers.get("retry-after")),
    )


# What a request can raise short of a response: httpx's own errors, and TLS alerts (e.g. a server
# that requires a client certificate says so only after the handshake) that can surface raw.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (httpx.HTTPError, OSError)


def transport_error(exc: BaseException, *, what: str) -> DeliveryError:
    """Timeouts, refused/reset connections, TLS and protocol errors → retryable."""
    if isinstance(exc, httpx.TimeoutException):
        kind = type(exc).__name__  # ConnectTimeout / ReadTimeout / WriteTimeout / PoolTimeout
        return DeliveryError(f"{what}: timed out ({kind}); will retry", retryable=True, category="network")
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return DeliveryError(
            f"{what}: TLS certificate verification failed ({exc}); if the server uses a private CA set "
            "tls.ca_file, will retry",
            retryable=True,
            category="network",
        )
    if "CERTIFICATE_REQUIRED" in str(exc):
        return DeliveryError(
            f"{what}: the server requires a client certificate ({exc}); set auth type mtls with cert "
            "and key, will retry",
            retryable=True,
            category="network",
        )
    if isinstance(exc, httpx.ConnectError):
        return DeliveryError(
            f"{what}: cannot connect ({exc}); will retry", retryable=True, category="network"
        )
    return DeliveryError(
        f"{what}: {type(exc).__name__} ({exc}); will retry", retryable=True, category="network"
    )


def build_ssl_context(tls: Any, *, ctx: DestinationContext, key: str) -> ssl.SSLContext:
    """``tls: {verify: true, ca_file: path, cert: path, key: path}`` → an SSLContext (verification on by default)."""
    if tls is None:
        tls = {}
    if not isinstance(tls, Mapping):
        raise ConfigError(
            "tls must be a mapping", file=ctx.config_file, key=key, hint="{verify: true, ca_file: ...}"
        )
    unknown = sorted(set(tls) - {"verify", "ca_file", "cert", "key"})
    if unknown:
        raise ConfigError(
            f"unknown tls option(s) {', '.join(unknown)}",
            file=ctx.config_file,
            key=key,
            hint="allowed: verify, ca_file, cert, key",
        )

    def path(name: str) -> str | None:
        v = tls.get(name)
        if not v:
            return None
        p = Path(str(v))
        p = p if p.is_absolute() else ctx.base_dir / p
        if not p.is_file():
            raise ConfigError(
                f"tls {name} file {p} does not exist", file=ctx.config_file, key=f"{key}.{name}"
            )
        return str(p)

    try:
        sslctx = ssl.create_default_context(cafile=path("ca_file"))
        cert, keyfile = path("cert"), path("key")
        if cert:
            sslctx.load_cert_chain(cert, keyfile)
        elif keyfile:
            raise ConfigError("tls key given without cert", file=ctx.config_file, key=f"{key}.cert")
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load TLS files: {exc}", file=ctx.config_file, key=key) from exc
    if tls.get("verify", True) is False:
        sslctx.check_hostname = False
        sslctx.verify_mode = ssl.CERT_NONE
    return sslctx


def resolve_headers(spec: Any, *, ctx: DestinationContext, key: str) -> dict[str, str]:
    """Extra headers: plain strings, or ``{env: NAME}`` / ``{file: path}`` for secret values.

    Credential-looking headers (Authorization, *token*, *key*, *secret*) must come from a secret.
    """
    if not spec:
        return {}
    if not isinstance(spec, Mapping):
        raise ConfigError("headers must be a mapping of name: value", file=ctx.config_file, key=key)
    out: dict[str, str] = {}
    for name, value in spec.items():
        hkey = f"{key}.{name}"
        if isinstance(value, Mapping):
            out[str(name)] = secret(value, what=f"header {name}", ctx=ctx, key=hkey)
        elif isinstance(value, str | int | float) and not isinstance(value, bool):
            low = str(name).lower()
            if low in ("authorization", "proxy-authorization") or any(
                w in low for w in ("token", "secret", "api-key", "apikey")
            ):
                raise ConfigError(
                    f"header {name} looks like a credential and must not be written in the YAML",
                    file=ctx.config_file,
                    key=hkey,
                    hint="write {env: VARIABLE_NAME} or {file: /run/secrets/name}",
                )
            out[str(name)] = str(value)
        else:
            raise ConfigError(f"header {name} must be a string or a secret", file=ctx.config_file, key=hkey)
    return out


def render_body(item: Outbound, payload: str) -> tuple[bytes, str]:
    """``fhir`` = the channel's output as is; ``hl7`` = the raw HL7 v2 bytes; ``both`` = a JSON envelope."""
    if payload == "fhir":
        return item.payload, item.content_type or CONTENT_JSON
    if payload == "hl7":
        return item.raw, CONTENT_HL7
    try:
        hl7_text, encoding = item.raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        hl7_text, encoding = item.raw.decode("latin-1"), "latin-1"
    if item.content_type.startswith((CONTENT_FHIR, CONTENT_JSON)):
        try:
            out: Any = exactjson.loads(item.payload)  # long decimals keep their digits
        except orjson.JSONDecodeError as exc:
            raise PermanentDeliveryError(
                f"payload says {item.content_type} but is not JSON ({exc}); check the channel's transform",
                category="validation",
            ) from exc
    else:
        out = item.payload.decode("utf-8", "replace")
    envelope = {
        "message_id": item.message_id,
        "channel": item.channel,
        "control_id": item.control_id,
        "message_type": item.message_type,
        "trigger": item.trigger,
        "hl7": hl7_text,
        "hl7_encoding": encoding,
        "content_type": item.content_type,
        "payload": out,
    }
    return orjson.dumps(envelope), CONTENT_JSON


def check_choice(value: Any, choices: tuple[str, ...], *, ctx: DestinationContext, key: str) -> str:
    if value not in choices:
        raise ConfigError(
            f"{value!r} is not one of {', '.join(choices)}",
            file=ctx.config_file,
            key=key,
            hint=f"use one of {choices}",
        )
    return str(value)


def check_positive(value: Any, *, ctx: DestinationContext, key: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"must be a number of seconds > 0, not {value!r}", file=ctx.config_file, key=key)
    return float(value)


def sign(body: bytes, key: bytes) -> str:
    """The ``X-Sluice-Signature`` value: ``sha256=<hex HMAC-SHA256 of the body>``."""
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def make_client(
    timeout: float, ssl: Any, concurrency: int, headers: dict[str, str] | None = None
) -> httpx.AsyncClient:
    """A pooled keep-alive client sized to the destination's concurrency (10 when unlimited)."""
    n = concurrency or 10
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        verify=ssl,
        limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
        headers={"User-Agent": USER_AGENT, **(headers or {})},
        follow_redirects=False,
    )


# --------------------------------------------------------------------------- the http destination


@destination("http")
class HttpDestination(Destination):
    """POST (or PUT) the item to a webhook URL; optional HMAC-SHA256 body signature."""

    kind = "http"
    options = {
        "url": None,
        "method": "POST",
        "payload": "fhir",  # fhir (the channel's output) | hl7 (raw v2) | both (JSON envelope)
        "headers": {},
        "signing_secret": {},  # {env: NAME} | {file: path}; empty = no signature
        "signature_header": "X-Sluice-Signature",
        "timeout": 30.0,
        "concurrency": 4,
        "rate_limit": 0,
        "tls": {},
    }

    def __init__(self, name: str, options: Mapping[str, Any], ctx: DestinationContext) -> None:
        super().__init__(name, options, ctx)
        key = f"destinations.{name}"
        url = self.opts["url"]
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(
                "url must be an http:// or https:// URL", file=ctx.config_file, key=f"{key}.url"
            )
        self.url = url
        self.method = check_choice(
            str(self.opts["method"]).upper(), ("POST", "PUT"), ctx=ctx, key=f"{key}.method"
        )
        self.payload = check_choice(
            self.opts["payload"], ("fhir", "hl7", "both"), ctx=ctx, key=f"{key}.payload"
        )
        self.headers = resolve_headers(self.opts["headers"], ctx=ctx, key=f"{key}.headers")
        self.signing_key: bytes | None = None
        if self.opts["signing_secret"]:
            self.signing_key = secret(
                self.opts["signing_secret"], what="signing_secret", ctx=ctx, key=f"{key}.signing_secret"
            ).encode()
        self.signature_header = str(self.opts["signature_header"])
        self.timeout = check_positive(self.opts["timeout"], ctx=ctx, key=f"{key}.timeout")
        self.limiter = Limiter.from_options(self.opts, config_file=ctx.config_file, key=key)
        self.ssl = build_ssl_context(self.opts["tls"], ctx=ctx, key=f"{key}.tls")
        self.client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        if self.client is None:
            self.client = make_client(self.timeout, self.ssl, self.limiter.concurrency)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def deliver(self, item: Outbound) -> str:
        if self.client is None:
            await self.start()
        assert self.client is not None
        body, content_type = render_body(item, self.payload)
        headers = {
            **self.headers,
            "Content-Type": content_type,
            "X-Sluice-Message-Id": str(item.message_id),
            "X-Sluice-Channel": item.channel,
            "X-Sluice-Control-Id": item.control_id,
            "X-Sluice-Message-Type": f"{item.message_type}^{item.trigger}",
            "X-Sluice-Attempt": str(item.attempt),
            "Idempotency-Key": f"sluice-{item.channel}-{item.message_id}",
        }
        if self.signing_key is not None:
            headers[self.signature_header] = sign(body, self.signing_key)
        what = f"{self.name} {self.method}"
        async with self.limiter.slot():
            await self.limiter.request()
            try:
                resp = await self.client.request(self.method, self.url, content=body, headers=headers)
            except TRANSPORT_ERRORS as exc:
                raise transport_error(exc, what=what) from exc
        if not 200 <= resp.status_code < 300:
            raise response_error(resp, what=what)
        return f"HTTP {resp.status_code}"
