"""FHIR server destination (kind ``fhir``): a pooled keep-alive httpx client.

Modes: ``transaction`` (POST the Bundle to the base; default), ``batch`` (same bundle as type batch;
references between entries must be resolvable to literal ids), ``per-resource`` (each entry's own request,
conditional PUT / POST with If-None-Exist, in dependency order, rewriting urn:uuid references to the ids the
server assigned).  Replays are safe as long as the mapping uses conditional requests or deterministic ids.

Auth: none | bearer | basic | oauth2 (client credentials; token cached, refreshed before expiry, one refresh
on 401) | mtls (client cert/key).  TLS verification is on by default; ``tls.ca_file`` for a private CA.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from engine.destinations.base import CONTENT_FHIR, Destination, DestinationContext, Outbound, secret
from engine.destinations.http import (
    TRANSPORT_ERRORS,
    build_ssl_context,
    check_choice,
    check_positive,
    make_client,
    operation_outcome_text,
    resolve_headers,
    response_error,
    status_error,
    transport_error,
)
from engine.errors import ConfigError, DeliveryError, PermanentDeliveryError
from engine.ratelimit import Limiter
from engine.registry import destination

MODES = ("transaction", "batch", "per-resource")
AUTH_TYPES = ("none", "bearer", "basic", "oauth2", "mtls")
FHIR_HEADERS = {"Accept": CONTENT_FHIR, "Content-Type": CONTENT_FHIR}


class _Auth:
    """Adds credentials to requests; ``oauth2`` keeps a cached token.

    ``clock`` (monotonic seconds) times the token's lifetime; a test sets a fake one to expire it.
    """

    def __init__(self, spec: Any, *, ctx: DestinationContext, key: str) -> None:
        spec = dict(spec or {})
        self.type = check_choice(spec.pop("type", "none"), AUTH_TYPES, ctx=ctx, key=f"{key}.type")
        allowed: dict[str, set[str]] = {
            "none": set(),
            "bearer": {"token"},
            "basic": {"username", "password"},
            "oauth2": {"token_url", "client_id", "client_secret", "scope", "client_auth", "refresh_margin"},
            "mtls": {"cert", "key"},
        }
        unknown = sorted(set(spec) - allowed[self.type])
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)} for auth type {self.type}",
                file=ctx.config_file,
                key=key,
                hint=f"allowed: type, {', '.join(sorted(allowed[self.type])) or '(nothing else)'}",
            )

        def need(name: str) -> Any:
            if not spec.get(name):
                raise ConfigError(
                    f"auth type {self.type} needs {name}", file=ctx.config_file, key=f"{key}.{name}"
                )
            return spec[name]

        def plain_or_secret(name: str) -> str:
            v = need(name)
            return v if isinstance(v, str) else secret(v, what=f"auth {name}", ctx=ctx, key=f"{key}.{name}")

        self.header: str | None = None
        self.tls: dict[str, Any] = {}
        self.token_url = ""
        self.client_id = self.client_secret = self.scope = ""
        self.client_auth = "basic"
        self.refresh_margin = 60.0
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self.clock: Callable[[], float] = time.monotonic
        self.token_fetches = 0
        if self.type == "bearer":
            self.header = "Bearer " + secret(need("token"), what="auth token", ctx=ctx, key=f"{key}.token")
        elif self.type == "basic":
            user = plain_or_secret("username")
            pw = secret(need("password"), what="auth password", ctx=ctx, key=f"{key}.password")
            self.header = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
        elif self.type == "oauth2":
            self.token_url = str(need("token_url"))
            self.client_id = plain_or_secret("client_id")
            self.client_secret = secret(
                need("client_secret"), what="oauth2 client_secret", ctx=ctx, key=f"{key}.client_secret"
            )
            self.scope = str(spec.get("scope") or "")
            self.client_auth = check_choice(
                spec.get("client_auth", "basic"), ("basic", "post"), ctx=ctx, key=f"{key}.client_auth"
            )
            self.refresh_margin = float(spec.get("refresh_margin", 60))
        elif self.type == "mtls":
            self.tls = {"cert": need("cert"), "key": need("key")}

    def invalidate(self) -> None:
        self._token = None
        self._expires_at = 0.0

    async def headers(self, client: httpx.AsyncClient, what: str) -> dict[str, str]:
        if self.type == "oauth2":
            return {"Authorization": "Bearer " + await self._oauth_token(client, what)}
        return {"Authorization": self.header} if self.header else {}

    async def _oauth_token(self, client: httpx.AsyncClient, what: str) -> str:
        async with self._lock:
            if self._token is not None and self.clock() < self._expires_at:
                return self._token
            form = {"grant_type": "client_credentials"}
            if self.scope:
                form["scope"] = self.scope
            hdrs = {"Accept": "application/json"}
            if self.client_auth == "basic":
                cred = (quote(self.client_id, safe="") + ":" + quote(self.client_secret, safe="")).encode()
                hdrs["Authorization"] = "Basic " + base64.b64encode(cred).decode()
            else:
                form |= {"client_id": self.client_id, "client_secret": self.client_secret}
            what = f"{what} oauth2 token request"
            try:
                resp = await client.post(self.token_url, data=form, headers=hdrs)
            except TRANSPORT_ERRORS as exc:
                raise transport_error(exc, what=what) from exc
            if resp.status_code != 200:
                err = response_error(resp, what=what)
                if err.retryable:
                    raise err
                raise PermanentDeliveryError(
                    f"{err.message} (check auth.client_id/client_secret/scope)", category="auth"
                )
            try:
                data = orjson.loads(resp.content)
                token = str(data["access_token"])
                lifetime = float(data.get("expires_in") or 300)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise DeliveryError(
                    f"{what}: token response without access_token ({exc})", retryable=True, category="auth"
                ) from exc
            self.token_fetches += 1
            margin = min(self.refresh_margin, lifetime / 10)
            self._token, self._expires_at = token, self.clock() + lifetime - margin
            return token


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                yield v
            else:
                yield from _references(v)
    elif isinstance(node, list):
        for v in node:
            yield from _references(v)


def _rewrite(node: Any, mapping: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        return {
            k: (mapping.get(v, v) if k == "reference" and isinstance(v, str) else _rewrite(v, mapping))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rewrite(v, mapping) for v in node]
    return node


def dependency_order(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DELETEs first (FHIR transaction order), then entries so that each comes after the entries it references.

    Stable: otherwise keeps bundle order.  A reference cycle is a PermanentDeliveryError.
    """
    deletes = [e for e in entries if (e.get("request") or {}).get("method", "").upper() == "DELETE"]
    rest = [e for e in entries if e not in deletes]
    by_url = {e["fullUrl"]: i for i, e in enumerate(rest) if e.get("fullUrl")}
    deps = [
        {by_url[r] for r in _references(e.get("resource")) if r in by_url and by_url[r] != i}
        for i, e in enumerate(rest)
    ]
    done: set[int] = set()
    order: list[dict[str, Any]] = []
    while len(done) < len(rest):
        ready = [i for i in range(len(rest)) if i not in done and deps[i] <= done]
        if not ready:
            types = sorted(
                {
                    rest[i].get("resource", {}).get("resourceType", "?")
                    for i in range(len(rest))
                    if i not in done
                }
            )
            raise PermanentDeliveryError(
                f"per-resource mode: circular references between bundle entries ({', '.join(types)}); "
                "use mode transaction for this channel",
                category="validation",
            )
        done.add(ready[0])
        order.append(rest[ready[0]])
    return deletes + order


