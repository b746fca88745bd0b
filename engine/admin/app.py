"""The admin HTTP API (FastAPI): status, metrics, search, PHI view with audit, replay, pause.

A thin adaptor: every endpoint calls the same function the ``sluice`` CLI calls
(engine.admin.operations / search / audit / tokens), in a thread, so the event loop that
serves MLLP is never blocked by a query.  Errors are JSON ``{"error": {"code", "message"}}``
whose message says what to do; 401 without a valid token, 403 for a missing permission.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.admin import audit, operations, search, status, tokens
from engine.admin.oidc import OIDCError, OIDCVerifier, looks_like_jwt
from engine.admin.roles import ADMIN, OPERATE, PHI, READ, ROLES, WHAT_NEEDS, Principal
from engine.config import Config
from engine.errors import ConfigError
from engine.store import Store

API = "/api/v1"


@dataclass
class AdminContext:
    config: Config
    store: Store
    engine: status.EngineView
    patient_key: bytes
    tokens: tokens.TokenVerifier
    oidc: OIDCVerifier | None = None
    metrics_auth: bool = False


# ------------------------------------------------------------------ response models


class ReloadResult(BaseModel):
    applied: bool
    changes: dict[str, list[str]]
    summary: str


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, bool]


class Who(BaseModel):
    name: str
    kind: str
    role: str | None
    phi: bool


class ChannelCounters(BaseModel):
    received: int
    filtered: int
    errored: int
    processed: int
    AA: int
    AE: int
    AR: int
    duplicates_prevented: int
    queued: int


class Channel(BaseModel):
    name: str
    enabled: bool
    status: str
    paused: bool
    listen: str
    listening: bool
    connections: int
    destinations: list[str]
    counters: ChannelCounters
    last_message_at: float | None


class DestinationCounters(BaseModel):
    delivered: int
    retried: int
    dead_lettered: int
    queued: int


class Destination(BaseModel):
    name: str
    kind: str
    status: str
    paused: bool
    counters: DestinationCounters
    queue_depth: int
    oldest_pending_age_seconds: float


class PauseResult(BaseModel):
    kind: str
    name: str
    paused: bool
    changed: bool


class MessageSummary(BaseModel):
    id: int
    received_at: float
    channel: str
    type: str
    trigger: str
    control_id: str
    version: str
    status: str
    ack_code: str
    size: int
    reason: str
    processed_at: float | None


class MessagePage(BaseModel):
    items: list[MessageSummary]
    next_cursor: int | None


class Delivery(BaseModel):
    id: int
    destination: str
    status: str
    attempts: int
    last_error: str
    detail: str
    created_at: float
    next_attempt_at: float
    delivered_at: float | None


class AuditItem(BaseModel):
    id: int
    at: float
    actor: str
    actor_kind: str
    action: str
    target: str
    reason: str
    detail: dict[str, Any]
    source: str


class ConversionWarning(BaseModel):
    kind: str = Field(description="the converter's name for it, e.g. field_dropped, charset_fallback")
    text: str = Field(description="where (HL7 location) and what the conversion did instead; never a value")


class MessageDetail(MessageSummary):
    peer: str
    sending_application: str
    sending_facility: str
    content_hash: str
    deliveries: list[Delivery]
    warnings: list[ConversionWarning]
    audit: list[AuditItem]


class Output(BaseModel):
    destination: str
    content_type: str
    body: str | None


class MessageContent(BaseModel):
    id: int
    raw: str | None
    outputs: list[Output]


class DeadLetter(BaseModel):
    message_id: int
    delivery_id: int | None
    channel: str
    destination: str | None
    status: str
    type: str
    trigger: str
    control_id: str
    received_at: float
    attempts: int | None
    reason: str


# "2h", "3d" (up to 99999 units back), epoch seconds, or an ISO date / date-time (operations.parse_when)
WHEN_PATTERN = (
    r"^(\d{1,10}(\.\d+)?|\d{1,5}(\.\d+)?[smhd]|(19|20|21)\d\d-(0[1-9]|1[0-2])-(0[1-9]|1\d|2[0-8])"
    r"([T ]([01]\d|2[0-3]):[0-5]\d(:[0-5]\d(\.\d{1,6})?)?(Z|[+-]([01]\d|2[0-3]):?[0-5]\d)?)?)$"
)
When = Annotated[
    str | None, Field(None, pattern=WHEN_PATTERN, description="2h, 3d, an ISO time or epoch seconds")
]
MAX_ID = 2**53 - 1  # exact as a JSON number (and as a double) everywhere


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a message id (a whole number), not true/false")
    return value


# JSON numbers such as 12 or 12.0; never true/false; within a 64-bit column
MessageId = Annotated[int, Field(strict=False, ge=0, le=MAX_ID), BeforeValidator(_no_bool)]
ReplayStatus = Literal[operations.REPLAY_STATUSES]  # type: ignore[valid-type]


class ReplayBody(BaseModel):
    """Message ids, or a channel with a status (narrowed by destination and time); dry_run previews."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",  # a typo such as "dryrun" must not turn a preview into a real replay
        json_schema_extra={
            "anyOf": [
                {"required": ["ids"], "properties": {"ids": {"minItems": 1}}},
                {
                    "required": ["channel", "status"],
                    "properties": {
                        "channel": {"type": "string", "minLength": 1},
                        "status": {"type": "string"},
                    },
                },
            ]
        },
    )

    ids: list[MessageId] = Field(default_factory=list, max_length=100_000)
    channel: str | None = Field(None, min_length=1, max_length=100)
    status: ReplayStatus | None = Field(None, description="a message status, or 'dead' for dead deliveries")
    destination: str | None = Field(None, min_length=1, max_length=100)
    since: When = None
    until: When = None
    dry_run: bool = False
    why: str = Field("", max_length=2000)


