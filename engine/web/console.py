"""The web console: server-rendered pages on the admin app, at ``/`` (same host and port as the API).

Every page and action calls the functions the ``/api/v1`` endpoints call (engine.admin.status,
search, operations, audit, and the store's dead-letter list), in a thread, so the console has no
second path to the store and the same audit rows are written.  Roles are checked here, on every
request, with the same permissions as the API; a button a role may not use is also not shown.

Login takes an API token or an OIDC access token in a form field named ``token``; the browser then
holds only an opaque session id (engine.web.sessions).  Every POST carries the session's CSRF
token (a hidden ``csrf`` field or an ``X-CSRF-Token`` header); the login form has its own
double-submit token.  Pages are answered with a strict Content-Security-Policy (scripts and styles
only from /static, which the engine serves: no CDN) and ``Cache-Control: no-store``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import jinja2
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from engine.admin import audit, operations, search, status, tokens
from engine.admin.app import MAX_ID, WHEN_PATTERN, AdminContext, _text
from engine.admin.oidc import OIDCError, looks_like_jwt
from engine.admin.roles import ADMIN, OPERATE, PHI, READ, WHAT_NEEDS, Principal
from engine.errors import REJECTION_CLASSES
from engine.store import ERROR, MESSAGE_STATUSES, REVIEW
from engine.web import render
from engine.web.sessions import Session, SessionStore, safe_next, same_secret

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "sluice_session"
LOGIN_COOKIE = "sluice_login"
REFRESH_SECONDS = 2.0  # the dashboard's live refresh
REJECTIONS_WINDOW = 15 * 60.0
LAG_WINDOW = 5 * 60.0
BACKLOG_AGE = 300.0  # a destination whose oldest pending delivery is older than this shows "backlog"
MAX_FORM = 2_000_000
WHEN = re.compile(WHEN_PATTERN)
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # search URLs can carry a patient identifier
    "Cache-Control": "no-store",
}
DEAD_KINDS = {"dead": "dead delivery", ERROR: "processing error", REVIEW: "waits for review"}


class ConsoleError(Exception):
    """Answered as an HTML page with this status and a message that says what to do."""

    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code
        self.message = message


class LoginRequired(Exception):
    """No live session: a page goes to the login form, a script gets 401."""

    def __init__(self, script: bool = False):
        super().__init__("log in")
        self.script = script


def _thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return asyncio.to_thread(fn, *args, **kwargs)


def _source(request: Request) -> str:
    host = request.client.host if request.client else "?"
    return f"console from {host}"


def _first(fields: Mapping[str, list[str]], name: str, default: str = "") -> str:
    got = fields.get(name)
    return got[0] if got else default


class Console:
    def __init__(self, ctx: AdminContext):
        self.ctx = ctx
        self.sessions = SessionStore()
        started = time.time()
        self.rejections = render.Recent(REJECTIONS_WINDOW, start=started)
        self.lags = render.Recent(LAG_WINDOW, start=started)
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(HERE / "templates")),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.globals.update(
            fmt_time=render.fmt_time,
            fmt_ago=render.fmt_ago,
            fmt_age=render.fmt_age,
            iso=render.iso_utc,
            short_json=render.short_json,
            READ=READ,
            OPERATE=OPERATE,
            ADMIN=ADMIN,
            PHI=PHI,
            refresh_ms=int(REFRESH_SECONDS * 1000),
        )

    # -------------------------------------------------------------- rendering
    def page(
        self, request: Request, template: str, s: Session | None, status_code: int = 200, **values: Any
    ) -> HTMLResponse:
        flash = ""
        if s is not None and s.flash:
            flash, s.flash = s.flash, ""
        body = self.env.get_template(template).render(
            s=s,
            who=s.who if s else None,
            csrf=s.csrf if s else "",
            path=request.url.path,
            flash=flash,
            **values,
        )
        return HTMLResponse(body, status_code=status_code, headers=HEADERS)

    # -------------------------------------------------------------- sessions
    async def current(self, request: Request, need: str = READ, *, script: bool = False) -> Session:
        """The request's live session with the permission ``need``; otherwise login or 403."""
        sid = request.cookies.get(SESSION_COOKIE)
        s = self.sessions.get(sid)
        if s is None:
            raise LoginRequired(script)
        if s.who.kind == "token" and self.sessions.due_for_check(s):
            if not await _thread(self._token_still_active, s):
                self.sessions.end(sid)
                raise LoginRequired(script)
            self.sessions.checked(s)
        if not s.who.can(need):
            has = f"role {s.who.role}" if s.who.role else "no role"
            raise ConsoleError(
                403,
                f"this needs {WHAT_NEEDS[need]}; you are logged in as {s.who.name} with {has}"
                f"{' + phi' if s.who.phi else ''}",
            )
        return s

    def _token_still_active(self, s: Session) -> bool:
        for t in tokens.listing(self.ctx.store):
            if t.name == s.who.name and t.created_at == s.token_created_at:
                return t.active
        return False

    def _authenticate(self, value: str) -> tuple[Principal, float | None, float | None]:
        """(who, expires_at, token created_at) for a presented token; ConsoleError(401) otherwise."""
        ctx = self.ctx
        if value.startswith(tokens.PREFIX):
            who = ctx.tokens.verify(value)
            if who is None:
                raise ConsoleError(401, "unknown, revoked or expired token: ask an admin for a new one")
            for t in tokens.listing(ctx.store):
                if t.name == who.name and t.active:
                    return who, t.expires_at, t.created_at
            raise ConsoleError(401, "this token was revoked or expired just now: ask an admin for a new one")
        if ctx.oidc is not None and looks_like_jwt(value):
            try:
                who = ctx.oidc.verify(value)
            except OIDCError as exc:
                raise ConsoleError(401, str(exc)) from None
            import jwt

            exp = jwt.decode(value, options={"verify_signature": False}).get("exp")
            return who, float(exp) if isinstance(exp, int | float) else None, None
        hint = " or an OIDC access token" if ctx.oidc is not None else ""
        raise ConsoleError(
            401,
            f"that is not a Sluice API token{hint}: paste the slc_... token that "
            "'sluice token create' printed",
        )

    async def form(self, request: Request) -> dict[str, list[str]]:
        """The posted form's fields (an empty body is an empty form); read at most MAX_FORM bytes."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_FORM:
                raise ConsoleError(413, "the form is too large: select fewer messages")
            chunks.append(chunk)
        if not size:
            return {}
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("application/x-www-form-urlencoded"):
            raise ConsoleError(
                415, "send the form as application/x-www-form-urlencoded (use the page's form)"
            )
        try:
            return parse_qs(b"".join(chunks).decode("utf-8"), keep_blank_values=True, max_num_fields=100_000)
        except (UnicodeDecodeError, ValueError):
            raise ConsoleError(400, "unreadable form: reload the page and try again") from None

    async def posted(self, request: Request, need: str) -> tuple[Session, dict[str, list[str]]]:
        """A POST's session (``need`` checked) and fields, after its CSRF token is checked."""
        s = await self.current(request, READ)
        fields = await self.form(request)
        sent = request.headers.get("x-csrf-token") or _first(fields, "csrf")
        if not same_secret(sent, s.csrf):
            raise ConsoleError(
                403, "the form's security (CSRF) token is missing or stale: reload the page and try again"
            )
        if not s.who.can(need):
            await self.current(request, need)  # raises the 403 that names the permission
        return s, fields

    # -------------------------------------------------------------- figures
    async def figures(self) -> dict[str, Any]:
        ctx = self.ctx
        paused = await _thread(operations.paused, ctx.store)
        channels = await _thread(status.channels, ctx.config, ctx.store, ctx.engine, paused)
        destinations = await _thread(status.destinations, ctx.config, ctx.store, ctx.engine, paused)
        samples = await _thread(ctx.engine.metric_samples)
        now = time.time()
        rej = render.sum_samples(samples, "sluice_rejections_total", c="channel", k="class")
        dead = render.sum_samples(samples, "sluice_dead_letters_total", d="destination")
        lag_sum = render.sum_samples(samples, "sluice_delivery_lag_seconds_sum", d="destination")
        lag_count = render.sum_samples(samples, "sluice_delivery_lag_seconds_count", d="destination")
        up = render.sum_samples(samples, "sluice_destination_up", d="destination")
        self.rejections.observe(
            now,
            {("rej", *k): v for k, v in rej.items()} | {("dead", *k): v for k, v in dead.items()},
        )
        self.lags.observe(
            now,
            {("lag_sum", *k): v for k, v in lag_sum.items()}
            | {("lag_count", *k): v for k, v in lag_count.items()},
        )
        for ch in channels:
            ch["lag"] = render.mean_lag(self.lags, ch["destinations"])
        for d in destinations:
            d["lag"] = render.mean_lag(self.lags, [d["name"]])
            d["dead_recent"] = int(self.rejections.delta(("dead", d["name"])))
            d["health"], d["health_why"] = _health(d, up.get((d["name"],)))
        classes = sorted({k for _c, k in rej} | set(REJECTION_CLASSES), key=_class_order)
        rejections = []
        for k in classes:
            per = {c: v for (c, kk), v in rej.items() if kk == k and v}
            rejections.append(
                {
                    "class": k,
                    "recent": int(sum(self.rejections.delta(("rej", c, k)) for c in per)),
                    "total": int(sum(per.values())),
                    "channels": sorted(per.items()),
                }
            )
        return {
            "channels": channels,
            "destinations": destinations,
            "rejections": rejections,
            "window_min": int(REJECTIONS_WINDOW // 60),
            "lag_window_min": int(LAG_WINDOW // 60),
            "now": now,
        }


def _class_order(k: str) -> tuple[int, str]:
    return (REJECTION_CLASSES.index(k) if k in REJECTION_CLASSES else len(REJECTION_CLASSES), k)


def _health(d: Mapping[str, Any], up: float | None) -> tuple[str, str]:
    if d["paused"]:
        return "paused", "deliveries wait until it is resumed"
    if up is not None and up == 0:
        return "failing", "its latest delivery round failed for an availability reason and delivered nothing"
    if d["oldest_pending_age_seconds"] > BACKLOG_AGE:
        return "backlog", f"a delivery has waited longer than {int(BACKLOG_AGE // 60)} min"
    if d["dead_recent"]:
        return (
            "dead letters",
            f"{d['dead_recent']} dead-lettered in the last {int(REJECTIONS_WINDOW // 60)} min",
        )
    return "healthy", "delivering"


def _when(name: str, value: str, errors: list[str]) -> float | None:
    if not value:
        return None
    if not WHEN.match(value.strip()):
        errors.append(
            f"{name}: cannot read {value!r}: use e.g. 30m, 2h, 3d, 2026-11-23T08:00 or epoch seconds"
        )
        return None
    try:
        return operations.parse_when(value)
    except operations.OperationError as exc:
        errors.append(f"{name}: {exc}")
    except (OverflowError, ValueError):  # e.g. 174653661d: before year 1
        errors.append(f"{name}: {value} is out of range: use e.g. 30m, 2h, 3d or an ISO date")
    return None


def _int(name: str, value: str, errors: list[str], *, lo: int, hi: int, default: int | None) -> int | None:
    if not value:
        return default
    try:
        n = int(value)
    except ValueError:
        errors.append(f"{name}: {value!r} is not a whole number")
        return default
    if not lo <= n <= hi:
        errors.append(f"{name}: must be between {lo} and {hi}")
        return default
    return n


def _message_id(text: str) -> int:
    if not text.isdigit() or len(text) > 16:
        raise ConsoleError(404, f"no message {text!r}: message ids are whole numbers")
    return int(text)


def _canonical(request: Request) -> str | None:
    """The URL without empty query parameters (a submitted form sends every field), or None if clean."""
    items = list(request.query_params.multi_items())
    kept = [(k, v) for k, v in items if v != ""]
    if len(kept) == len(items):
        return None
    return request.url.path + (("?" + urlencode(kept)) if kept else "")


# ------------------------------------------------------------------ replay selections


@dataclass(frozen=True)
class Selection:
    """What the dead-letter page asks to replay: picked rows, or a filter."""

    picks: tuple[tuple[str, int], ...] = ()  # (status: dead | error | review, message id)
    channel: str = ""
    status: str = ""
    destination: str = ""
    since: str = ""
    until: str = ""

    @classmethod
    def read(cls, fields: Mapping[str, list[str]]) -> Selection:
        picks = []
        for value in fields.get("pick", []):
            kind, _, mid = value.partition(":")
            if kind not in DEAD_KINDS or not mid.isdigit() or len(mid) > 16:
                raise ConsoleError(400, f"cannot read the selected row {value!r}: reload the page")
            picks.append((kind, int(mid)))
        if _first(fields, "mode") == "filter":
            return cls(
                channel=_first(fields, "channel").strip(),
                status=_first(fields, "status", "dead").strip(),
                destination=_first(fields, "destination").strip(),
                since=_first(fields, "since").strip(),
                until=_first(fields, "until").strip(),
            )
        if not picks:
            raise ConsoleError(
                400, "nothing selected: tick the dead letters to replay, or use 'Replay by filter'"
            )
        return cls(picks=tuple(dict.fromkeys(picks)))

    def requests(self) -> list[operations.ReplayRequest]:
        if self.picks:
            by: dict[str, list[int]] = {}
            for kind, mid in self.picks:
                by.setdefault(kind, []).append(mid)
            return [operations.ReplayRequest(ids=tuple(ids), status=kind) for kind, ids in by.items()]
        errors: list[str] = []
        since, until = _when("since", self.since, errors), _when("until", self.until, errors)
        if not self.channel:
            errors.append("channel: choose the channel whose messages to replay")
        if errors:
            raise ConsoleError(422, "; ".join(errors))
        return [
            operations.ReplayRequest(
                channel=self.channel,
                status=self.status or "dead",
                destination=self.destination or None,
                since=since,
                until=until,
            )
        ]

    def hidden(self) -> list[tuple[str, str]]:
        """The selection as form fields, to carry it from the preview to the replay."""
        if self.picks:
            return [("pick", f"{k}:{m}") for k, m in self.picks]
        return [
            ("mode", "filter"),
            ("channel", self.channel),
            ("status", self.status),
            ("destination", self.destination),
            ("since", self.since),
            ("until", self.until),
        ]


# ------------------------------------------------------------------ routes


def mount(app: FastAPI) -> None:
    """Add the console's pages, its static files and its error pages to the admin app."""
    console = Console(app.state.ctx)
    app.state.console = console
    router = APIRouter(include_in_schema=False)
    ctx = console.ctx

    @app.exception_handler(ConsoleError)
    async def console_error(request: Request, exc: ConsoleError) -> Response:
        s = console.sessions.get(request.cookies.get(SESSION_COOKIE))
        if request.headers.get("x-requested-with") == "fetch":
            return JSONResponse(
                {"error": {"message": exc.message}}, status_code=exc.status_code, headers=HEADERS
            )
        return console.page(
            request, "error.html", s, exc.status_code, message=exc.message, code=exc.status_code
        )

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired) -> Response:
        if exc.script:
            return JSONResponse(
                {"error": {"message": "your session ended: log in again"}}, status_code=401, headers=HEADERS
            )
        if request.method == "GET":
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            where = "/login" + (f"?{urlencode({'next': target})}" if target != "/" else "")
            resp: Response = RedirectResponse(where, status_code=303, headers=HEADERS)
        else:
            resp = console.page(
                request, "error.html", None, 401, code=401, message="your session ended: log in again"
            )
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    # -------------------------------------------------------------- login, logout
    def login_page(request: Request, status_code: int = 200, error: str = "", nxt: str = "/") -> HTMLResponse:
        import secrets

        nonce = secrets.token_urlsafe(24)
        resp = console.page(
            request,
            "login.html",
            None,
            status_code,
            error=error,
            nxt=safe_next(nxt),
            login_csrf=nonce,
            oidc=ctx.oidc is not None,
        )
        resp.set_cookie(
            LOGIN_COOKIE,
            nonce,
            max_age=3600,
            path="/login",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return resp

    @router.get("/login")
    async def login_form(request: Request) -> Response:
        nxt = request.query_params.get("next", "/")
        if console.sessions.get(request.cookies.get(SESSION_COOKIE)) is not None:
            return RedirectResponse(safe_next(nxt), status_code=303, headers=HEADERS)
        return login_page(request, nxt=nxt)

    @router.post("/login")
    async def login(request: Request) -> Response:
        fields = await console.form(request)
        nxt = _first(fields, "next", "/")
        if not same_secret(request.cookies.get(LOGIN_COOKIE, ""), _first(fields, "login_csrf")):
            return login_page(
                request, 403, "the login form expired or came from another site: log in again here", nxt
            )
        value = _first(fields, "token").strip()
        if not value:
            return login_page(request, 400, "paste your API token into the Token field", nxt)
        try:
            who, expires_at, created_at = await _thread(console._authenticate, value)
        except ConsoleError as exc:
            return login_page(request, exc.status_code, exc.message, nxt)
        console.sessions.end(request.cookies.get(SESSION_COOKIE))
        sid, _s = console.sessions.create(who, expires_at=expires_at, token_created_at=created_at)
        resp = RedirectResponse(safe_next(nxt), status_code=303, headers=HEADERS)
        resp.set_cookie(
            SESSION_COOKIE,
            sid,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        resp.delete_cookie(LOGIN_COOKIE, path="/login")
        return resp

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        sid = request.cookies.get(SESSION_COOKIE)
        s = console.sessions.get(sid)
        if s is not None:
            fields = await console.form(request)
            if not same_secret(request.headers.get("x-csrf-token") or _first(fields, "csrf"), s.csrf):
                raise ConsoleError(
                    403, "the form's security (CSRF) token is missing or stale: reload the page"
                )
            console.sessions.end(sid)
        resp = RedirectResponse("/login", status_code=303, headers=HEADERS)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    # -------------------------------------------------------------- dashboard
    @router.get("/")
    async def dashboard(request: Request) -> Response:
        s = await console.current(request)
        return console.page(request, "dashboard.html", s, **await console.figures())

    @router.get("/live")
    async def live(request: Request) -> Response:
        s = await console.current(request, script=True)
        return console.page(request, "_live.html", s, **await console.figures())

    # -------------------------------------------------------------- messages
    search_fields = (
        "control_id",
        "type",
        "trigger",
        "status",
        "channel",
        "destination",
        "since",
        "until",
        "patient",
        "limit",
        "cursor",
    )

    @router.get("/messages")
    async def messages(request: Request) -> Response:
        s = await console.current(request)
        if (clean := _canonical(request)) is not None:
            return RedirectResponse(clean, status_code=303, headers=HEADERS)
        p = request.query_params
        f = {k: p.get(k, "").strip() for k in search_fields}
        errors: list[str] = []
        limit = _int("limit", f["limit"], errors, lo=1, hi=search.MAX_LIMIT, default=50)
        cursor = _int("cursor", f["cursor"], errors, lo=0, hi=MAX_ID, default=None)
        since, until = _when("since", f["since"], errors), _when("until", f["until"], errors)
        for k, most in (("control_id", 200), ("type", 10), ("trigger", 10), ("status", 20), ("patient", 200)):
            if len(f[k]) > most:
                errors.append(f"{k}: at most {most} characters")
        items: list[dict[str, Any]] = []
        nxt: int | None = None
        if not errors:
            q = search.MessageQuery(
                control_id=f["control_id"] or None,
                type=f["type"] or None,
                trigger=f["trigger"] or None,
                status=f["status"] or None,
                channel=f["channel"] or None,
                destination=f["destination"] or None,
                since=since,
                until=until,
                patient_hash=search.patient_hash(ctx.patient_key, f["patient"]) if f["patient"] else None,
                limit=limit or 50,
                cursor=cursor,
            )
            rows, nxt = await _thread(search.search, ctx.store, q)
            items = [search.summary(r) for r in rows]
        base = [(k, v) for k, v in f.items() if v and k != "cursor"]
        return console.page(
            request,
            "messages.html",
            s,
            422 if errors else 200,
            f=f,
            errors=errors,
            items=items,
            next_url=f"/messages?{urlencode([*base, ('cursor', str(nxt))])}" if nxt is not None else "",
            first_url=f"/messages?{urlencode(base)}" if f["cursor"] else "",
            statuses=MESSAGE_STATUSES,
            channel_names=[c.name for c in ctx.config.channels],
            destination_names=list(ctx.config.destinations),
            filtered=bool(base),
        )

    async def message_page(
        request: Request, s: Session, message_id: int, status_code: int = 200, **extra: Any
    ) -> HTMLResponse:
        m = await _thread(search.detail, ctx.store, message_id)
        if m is None:
            raise ConsoleError(404, f"no message {message_id} (it may have been removed by retention)")
        extra.setdefault("content", None)
        extra.setdefault("reveal_error", "")
        return console.page(request, "message.html", s, status_code, m=m, **extra)

    @router.get("/messages/{message_id}")
    async def message(request: Request, message_id: str) -> Response:
        s = await console.current(request)
        return await message_page(request, s, _message_id(message_id))

    @router.post("/messages/{message_id}/reveal")
    async def reveal(request: Request, message_id: str) -> Response:
        s, fields = await console.posted(request, PHI)
        mid = _message_id(message_id)
        reason = _first(fields, "reason").strip()
        if not reason or len(reason) > 2000:
            return await message_page(
                request,
                s,
                mid,
                422,
                reveal_error="say why you need to see this message (at most 2,000 characters): "
                "it is recorded in the audit trail",
            )
        try:
            raw, outs = await _thread(
                operations.view_content, ctx.store, s.who, mid, reason=reason, source=_source(request)
            )
        except operations.NotFound as exc:
            raise ConsoleError(404, str(exc)) from None
        raw_text = _text(raw)
        content = {
            "reason": reason,
            "at": time.time(),
            "raw": raw_text,
            "raw_html": render.hl7_markup(raw_text) if raw_text else None,
            "segments": render.hl7_segment_count(raw_text) if raw_text else 0,
            "outputs": [
                {
                    "destination": d,
                    "content_type": ct,
                    "text": render.pretty_output(ct, _text(p)),
                    "hl7_html": render.hl7_markup(_text(p) or "") if render.is_hl7(ct, _text(p)) else None,
                    "missing": p is None,
                }
                for d, ct, p in outs
            ],
        }
        return await message_page(request, s, mid, content=content)

    # -------------------------------------------------------------- dead letters and replay
    def dead_rows(channel: str | None, destination: str | None, limit: int) -> list[dict[str, Any]]:
        out = []
        for r in ctx.store.dead_letters(channel=channel, destination=destination, limit=limit):
            item = search.dead_letter(r)
            item["kind"] = DEAD_KINDS.get(item["status"], item["status"])
            out.append(item)
        return out

    @router.get("/dead-letters")
    async def dead_letters(request: Request) -> Response:
        s = await console.current(request)
        if (clean := _canonical(request)) is not None:
            return RedirectResponse(clean, status_code=303, headers=HEADERS)
        p = request.query_params
        errors: list[str] = []
        channel, destination = p.get("channel", "").strip(), p.get("destination", "").strip()
        limit = _int("limit", p.get("limit", ""), errors, lo=1, hi=search.MAX_LIMIT, default=100) or 100
        rows = await _thread(dead_rows, channel or None, destination or None, limit)
        return console.page(
            request,
            "dead_letters.html",
            s,
            422 if errors else 200,
            rows=rows,
            errors=errors,
            channel=channel,
            destination=destination,
            limit=limit,
            channel_names=[c.name for c in ctx.config.channels],
            destination_names=list(ctx.config.destinations),
        )

    async def run_replay(
        request: Request, s: Session, sel: Selection, *, dry_run: bool, why: str = ""
    ) -> tuple[list[tuple[int, list[str] | None]], int]:
        selection: list[tuple[int, list[str] | None]] = []
        replayed = 0
        for req in sel.requests():
            try:
                res = await _thread(
                    operations.replay,
                    ctx.store,
                    s.who,
                    req,
                    dry_run=dry_run,
                    why=why,
                    source=_source(request),
                )
            except operations.OperationError as exc:
                raise ConsoleError(400, str(exc)) from None
            selection.extend(res.selection)
            replayed += res.replayed
        return selection, replayed

    @router.post("/dead-letters/preview")
    async def replay_preview(request: Request) -> Response:
        s, fields = await console.posted(request, OPERATE)
        sel = Selection.read(fields)
        selection, _ = await run_replay(request, s, sel, dry_run=True)
        return console.page(
            request, "replay.html", s, selection=selection, hidden=sel.hidden(), done=False, why="", error=""
        )

    @router.post("/dead-letters/replay")
    async def replay(request: Request) -> Response:
        s, fields = await console.posted(request, OPERATE)
        sel = Selection.read(fields)
        why = _first(fields, "why").strip()
        if not why or len(why) > 2000:
            selection, _ = await run_replay(request, s, sel, dry_run=True)
            return console.page(
                request,
                "replay.html",
                s,
                422,
                selection=selection,
                hidden=sel.hidden(),
                done=False,
                why=why[:2000],
                error="say why you replay (at most 2,000 characters): it is recorded with the replay",
            )
        selection, replayed = await run_replay(request, s, sel, dry_run=False, why=why)
        return console.page(
            request,
            "replay.html",
            s,
            selection=selection,
            hidden=[],
            done=True,
            replayed=replayed,
            why=why,
            error="",
        )

    # -------------------------------------------------------------- channels and destinations
    @router.get("/channels")
    async def channels(request: Request) -> Response:
        s = await console.current(request)
        paused = await _thread(operations.paused, ctx.store)
        chans = await _thread(status.channels, ctx.config, ctx.store, ctx.engine, paused)
        dests = await _thread(status.destinations, ctx.config, ctx.store, ctx.engine, paused)
        since = {f"{k}:{n}": v for (k, n), v in paused.items()}
        return console.page(request, "channels.html", s, channels=chans, destinations=dests, paused_by=since)

    def pause_route(kind: str, pause: bool) -> None:
        verb = "pause" if pause else "resume"
        plural = "channels" if kind == "channel" else "destinations"

        async def act(request: Request, name: str) -> Response:
            s, fields = await console.posted(request, OPERATE)
            names = (
                [c.name for c in ctx.config.channels] if kind == "channel" else list(ctx.config.destinations)
            )
            if name not in names:
                raise ConsoleError(404, f"no {kind} named {name!r}: see the Channels page")
            reason = _first(fields, "reason").strip()[:2000]
            changed = await _thread(
                operations.set_paused,
                ctx.store,
                s.who,
                kind,
                name,
                pause,
                reason=reason,
                source=_source(request),
            )
            ctx.engine.apply_pause(kind, name, pause)
            state = "paused" if pause else "resumed"
            s.flash = (
                f"{kind.capitalize()} {name} {state}."
                if changed
                else f"{kind.capitalize()} {name} was already {state}."
            )
            return RedirectResponse(f"/channels#{kind}-{name}", status_code=303, headers=HEADERS)

        router.add_api_route(
            f"/{plural}/{{name}}/{verb}", act, methods=["POST"], name=f"console_{verb}_{kind}"
        )

    for kind in ("channel", "destination"):
        for pause in (True, False):
            pause_route(kind, pause)

    # -------------------------------------------------------------- config (admin)
    @router.get("/config")
    async def config(request: Request) -> Response:
        s = await console.current(request, ADMIN)
        cfg = ctx.config
        engine_view = {
            "file": cfg.file,
            "store": ctx.store.safe_url,
            "node_id": cfg.node_id,
            "processing_workers": cfg.processing_workers,
            "plugins": list(cfg.plugins),
            "plugin_paths": [str(p) for p in cfg.plugin_paths],
            "logging": cfg.logging,
            "admin": cfg.admin,
        }
        return console.page(
            request,
            "config.html",
            s,
            engine_text=render.config_text(engine_view),
            channels=[(c.name, render.config_text(c)) for c in cfg.channels],
            destinations=[(n, render.config_text(d)) for n, d in cfg.destinations.items()],
            alerts_text=render.config_text(cfg.alerts),
        )

    # -------------------------------------------------------------- audit (admin)
    @router.get("/audit")
    async def audit_page(request: Request) -> Response:
        s = await console.current(request, ADMIN)
        if (clean := _canonical(request)) is not None:
            return RedirectResponse(clean, status_code=303, headers=HEADERS)
        p = request.query_params
        f = {
            k: p.get(k, "").strip()
            for k in ("action", "actor", "target", "since", "until", "cursor", "limit")
        }
        errors: list[str] = []
        since, until = _when("since", f["since"], errors), _when("until", f["until"], errors)
        cursor = _int("cursor", f["cursor"], errors, lo=0, hi=MAX_ID, default=None)
        limit = _int("limit", f["limit"], errors, lo=1, hi=search.MAX_LIMIT, default=100) or 100
        rows: list[audit.AuditEntry] = []
        if not errors:
            rows = await _thread(
                audit.entries,
                ctx.store,
                since=since,
                until=until,
                action=f["action"] or None,
                actor=f["actor"] or None,
                target=f["target"] or None,
                before_id=cursor,
                limit=limit + 1,
            )
        more = len(rows) > limit
        rows = rows[:limit]
        base = [(k, v) for k, v in f.items() if v and k != "cursor"]
        return console.page(
            request,
            "audit.html",
            s,
            422 if errors else 200,
            f=f,
            errors=errors,
            rows=rows,
            actions=audit.ACTIONS,
            next_url=f"/audit?{urlencode([*base, ('cursor', str(rows[-1].id))])}" if more and rows else "",
            first_url=f"/audit?{urlencode(base)}" if f["cursor"] else "",
        )

    app.include_router(router)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