# A conditional write (PUT Type?search, POST with ifNoneExist) whose search matched more than one
# resource: FHIR's OperationOutcome issue code ``multiple-matches`` (Medplum, 412), HAPI's "matched N
# resources", Medplum's transaction pre-check "Conditional PUT matched multiple resources".
_MULTIPLE_MATCHES = re.compile(
    r"multiple-matches|matched multiple resources|multiple resources (?:found|match)"
    r"|match(?:ed|es)? \d+ resources|more than one resource",
    re.IGNORECASE,
)
_ENTRY_AT = re.compile(r"Bundle\.entry\[(\d+)\]")
_MATCH_URL = re.compile(r"\b([A-Z][A-Za-z]+)\?[A-Za-z_:.-]+=")


def _entry_type(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return None
    rtype = (entry.get("resource") or {}).get("resourceType")
    if rtype:
        return str(rtype)
    url = str((entry.get("request") or {}).get("url") or "")
    return url.split("?")[0].split("/")[0] or None


def mark_multiple_match(
    err: DeliveryError, *, resource_type: str | None = None, entries: list[Any] | None = None
) -> DeliveryError:
    """If the server said a conditional write matched several resources: class ``conflict`` and
    ``match_failure`` = the resource type (from ``resource_type``, the entry the server points at, or the
    match URL it quotes); a ``Patient`` there is counted as a patient match failure."""
    if not _MULTIPLE_MATCHES.search(err.message):
        return err
    rtype = resource_type
    if rtype is None:
        at = _ENTRY_AT.search(err.message)
        if at is not None and entries is not None and int(at.group(1)) < len(entries):
            rtype = _entry_type(entries[int(at.group(1))])
        else:
            url = _MATCH_URL.search(err.message)
            rtype = url.group(1) if url is not None else None
    err.category = "conflict"
    err.match_failure = rtype
    return err


def _status_code(status: Any) -> int:
    try:
        return int(str(status).strip().split()[0])
    except (ValueError, IndexError):
        return 0


def _ref_from_location(location: str) -> str | None:
    """``[base/]Type/id[/_history/v]`` → ``Type/id``."""
    parts = [p for p in location.split("?")[0].split("/") if p]
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return f"{parts[-2]}/{parts[-1]}" if len(parts) >= 2 else None


@destination("fhir")
class FhirDestination(Destination):
    kind = "fhir"
    options = {
        "base_url": None,
        "mode": "transaction",
        "auth": {},
        "tls": {},
        "timeout": 30.0,
        "concurrency": 4,
        "rate_limit": 0,
        "headers": {},
    }

    def __init__(self, name: str, options: Mapping[str, Any], ctx: DestinationContext) -> None:
        super().__init__(name, options, ctx)
        key = f"destinations.{name}"
        base = self.opts["base_url"]
        if not isinstance(base, str) or not base.startswith(("http://", "https://")):
            raise ConfigError(
                "base_url must be the server's FHIR base, an http:// or https:// URL",
                file=ctx.config_file,
                key=f"{key}.base_url",
                hint="e.g. https://ehr.example.org/fhir/R4",
            )
        self.base_url = base.rstrip("/")
        self.mode = check_choice(self.opts["mode"], MODES, ctx=ctx, key=f"{key}.mode")
        if self.opts["auth"] and not isinstance(self.opts["auth"], Mapping):
            raise ConfigError("auth must be a mapping with a type", file=ctx.config_file, key=f"{key}.auth")
        self.auth = _Auth(self.opts["auth"], ctx=ctx, key=f"{key}.auth")
        tls = dict(self.opts["tls"] or {})
        if self.auth.tls:
            if tls.get("cert") or tls.get("key"):
                raise ConfigError(
                    "client certificate given twice (auth type mtls and tls.cert/key)",
                    file=ctx.config_file,
                    key=f"{key}.tls",
                )
            tls |= self.auth.tls
        self.ssl = build_ssl_context(tls, ctx=ctx, key=f"{key}.tls")
        self.timeout = check_positive(self.opts["timeout"], ctx=ctx, key=f"{key}.timeout")
        self.limiter = Limiter.from_options(self.opts, config_file=ctx.config_file, key=key)
        self.extra_headers = resolve_headers(self.opts["headers"], ctx=ctx, key=f"{key}.headers")
        self.client: httpx.AsyncClient | None = None
        self.requests_sent = 0

    async def start(self) -> None:
        if self.client is None:
            self.client = make_client(self.timeout, self.ssl, self.limiter.concurrency, self.extra_headers)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    # ------------------------------------------------------------------ delivery

    async def deliver(self, item: Outbound) -> str:
        if self.client is None:
            await self.start()
        bundle = self._bundle(item)
        async with self.limiter.slot():
            if self.mode == "per-resource":
                return await self._per_resource(bundle)
            return await self._bundle_post(bundle)

    def _bundle(self, item: Outbound) -> dict[str, Any]:
        try:
            bundle = orjson.loads(item.payload)
        except orjson.JSONDecodeError as exc:
            raise PermanentDeliveryError(
                f"payload is not FHIR JSON ({exc}); the channel's transform must produce a transaction Bundle",
                category="validation",
            ) from exc
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise PermanentDeliveryError(
                "payload is not a FHIR Bundle; the channel's transform must produce a transaction Bundle",
                category="validation",
            )
        if bundle.get("type") not in ("transaction", "batch"):
            raise PermanentDeliveryError(
                f"payload is a {bundle.get('type')!r} Bundle, not a transaction; fix the channel's transform",
                category="validation",
            )
        for n, entry in enumerate(bundle.get("entry") or []):
            req = entry.get("request") if isinstance(entry, dict) else None
            if not isinstance(req, dict) or not req.get("method") or not req.get("url"):
                raise PermanentDeliveryError(
                    f"bundle entry {n} has no request method/url; fix the channel's transform",
                    category="validation",
                )
        return bundle

    async def _send(
        self, method: str, url: str, *, body: Any = None, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        """One request with auth, rate limit and at most one token refresh on 401."""
        assert self.client is not None
        content = orjson.dumps(body) if body is not None else None
        what = f"{self.name} {method} {url.split('?')[0] if url else '/'}"
        full = f"{self.base_url}/{url}" if url else self.base_url
        for attempt in (1, 2):
            await self.limiter.request()
            hdrs = {**FHIR_HEADERS, **(headers or {}), **await self.auth.headers(self.client, what)}
            try:
                self.requests_sent += 1
                resp = await self.client.request(method, full, content=content, headers=hdrs)
            except TRANSPORT_ERRORS as exc:
                raise transport_error(exc, what=what) from exc
            if resp.status_code == 401 and self.auth.type == "oauth2" and attempt == 1:
                self.auth.invalidate()
                continue
            return resp
        return resp

    async def _bundle_post(self, bundle: dict[str, Any]) -> str:
        entries = bundle.get("entry") or []
        bundle = self._as_batch(bundle) if self.mode == "batch" else {**bundle, "type": "transaction"}
        resp = await self._send("POST", "", body=bundle)
        what = f"{self.name} {self.mode}"
        if not 200 <= resp.status_code < 300:
            raise mark_multiple_match(response_error(resp, what=what), entries=entries)
        try:
            reply = orjson.loads(resp.content)
        except orjson.JSONDecodeError as exc:
            raise DeliveryError(
                f"{what}: HTTP {resp.status_code} but the body is not JSON ({exc})", category="server"
            ) from exc
        rentries = reply.get("entry") or [] if isinstance(reply, dict) else []
        if (
            not isinstance(reply, dict)
            or reply.get("resourceType") != "Bundle"
            or len(rentries) != len(entries)
        ):
            raise DeliveryError(
                f"{what}: HTTP {resp.status_code} but the response is not a {self.mode}-response Bundle "
                f"with {len(entries)} entries; delivery is unconfirmed, will retry",
                category="server",
            )
        failures: list[DeliveryError] = []
        counts: dict[int, int] = {}
        for n, (sent, got) in enumerate(zip(entries, rentries, strict=True)):
            r = (got or {}).get("response") or {}
            code = _status_code(r.get("status"))
            counts[code] = counts.get(code, 0) + 1
            if not 200 <= code < 300:
                rtype = (sent.get("resource") or {}).get("resourceType") or sent["request"]["url"].split("?")[
                    0
                ]
                reason = operation_outcome_text(r.get("outcome")) or f"status {r.get('status')!r}"
                err = status_error(code or 500, reason, what=f"{what} entry {n} ({rtype})")
                failures.append(mark_multiple_match(err, resource_type=_entry_type(sent)))
        if failures:
            raise self._combine(failures, what)
        tally = ", ".join(f"{c}x{k}" for k, c in sorted(counts.items()))
        return f"{self.mode} HTTP {resp.status_code}: {len(entries)} entries ({tally})"

    @staticmethod
    def _combine(failures: list[DeliveryError], what: str) -> DeliveryError:
        """Several failed entries: a permanent one wins (retrying cannot help); else retry, longest Retry-After."""
        text = "; ".join(f.message for f in failures)
        if len(text) > 1500:
            text = text[:1497] + "..."
        # The combined error's class and patient-match mark come from the entry that decides its fate.
        permanent = [f for f in failures if not f.retryable]
        first = (permanent or failures)[0]
        matched = next((f.match_failure for f in failures if f.match_failure), None)
        if permanent:
            return PermanentDeliveryError(
                f"{what}: {len(failures)} entr{'y' if len(failures) == 1 else 'ies'} failed: {text}",
                category=first.category,
                match_failure=matched,
            )
        hints = [f.retry_after for f in failures if f.retry_after is not None]
        return DeliveryError(
            f"{what}: {len(failures)} entries failed: {text}",
            retry_after=max(hints) if hints else None,
            category=first.category,
            match_failure=matched,
        )

    def _as_batch(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """Batch entries are independent: urn:uuid references must map to a literal ``Type/id`` PUT entry."""
        entries = bundle.get("entry") or []
        mapping: dict[str, str] = {}
        for e in entries:
            url, method = e["request"]["url"], e["request"]["method"].upper()
            if e.get("fullUrl") and method == "PUT" and "?" not in url and url.count("/") == 1:
                mapping[e["fullUrl"]] = url
        local = {e.get("fullUrl") for e in entries if e.get("fullUrl")}
        out = []
        for e in entries:
            res = _rewrite(e.get("resource"), mapping) if mapping else e.get("resource")
            dangling = [r for r in _references(res) if r in local]
            if dangling:
                rtype = (e.get("resource") or {}).get("resourceType", "?")
                raise PermanentDeliveryError(
                    f"batch mode: a {rtype} entry references another entry by {dangling[0].split(':')[0]}:... "
                    "that has no fixed id; batch entries cannot reference each other — use mode transaction "
                    "or per-resource for this destination",
                    category="validation",
                )
            out.append({**e, "resource": res} if "resource" in e else e)
        return {**bundle, "type": "batch", "entry": out}

    async def _per_resource(self, bundle: dict[str, Any]) -> str:
        mapping: dict[str, str] = {}
        counts: dict[int, int] = {}
        ordered = dependency_order(list(bundle.get("entry") or []))
        for n, entry in enumerate(ordered):
            req = entry["request"]
            method, url = req["method"].upper(), req["url"].lstrip("/")
            headers: dict[str, str] = {}
            for field, header in (
                ("ifNoneExist", "If-None-Exist"),
                ("ifMatch", "If-Match"),
                ("ifNoneMatch", "If-None-Match"),
                ("ifModifiedSince", "If-Modified-Since"),
            ):
                if req.get(field):
                    headers[header] = str(req[field])
            resource = entry.get("resource")
            if resource is not None and mapping:
                resource = _rewrite(resource, mapping)
            if resource is not None and method == "PUT" and "?" not in url and url.count("/") == 1:
                resource = {**copy.copy(resource), "id": url.split("/")[1]}
            rtype = (resource or {}).get("resourceType") or url.split("?")[0].split("/")[0]
            what = f"{self.name} per-resource {method} {rtype} (entry {n + 1}/{len(ordered)})"
            resp = await self._send(
                method, url, body=resource if method in ("PUT", "POST", "PATCH") else None, headers=headers
            )
            if not 200 <= resp.status_code < 300:
                raise mark_multiple_match(response_error(resp, what=what), resource_type=rtype)
            counts[resp.status_code] = counts.get(resp.status_code, 0) + 1
            if entry.get("fullUrl") and method in ("PUT", "POST"):
                ref = self._assigned_ref(resp)
                if ref is None:
                    raise DeliveryError(
                        f"{what}: HTTP {resp.status_code} without a Location header or resource id; "
                        "cannot resolve later references, will retry",
                        category="server",
                    )
                mapping[entry["fullUrl"]] = ref
        tally = ", ".join(f"{c}x{k}" for k, c in sorted(counts.items()))
        return f"per-resource: {len(ordered)} requests ({tally})"

    @staticmethod
    def _assigned_ref(resp: httpx.Response) -> str | None:
        loc = resp.headers.get("location") or resp.headers.get("content-location")
        if loc:
            ref = _ref_from_location(loc)
            if ref:
                return ref
        try:
            body = orjson.loads(resp.content) if resp.content else None
        except orjson.JSONDecodeError:
            return None
        if isinstance(body, dict) and body.get("resourceType") and body.get("id"):
            return f"{body['resourceType']}/{body['id']}"
        return None