class ReplayItem(BaseModel):
    message_id: int
    destinations: list[str] | None


class ReplayResult(BaseModel):
    dry_run: bool
    selected: int
    replayed: int
    items: list[ReplayItem]


class AuditPage(BaseModel):
    items: list[AuditItem]
    next_cursor: int | None


class TokenView(BaseModel):
    name: str
    role: str
    phi: bool
    created_at: float
    created_by: str
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None
    active: bool


class TokenCreate(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    name: str = Field(pattern=tokens.NAME_RE.pattern, description="letters, digits and _.@-")
    role: Literal["viewer", "operator", "admin"]
    phi: bool = False
    expires: str | None = Field(None, pattern=r"^\d{1,6}(\.\d{1,3})?[smhdw]?$", description="e.g. 90d, 12h")


class TokenCreated(BaseModel):
    name: str
    token: str


# ------------------------------------------------------------------ helpers


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette answers 405 from the first match only)."""
    from starlette.routing import Match, Route

    methods: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches({**request.scope, "method": next(iter(route.methods))})
            if match == Match.FULL:
                methods |= route.methods
    return sorted(methods)


def _error(status_code: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status_code, headers=headers
    )


def _client(request: Request) -> str:
    host = request.client.host if request.client else "?"
    return f"api from {host}"


async def _thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


def _text(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "bad request"},
    401: {"model": ErrorResponse, "description": "no valid token"},
    403: {"model": ErrorResponse, "description": "the token lacks the permission"},
    404: {"model": ErrorResponse, "description": "not found"},
    409: {"model": ErrorResponse, "description": "conflicts with what exists"},
    422: {"model": ErrorResponse, "description": "invalid parameters"},
}


# ------------------------------------------------------------------ auth


def _ctx(request: Request) -> AdminContext:
    ctx: AdminContext = request.app.state.ctx
    return ctx


async def principal(request: Request) -> Principal:
    """The caller, from ``Authorization: Bearer``: a Sluice token or (when configured) an OIDC JWT."""
    ctx = _ctx(request)
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    challenge = {"WWW-Authenticate": 'Bearer realm="sluice"'}
    if scheme.lower() != "bearer" or not value.strip():
        raise HTTPException(
            401,
            "no token: send 'Authorization: Bearer <token>' (create one with: sluice token create "
            "--name NAME --role viewer)",
            headers=challenge,
        )
    value = value.strip()
    if value.startswith(tokens.PREFIX):
        who = await _thread(ctx.tokens.verify, value)
        if who is None:
            raise HTTPException(
                401, "unknown, revoked or expired token: ask an admin for a new one", headers=challenge
            )
        return who
    if ctx.oidc is not None and looks_like_jwt(value):
        try:
            return await _thread(ctx.oidc.verify, value)
        except OIDCError as exc:
            raise HTTPException(401, str(exc), headers=challenge) from None
    raise HTTPException(401, "not a Sluice token or an accepted OIDC token", headers=challenge)


def _forbid(who: Principal, permission: str) -> None:
    if not who.can(permission):
        has = f"role {who.role}" if who.role else "no role"
        raise HTTPException(
            403, f"this needs {WHAT_NEEDS[permission]}; {who.name} has {has}{' + phi' if who.phi else ''}"
        )


def need(permission: str) -> Callable[..., Awaitable[Principal]]:
    async def check(who: Annotated[Principal, Depends(principal)]) -> Principal:
        _forbid(who, permission)
        return who

    return check


Viewer = Annotated[Principal, Depends(need(READ))]
Operator = Annotated[Principal, Depends(need(OPERATE))]
Admin = Annotated[Principal, Depends(need(ADMIN))]
PhiReader = Annotated[Principal, Depends(need(PHI))]
Caller = Annotated[Principal, Depends(principal)]


def create_app(ctx: AdminContext) -> FastAPI:
    app = FastAPI(
        title="Sluice admin API",
        version="1",
        description="Operate a Sluice HL7 v2 engine: status, metrics, message search, PHI view (audited), "
        "dead letters and replay, pause/resume, tokens and audit. Authenticate with "
        "`Authorization: Bearer <token>` (sluice token create, or an OIDC access token).",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.ctx = ctx

    # -------------------------------------------------------------- errors
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {
            400: "bad_request",
            401: "unauthorized",
            403: "forbidden",
            404: "not_found",
            405: "method_not_allowed",
        }
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = "no such endpoint: see /openapi.json for the API"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            allowed = _allowed_methods(_request)
            headers["Allow"] = ", ".join(allowed)
            message = f"this endpoint takes {', '.join(allowed)}: see /openapi.json"
        return _error(exc.status_code, code.get(exc.status_code, "error"), message, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors()[:5]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body", "path"))
            parts.append(f"{where or 'request'}: {e.get('msg', 'invalid')}")
        return _error(422, "invalid", "; ".join(parts) + " (see /openapi.json)")

    @app.exception_handler(operations.NotFound)
    async def not_found(_request: Request, exc: operations.NotFound) -> JSONResponse:
        return _error(404, "not_found", str(exc))

    @app.exception_handler(operations.OperationError)
    async def bad(_request: Request, exc: operations.OperationError) -> JSONResponse:
        return _error(400, "bad_request", str(exc))

    @app.exception_handler(tokens.TokenError)
    async def bad_token(_request: Request, exc: tokens.TokenError) -> JSONResponse:
        if isinstance(exc, tokens.TokenExists):
            return _error(409, "conflict", str(exc))
        return _error(400, "bad_request", str(exc))

    # -------------------------------------------------------------- health, metrics
    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is up (no auth)."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, tags=["health"], responses={503: {"model": Readiness}})
    async def readyz() -> Any:
        """The store answers and every enabled channel's listener is bound (no auth); 503 otherwise."""
        checks = dict(ctx.engine.ready())
        try:
            await _thread(ctx.store.check)
            checks["store"] = True
        except Exception:
            checks["store"] = False
        ok = all(checks.values())
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    async def metrics_view(request: Request) -> Response:
        if ctx.metrics_auth:
            _forbid(await principal(request), READ)
        body, content_type = await _thread(ctx.engine.render_metrics)
        return Response(body, media_type=content_type)

    app.add_api_route(
        "/metrics",
        metrics_view,
        methods=["GET"],
        tags=["health"],
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, 401: ERRORS[401]},
    )

    @app.get(f"{API}/whoami", response_model=Who, responses=ERRORS, tags=["auth"])
    async def whoami(who: Caller) -> dict[str, Any]:
        """The caller's name, role and whether it may read PHI."""
        return {"name": who.name, "kind": who.kind, "role": who.role, "phi": who.phi}

    # -------------------------------------------------------------- channels, destinations
    @app.get(f"{API}/channels", response_model=list[Channel], responses=ERRORS, tags=["channels"])
    async def list_channels(_who: Viewer) -> Any:
        """Every channel with its counters (this node, since start), queue and pause state."""
        paused = await _thread(operations.paused, ctx.store)
        return await _thread(status.channels, ctx.config, ctx.store, ctx.engine, paused)

    @app.get(f"{API}/destinations", response_model=list[Destination], responses=ERRORS, tags=["destinations"])
    async def list_destinations(_who: Viewer) -> Any:
        """Every destination with its counters, queue depth, oldest pending age and pause state."""
        paused = await _thread(operations.paused, ctx.store)
        return await _thread(status.destinations, ctx.config, ctx.store, ctx.engine, paused)

    def pause_route(kind: str, pause: bool) -> None:
        names = (
            (lambda: [c.name for c in ctx.config.channels])
            if kind == "channel"
            else ctx.config.destinations.keys
        )
        plural = "channels" if kind == "channel" else "destinations"
        verb = "pause" if pause else "resume"

        async def act(
            who: Operator,
            request: Request,
            name: Annotated[str, Path(max_length=100)],
            reason: Annotated[str, Query(max_length=2000)] = "",
        ) -> dict[str, Any]:
            if name not in names():
                raise operations.NotFound(f"no {kind} named {name!r} (GET {API}/{plural} lists them)")
            changed = await _thread(
                operations.set_paused,
                ctx.store,
                who,
                kind,
                name,
                pause,
                reason=reason,
                source=_client(request),
            )
            ctx.engine.apply_pause(kind, name, pause)
            return {"kind": kind, "name": name, "paused": pause, "changed": changed}

        act.__doc__ = (
            f"{verb.capitalize()} a {kind}: "
            + (
                "its messages are still received, stored and acknowledged, but not processed"
                if kind == "channel"
                else "its deliveries wait in the queue"
            )
            + (" until resumed." if pause else " again.")
        )
        app.add_api_route(
            f"{API}/{plural}/{{name}}/{verb}",
            act,
            methods=["POST"],
            response_model=PauseResult,
            responses=ERRORS,
            tags=[plural],
            name=f"{verb}_{kind}",
        )

    for kind in ("channel", "destination"):
        for pause in (True, False):
            pause_route(kind, pause)

    # -------------------------------------------------------------- messages
    @app.get(f"{API}/messages", response_model=MessagePage, responses=ERRORS, tags=["messages"])
    async def list_messages(
        _who: Viewer,
        control_id: Annotated[str | None, Query(max_length=200)] = None,
        type_: Annotated[str | None, Query(alias="type", max_length=10)] = None,
        trigger: Annotated[str | None, Query(max_length=10)] = None,
        status_: Annotated[str | None, Query(alias="status", max_length=20)] = None,
        channel: Annotated[str | None, Query(max_length=100)] = None,
        destination: Annotated[str | None, Query(max_length=100)] = None,
        since: Annotated[
            str | None, Query(pattern=WHEN_PATTERN, description="2h, 3d, an ISO time or epoch s")
        ] = None,
        until: Annotated[str | None, Query(pattern=WHEN_PATTERN)] = None,
        patient: Annotated[
            str | None,
            Query(max_length=200, description="a patient identifier (PID-3.1); matched by keyed hash"),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=search.MAX_LIMIT)] = 50,
        cursor: Annotated[
            int | None, Query(ge=0, le=MAX_ID, description="next_cursor of the previous page")
        ] = None,
    ) -> dict[str, Any]:
        """Messages, newest first, metadata only (no PHI); keyset pages via next_cursor."""
        q = search.MessageQuery(
            control_id=control_id,
            type=type_,
            trigger=trigger,
            status=status_,
            channel=channel,
            destination=destination,
            since=operations.parse_when(since),
            until=operations.parse_when(until),
            patient_hash=search.patient_hash(ctx.patient_key, patient) if patient is not None else None,
            limit=limit,
            cursor=cursor,
        )
        rows, nxt = await _thread(search.search, ctx.store, q)
        return {"items": [search.summary(r) for r in rows], "next_cursor": nxt}

    @app.get(
        f"{API}/messages/{{message_id}}", response_model=MessageDetail, responses=ERRORS, tags=["messages"]
    )
    async def get_message(_who: Viewer, message_id: Annotated[int, Path(ge=0, le=MAX_ID)]) -> dict[str, Any]:
        """One message: metadata, deliveries with attempts and reasons, and its audit trail (no PHI)."""

        got = await _thread(search.detail, ctx.store, message_id)
        if got is None:
            raise operations.NotFound(f"no message {message_id}")
        return got

    @app.get(
        f"{API}/messages/{{message_id}}/content",
        response_model=MessageContent,
        responses=ERRORS,
        tags=["messages"],
    )
    async def get_content(
        who: PhiReader,
        request: Request,
        message_id: Annotated[int, Path(ge=0, le=MAX_ID)],
        reason: Annotated[str, Query(max_length=2000, description="why you are looking (recorded)")] = "",
    ) -> Any:
        """The raw HL7 and the produced outputs (PHI): needs the phi permission; every view is audited."""
        raw, outs = await _thread(
            operations.view_content, ctx.store, who, message_id, reason=reason, source=_client(request)
        )
        body = {
            "id": message_id,
            "raw": _text(raw),
            "outputs": [{"destination": d, "content_type": ct, "body": _text(p)} for d, ct, p in outs],
        }
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    # -------------------------------------------------------------- dead letters, replay
    @app.get(f"{API}/dead-letters", response_model=list[DeadLetter], responses=ERRORS, tags=["dead letters"])
    async def dead_letters(
        _who: Viewer,
        channel: Annotated[str | None, Query(max_length=100)] = None,
        destination: Annotated[str | None, Query(max_length=100)] = None,
        limit: Annotated[int, Query(ge=1, le=search.MAX_LIMIT)] = 100,
    ) -> list[dict[str, Any]]:
        """Dead deliveries and messages whose processing failed or waits for review, newest first."""
        rows = await _thread(ctx.store.dead_letters, channel=channel, destination=destination, limit=limit)
        return [search.dead_letter(r) for r in rows]

    @app.post(f"{API}/replay", response_model=ReplayResult, responses=ERRORS, tags=["dead letters"])
    async def replay(who: Operator, request: Request, body: ReplayBody) -> dict[str, Any]:
        """Run messages through the current config again, by ids or a filter; dry_run previews it."""
        req = operations.ReplayRequest(
            ids=tuple(body.ids),
            channel=body.channel,
            status=body.status,
            destination=body.destination,
            since=operations.parse_when(body.since),
            until=operations.parse_when(body.until),
        )
        res = await _thread(
            operations.replay,
            ctx.store,
            who,
            req,
            dry_run=body.dry_run,
            why=body.why,
            source=_client(request),
        )
        return {
            "dry_run": res.dry_run,
            "selected": len(res.selection),
            "replayed": res.replayed,
            "items": [{"message_id": m, "destinations": d} for m, d in res.selection[:1000]],
        }

    # -------------------------------------------------------------- live reload (engine/reload.py)
    @app.post(f"{API}/reload", response_model=ReloadResult, responses=ERRORS, tags=["config"])
    async def reload_config(who: Admin, request: Request) -> Any:
        """Load the config files again and apply them without dropping connections (admin; audited).

        422 with the loader's message when the new config is invalid or needs a restart: the running
        config is then unchanged.
        """
        try:
            plan = await ctx.engine.reload(who, _client(request))
        except ConfigError as exc:
            return _error(422, "invalid_config", f"{exc} (nothing was changed)")
        return {"applied": True, "changes": plan.summary(), "summary": plan.describe()}

    # -------------------------------------------------------------- audit, tokens
    @app.get(f"{API}/audit", response_model=AuditPage, responses=ERRORS, tags=["audit"])
    async def audit_list(
        _who: Admin,
        since: Annotated[str | None, Query(pattern=WHEN_PATTERN)] = None,
        until: Annotated[str | None, Query(pattern=WHEN_PATTERN)] = None,
        action: Annotated[str | None, Query(max_length=50, description=", ".join(audit.ACTIONS))] = None,
        actor: Annotated[str | None, Query(max_length=200)] = None,
        target: Annotated[
            str | None, Query(max_length=300, description="e.g. message:42, channel:adt")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=search.MAX_LIMIT)] = 100,
        cursor: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
    ) -> dict[str, Any]:
        """Audit rows, newest first (admin)."""
        rows = await _thread(
            audit.entries,
            ctx.store,
            since=operations.parse_when(since),
            until=operations.parse_when(until),
            action=action,
            actor=actor,
            target=target,
            before_id=cursor,
            limit=limit + 1,
        )
        more = len(rows) > limit
        rows = rows[:limit]
        return {"items": [a.as_dict() for a in rows], "next_cursor": rows[-1].id if more and rows else None}

    def _token_view(t: tokens.TokenInfo) -> dict[str, Any]:
        return {**t.__dict__, "active": t.active}

    @app.get(f"{API}/tokens", response_model=list[TokenView], responses=ERRORS, tags=["tokens"])
    async def token_list(_who: Admin) -> list[dict[str, Any]]:
        """Every token's name, role and dates (never the secret)."""
        return [_token_view(t) for t in await _thread(tokens.listing, ctx.store)]

    @app.post(
        f"{API}/tokens", response_model=TokenCreated, status_code=201, responses=ERRORS, tags=["tokens"]
    )
    async def token_create(who: Admin, request: Request, body: TokenCreate) -> Any:
        """Create a token; the answer holds its secret, the only time it is shown."""
        if body.role not in ROLES:
            raise operations.OperationError(f"unknown role {body.role!r}: use one of {', '.join(ROLES)}")
        expires = tokens.parse_duration(body.expires) if body.expires else None
        secret = await _thread(
            tokens.create,
            ctx.store,
            body.name,
            body.role,
            phi=body.phi,
            expires_in=expires,
            by=who,
            source=_client(request),
        )
        return JSONResponse(
            {"name": body.name, "token": secret}, status_code=201, headers={"Cache-Control": "no-store"}
        )

    @app.delete(
        f"{API}/tokens/{{name}}",
        status_code=204,
        response_class=Response,
        responses=ERRORS,
        tags=["tokens"],
    )
    async def token_revoke(
        who: Admin, request: Request, name: Annotated[str, Path(max_length=100)]
    ) -> Response:
        """Revoke a token at once (answers may be cached for up to 5 s)."""
        try:
            await _thread(tokens.revoke, ctx.store, name, by=who, source=_client(request))
        except tokens.TokenError as exc:
            raise operations.NotFound(str(exc)) from None
        return Response(status_code=204)

    # -------------------------------------------------------------- web console (engine/web/, at /)
    from engine.web import mount as mount_console

    mount_console(app)
    return app
