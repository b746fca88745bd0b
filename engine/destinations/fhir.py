"""FHIR server destination (kind ``fhir``): a pooled keep-alive httpx client.

Modes: ``transaction`` (POST the Bundle to the base; default; with ``max_transaction_entries`` a larger
Bundle is split into transactions of at most that many entries), ``batch`` (one batch per reference-dependency
level), ``per-resource`` (each entry's own request, conditional PUT / POST with If-None-Exist).  The plans
(order, chunks, two-phase writes of reference cycles) are in engine/destinations/fhir_plan.py; urn:uuid
references are rewritten to the ids the server assigned.  Replays are safe as long as the mapping uses
conditional requests or deterministic ids.

Auth: none | bearer | basic | oauth2 (client credentials; token cached, refreshed before expiry, one refresh
on 401) | smart-backend (SMART Backend Services: client credentials with a signed JWT client assertion,
engine/destinations/smart.py; cached and refreshed like oauth2) | mtls (client cert/key).  TLS verification
is on by default; ``tls.ca_file`` for a private CA.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from engine import exactjson
from engine.destinations import fhir_plan, smart
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
AUTH_TYPES = ("none", "bearer", "basic", "oauth2", "smart-backend", "mtls")
# A token from a token endpoint: cached, refreshed before expiry, fetched again once on a 401.
TOKEN_TYPES = ("oauth2", "smart-backend")
FHIR_HEADERS = {"Accept": CONTENT_FHIR, "Content-Type": CONTENT_FHIR}


class _Auth:
    """Adds credentials to requests; ``oauth2`` and ``smart-backend`` keep a cached token.

    ``clock`` (monotonic seconds) times the token's lifetime; a test sets a fake one to expire it.
    ``wall`` (Unix seconds) dates the SMART client assertion, which the token server checks.
    """

    def __init__(self, spec: Any, *, ctx: DestinationContext, key: str) -> None:
        spec = dict(spec or {})
        self.type = check_choice(spec.pop("type", "none"), AUTH_TYPES, ctx=ctx, key=f"{key}.type")
        allowed: dict[str, set[str]] = {
            "none": set(),
            "bearer": {"token"},
            "basic": {"username", "password"},
            "oauth2": {"token_url", "client_id", "client_secret", "scope", "client_auth", "refresh_margin"},
            "smart-backend": {
                "token_url",
                "client_id",
                "private_key",
                "alg",
                "kid",
                "scope",
                "refresh_margin",
            },
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
        self.wall: Callable[[], float] = time.time
        self.smart: smart.Client | None = None
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
        elif self.type == "smart-backend":
            self.token_url = str(need("token_url"))
            if not self.token_url.startswith(("http://", "https://")):
                raise ConfigError(
                    "token_url must be the server's token endpoint, an http:// or https:// URL",
                    file=ctx.config_file,
                    key=f"{key}.token_url",
                    hint="the token_endpoint of the server's .well-known/smart-configuration",
                )
            self.client_id = plain_or_secret("client_id")
            if not spec.get("scope"):
                raise ConfigError(
                    "auth type smart-backend needs scope (the SMART system scopes to ask for)",
                    file=ctx.config_file,
                    key=f"{key}.scope",
                    hint="e.g. scope: system/Patient.write system/Encounter.write (what the EHR granted "
                    "this client)",
                )
            self.scope = str(spec["scope"])
            pem = secret(
                need("private_key"), what="smart-backend private_key", ctx=ctx, key=f"{key}.private_key"
            )
            try:
                signing_key = smart.load_private_key(pem)
            except smart.SmartKeyError as exc:
                raise ConfigError(
                    f"smart-backend private_key: {exc}",
                    file=ctx.config_file,
                    key=f"{key}.private_key",
                    hint="an RSA (2048+ bits, alg RS384) or EC P-384 (alg ES384) PEM key, "
                    "as {file: /run/secrets/name}",
                ) from exc
            alg = spec.get("alg")
            if alg is not None:
                alg = check_choice(alg, smart.ALGS, ctx=ctx, key=f"{key}.alg")
            kid = spec.get("kid")
            if kid is not None and (not isinstance(kid, str) or not kid):
                raise ConfigError(
                    "kid must be the key id registered with the server (a string)",
                    file=ctx.config_file,
                    key=f"{key}.kid",
                    hint="leave it out to use the key's thumbprint, as `sluice keys jwks` prints it",
                )
            try:
                self.smart = smart.Client.make(
                    client_id=self.client_id,
                    token_url=self.token_url,
                    key=signing_key,
                    scope=self.scope,
                    alg=alg,
                    kid=kid,
                )
            except smart.SmartKeyError as exc:
                raise ConfigError(f"smart-backend: {exc}", file=ctx.config_file, key=f"{key}.alg") from exc
            self.refresh_margin = float(spec.get("refresh_margin", 60))
        elif self.type == "mtls":
            self.tls = {"cert": need("cert"), "key": need("key")}

    @property
    def refreshable(self) -> bool:
        """A token from a token endpoint: a 401 invalidates it and the request is retried once."""
        return self.type in TOKEN_TYPES

    def invalidate(self) -> None:
        self._token = None
        self._expires_at = 0.0

    async def headers(self, client: httpx.AsyncClient, what: str) -> dict[str, str]:
        if self.type in TOKEN_TYPES:
            return {"Authorization": "Bearer " + await self._oauth_token(client, what)}
        return {"Authorization": self.header} if self.header else {}

    async def _oauth_token(self, client: httpx.AsyncClient, what: str) -> str:
        async with self._lock:
            if self._token is not None and self.clock() < self._expires_at:
                return self._token
            hdrs = {"Accept": "application/json"}
            if self.smart is not None:
                form = self.smart.token_form(self.wall())  # a new assertion (and jti) each request
                check = "auth.client_id, the key registered with the server (sluice keys jwks), kid and scope"
            else:
                form = {"grant_type": "client_credentials"}
                if self.scope:
                    form["scope"] = self.scope
                if self.client_auth == "basic":
                    cred = (
                        quote(self.client_id, safe="") + ":" + quote(self.client_secret, safe="")
                    ).encode()
                    hdrs["Authorization"] = "Basic " + base64.b64encode(cred).decode()
                else:
                    form |= {"client_id": self.client_id, "client_secret": self.client_secret}
                check = "auth.client_id/client_secret/scope"
            what = f"{what} {self.type} token request"
            try:
                resp = await client.post(self.token_url, data=form, headers=hdrs)
            except TRANSPORT_ERRORS as exc:
                raise transport_error(exc, what=what) from exc
            if resp.status_code != 200:
                err = response_error(resp, what=what)
                if err.retryable:
                    raise err
                raise PermanentDeliveryError(f"{err.message} (check {check})", category="auth")
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


# What servers say when a transaction holds more entries than they take (Medplum: "too many entries").
_TOO_LARGE = re.compile(
    r"too many entries|too many (?:operations|updates)|bundle (?:is )?too (?:large|big)", re.I
)


def too_large_hint(err: DeliveryError, entries: int) -> DeliveryError:
    """A transaction refused for its size: say which setting delivers it (the server's text stays first)."""
    if _TOO_LARGE.search(err.message):
        err.args = (
            f"{err.message} — the server refuses transactions of {entries} entries: set max_transaction_entries "
            "on this destination (Medplum: 8) to split it, or use mode per-resource or batch, then replay",
        )
        err.message = err.args[0]
    return err


def _status_code(status: Any) -> int:
    try:
        return int(str(status).strip().split()[0])
    except (ValueError, IndexError):
        return 0


Auth = _Auth  # the fhir-poll source authenticates the same way (engine/sources/fhir_poll.py)


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
        "max_transaction_entries": 0,
    }
    # A split or multi-request delivery saves its progress after each request (engine/destinations/base.py),
    # so a retry after an engine crash resumes at the first request not yet applied.
    keeps_progress = True
    # Deliveries whose plan failed part-way (retryable), by message: what is applied, ids the server gave.
    PROGRESS_KEPT = 10_000

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
        cap = self.opts["max_transaction_entries"]
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0 or cap == 1:
            raise ConfigError(
                "max_transaction_entries must be a whole number of at least 2 (0 = never split)",
                file=ctx.config_file,
                key=f"{key}.max_transaction_entries",
                hint="e.g. 8 for Medplum (see 'Server profiles' in docs/destinations.md)",
            )
        if cap and self.mode != "transaction":
            raise ConfigError(
                f"max_transaction_entries applies to mode transaction, not {self.mode}",
                file=ctx.config_file,
                key=f"{key}.max_transaction_entries",
            )
        self.max_entries = cap
        self._progress: OrderedDict[tuple[int, str, bytes], fhir_plan.Progress] = OrderedDict()

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
            entries = bundle.get("entry") or []
            if self.mode == "transaction" and (not self.max_entries or len(entries) <= self.max_entries):
                return await self._bundle_post(bundle)
            return await self._planned(bundle, item)

    def _bundle(self, item: Outbound) -> dict[str, Any]:
        try:
            bundle = exactjson.loads(item.payload)  # long decimals keep their digits
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
            if resp.status_code == 401 and self.auth.refreshable and attempt == 1:
                self.auth.invalidate()
                continue
            return resp
        return resp

    async def _bundle_post(self, bundle: dict[str, Any]) -> str:
        entries = bundle.get("entry") or []
        bundle = {**bundle, "type": "transaction"}
        resp = await self._send("POST", "", body=bundle)
        what = f"{self.name} {self.mode}"
        if not 200 <= resp.status_code < 300:
            raise too_large_hint(
                mark_multiple_match(response_error(resp, what=what), entries=entries), len(entries)
            )
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

    async def _planned(self, bundle: dict[str, Any], item: Outbound) -> str:
        """Per-resource, batch, or a transaction split under ``max_transaction_entries``: the requests of
        :func:`fhir_plan.build`, each after the ones it depends on, references rewritten to the ids the
        server returned.  A retryable failure keeps what was applied, so the retry resumes at the failed
        request.  After each request but the last the progress is also saved with the delivery (durably,
        :meth:`save_progress`), so the retry after an engine crash resumes there too; every write is
        conditional or by id, so a resend of a request whose outcome was not saved updates the same
        resources instead of duplicating them."""
        entries: list[dict[str, Any]] = list(bundle.get("entry") or [])
        plan = fhir_plan.build(entries, self.mode, self.max_entries)
        digest = hashlib.blake2b(item.payload, digest_size=16).digest()
        key = (item.message_id, item.channel, digest)
        # The saved positions mean something only for the same plan: same payload, mode, chunk size, server.
        plan_id = f"{self.mode}/{self.max_entries}/{len(plan.writes)}/{self.base_url}/{digest.hex()}"
        prog = (
            self._progress.pop(key, None)
            or fhir_plan.Progress.from_state(item.progress, plan_id, len(plan.writes))
            or fhir_plan.Progress()
        )
        resumed = bool(prog.done)
        for url, ref in plan.fixed.items():
            prog.refs.setdefault(url, ref)
        local = {str(e["fullUrl"]) for e in entries if e.get("fullUrl")}
        label = {"transaction": "chunk", "batch": "batch", "per-resource": "request"}[self.mode]
        for s, step in enumerate(plan.steps, 1):
            todo = [k for k in step if k not in prog.done]
            if not todo:
                continue
            try:
                outcome = await self._step(plan, todo, prog, local, f"{s}/{len(plan.steps)}")
            except DeliveryError as err:
                applied = len(prog.done)
                if err.retryable:
                    if self.mode == "batch" and prog.done:  # entries of the failed batch may have applied
                        await self.save_progress(item, prog.state(plan_id))
                    self._progress[key] = prog
                    while len(self._progress) > self.PROGRESS_KEPT:
                        self._progress.popitem(last=False)
                if len(plan.steps) > 1:
                    kept = "a retry resumes here" if err.retryable else "a replay sends every write again"
                    err.args = (
                        f"{label} {s}/{len(plan.steps)} failed, {applied} of {len(plan.writes)} writes "
                        f"applied before it ({kept}): {err.message}",
                    )
                    err.message = err.args[0]
                raise
            prog.outcomes.append(f"{s}: {outcome}")
            if s < len(plan.steps):
                await self.save_progress(item, prog.state(plan_id))
        if len(plan.steps) == 1:
            return prog.outcomes[0].split(": ", 1)[1]
        what = {
            "transaction": f"transaction split into {len(plan.steps)} chunks of <= {self.max_entries}",
            "batch": f"batch in {len(plan.steps)} dependency levels",
            "per-resource": f"per-resource: {len(plan.steps)} requests",
        }[self.mode]
        extra = f", {plan.updates} two-phase update(s)" if plan.updates else ""
        again = ", resumed after a failure" if resumed else ""
        if self.mode == "per-resource":
            codes: dict[str, int] = {}
            for o in prog.outcomes:
                code = o.rsplit(" ", 1)[-1]
                codes[code] = codes.get(code, 0) + 1
            tally = ", ".join(f"{c}x{code}" for code, c in sorted(codes.items()))
            return f"{what} ({tally}{extra}{again})"
        return f"{what} ({len(entries)} entries{extra}{again}): " + "; ".join(prog.outcomes)

    async def _step(
        self, plan: fhir_plan.Plan, todo: list[int], prog: fhir_plan.Progress, local: set[str], at: str
    ) -> str:
        """One request of a plan: a single entry (per-resource) or a batch/transaction Bundle."""
        sent = [fhir_plan.request_entry(plan.writes[k], prog.refs) for k in todo]
        in_request = {str(e["fullUrl"]) for e in sent if e.get("fullUrl")}
        for e in sent:
            left = [r for r in fhir_plan.unresolved(e, local) if r not in prog.refs]
            if left and (self.mode != "transaction" or any(r not in in_request for r in left)):
                rtype = (e.get("resource") or {}).get("resourceType", "?")
                raise PermanentDeliveryError(
                    f"{self.mode} mode: a {rtype} entry references another entry that was not written "
                    "before it (a bug in the delivery plan; report it with the channel's mapping)",
                    category="validation",
                )
        if self.mode == "per-resource":
            k = todo[0]
            code = await self._one(sent[0], plan.writes[k], prog, at)
            prog.done.add(k)
            return f"HTTP {code}"
        kind = "transaction" if self.mode == "transaction" else "batch"
        what = f"{self.name} {kind}" if at == "1/1" else f"{self.name} {kind} {at}"
        resp = await self._send("POST", "", body={"resourceType": "Bundle", "type": kind, "entry": sent})
        if not 200 <= resp.status_code < 300:
            raise mark_multiple_match(response_error(resp, what=what), entries=sent)
        rentries = self._response_entries(resp, len(sent), what)
        failures: list[DeliveryError] = []
        counts: dict[int, int] = {}
        for k, e, got in zip(todo, sent, rentries, strict=True):
            r = (got or {}).get("response") or {}
            code = _status_code(r.get("status"))
            counts[code] = counts.get(code, 0) + 1
            rtype = _entry_type(e) or "?"
            if not 200 <= code < 300:
                reason = operation_outcome_text(r.get("outcome")) or f"status {r.get('status')!r}"
                err = status_error(code or 500, reason, what=f"{what} entry {plan.writes[k].index} ({rtype})")
                failures.append(mark_multiple_match(err, resource_type=_entry_type(e)))
                continue
            if kind == "batch":  # a batch entry stands alone: applied even if another failed
                self._note(e, plan.writes[k], prog, k, r.get("location"), got.get("resource"), what)
        if failures:
            raise self._combine(failures, what)
        if kind == "transaction":  # all or nothing: recorded once the whole chunk is confirmed
            for k, e, got in zip(todo, sent, rentries, strict=True):
                r = got.get("response") or {}
                self._note(e, plan.writes[k], prog, k, r.get("location"), got.get("resource"), what)
        tally = ", ".join(f"{c}x{code}" for code, c in sorted(counts.items()))
        return f"{kind} HTTP {resp.status_code}: {len(sent)} entries ({tally})"

    def _response_entries(self, resp: httpx.Response, n: int, what: str) -> list[dict[str, Any]]:
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
            or len(rentries) != n
            or not all(isinstance(x, dict) for x in rentries)
        ):
            raise DeliveryError(
                f"{what}: HTTP {resp.status_code} but the response is not a response Bundle with {n} "
                "entries; delivery is unconfirmed, will retry",
                category="server",
            )
        return list(rentries)

    @staticmethod
    def _note(
        entry: Mapping[str, Any],
        write: fhir_plan.Write,
        prog: fhir_plan.Progress,
        k: int,
        location: Any,
        resource: Any,
        what: str,
    ) -> None:
        """Record an applied write and the id the server gave it (for the later requests' references)."""
        url = entry.get("fullUrl")
        method = str(entry["request"]["method"]).upper()
        if url and method in ("PUT", "POST") and write.phase == fhir_plan.PHASE_WRITE:
            ref = fhir_plan.ref_from_location(location) if isinstance(location, str) and location else None
            if ref is None and isinstance(resource, dict) and resource.get("id"):
                ref = f"{resource.get('resourceType') or _entry_type(entry)}/{resource['id']}"
            if ref is None:
                raise DeliveryError(
                    f"{what}: entry {write.index} written without a location or resource id; cannot "
                    "resolve later references, will retry",
                    category="server",
                )
            prog.refs[str(url)] = ref
        prog.done.add(k)

    async def _one(
        self, entry: dict[str, Any], write: fhir_plan.Write, prog: fhir_plan.Progress, at: str
    ) -> int:
        """Per-resource: the entry's own request (its conditional fields as headers)."""
        req = entry["request"]
        method, url = req["method"].upper(), req["url"].lstrip("/")
        headers: dict[str, str] = {}
        for fname, header in (
            ("ifNoneExist", "If-None-Exist"),
            ("ifMatch", "If-Match"),
            ("ifNoneMatch", "If-None-Match"),
            ("ifModifiedSince", "If-Modified-Since"),
        ):
            if req.get(fname):
                headers[header] = str(req[fname])
        resource = entry.get("resource")
        if resource is not None and method == "PUT" and "?" not in url and url.count("/") == 1:
            resource = {**copy.copy(resource), "id": url.split("/")[1]}
        rtype = (resource or {}).get("resourceType") or url.split("?")[0].split("/")[0]
        step = "update" if write.phase == fhir_plan.PHASE_UPDATE else "entry"
        what = f"{self.name} per-resource {method} {rtype} ({step} {at})"
        resp = await self._send(
            method, url, body=resource if method in ("PUT", "POST", "PATCH") else None, headers=headers
        )
        if not 200 <= resp.status_code < 300:
            raise mark_multiple_match(response_error(resp, what=what), resource_type=rtype)
        if entry.get("fullUrl") and method in ("PUT", "POST") and write.phase == fhir_plan.PHASE_WRITE:
            ref = self._assigned_ref(resp)
            if ref is None:
                raise DeliveryError(
                    f"{what}: HTTP {resp.status_code} without a Location header or resource id; "
                    "cannot resolve later references, will retry",
                    category="server",
                )
            prog.refs[str(entry["fullUrl"])] = ref
        return resp.status_code

    @staticmethod
    def _assigned_ref(resp: httpx.Response) -> str | None:
        loc = resp.headers.get("location") or resp.headers.get("content-location")
        if loc:
            ref = fhir_plan.ref_from_location(loc)
            if ref:
                return ref
        try:
            body = orjson.loads(resp.content) if resp.content else None
        except orjson.JSONDecodeError:
            return None
        if isinstance(body, dict) and body.get("resourceType") and body.get("id"):
            return f"{body['resourceType']}/{body['id']}"
        return None
