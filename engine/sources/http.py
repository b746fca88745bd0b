"""``source: {kind: http}``: FHIR resources, Bundles and Subscription notifications pushed over HTTP(S).

A plain ASGI app served by uvicorn in the engine's loop (like the admin API).  ``POST {path}`` (or
``{path}/{Type}``, ``PUT {path}/{Type}/{id}``) with ``application/fhir+json``:

* a resource → one message; a Bundle (transaction, batch, collection, history) → one message per entry
  resource; a subscription notification (R4B/R5 ``subscription-notification`` Bundle, or the R4 backport's
  with a ``SubscriptionStatus``/``Parameters`` first entry) → its focus resources;
* notifications without resources (engine/sources/notifications.py): with a ``fetch:`` section, an
  id-only one → each focus read from ``fetch.base_url`` (only there: a focus elsewhere is 422) and stored
  as a pushed version (a focus answered 404/410 → a deletion, stored as fhir-poll stores one), all in one
  transaction with the focus resources the notification carries, after every read succeeded (a failed read → 503 + ``Retry-After``, nothing stored); an
  empty one (an R4 rest-hook POST without a body, an event without focus) → fhir-poll's incremental search
  of ``fetch.resources`` since the channel's cursor (engine/sources/fhir_poll.py: pages committed with the
  cursor); both answered after the commit.  Without ``fetch:`` they are answered 200 (the server must not
  retry forever), counted (``sluice_http_notifications_unresolved_total{channel, kind}``) and logged at
  warning at most once a minute.  ``handshake``/``heartbeat``/``query-*`` notifications: 200, nothing;
* each version becomes a stored message exactly as a polled one (engine/sources/resources.py), and a
  version already stored (same id and ``meta.versionId``, or the same body without one) is not stored
  again;
* the answer comes after the durable commit: 201 (something new) or 200 (nothing new) with an
  OperationOutcome saying how many; 4xx with an OperationOutcome that says what is wrong; 503 with
  ``Retry-After`` when the store's writer is behind (``max_backlog``);
* an ``Idempotency-Key`` header is stored with the answer in the same transaction: a retried request gets
  the first answer and creates nothing;
* ``x-application/hl7-v2+er7``: an HL7 v2 message (or FHS/BHS batch) takes the MLLP intake path of the
  channel (accepted types, validation, dedupe by MSH-10, durable commit) and the answer is its ACK.

Auth: ``auth: {type: bearer, token: {env: NAME}}`` (401 without it), and/or mutual TLS
(``tls: {cert, key, ca, require_client_cert: true}``).  Nothing of a body is logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Any

import orjson
import structlog
from sqlalchemy import insert, select

from engine.config import ChannelConfig, HttpSourceConfig
from engine.destinations.base import DestinationContext, secret
from engine.sources import history, notifications, resources
from engine.store import IDEMPOTENCY, M, NewMessage, Store

log = structlog.get_logger("sluice.http_source")

SOURCE_NAME = "http"
FHIR_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
HL7_TYPE = "x-application/hl7-v2+er7"
NOTIFICATION_META = notifications.STATUS_TYPES
FETCH_RETRY_AFTER = b"10"  # seconds a server waits before it sends a notification whose reads failed again
UNRESOLVED_LOG_EVERY = 60.0  # seconds between two warnings about notifications without fetch:


def outcome(severity: str, code: str, text: str) -> bytes:
    return orjson.dumps(
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": text}],
        }
    )


class Unfilled(Exception):
    """A Bundle without resources, or with entries that name one without carrying it; ``found`` are the
    ones it carries (checked as any pushed resource)."""

    def __init__(self, found: list[dict[str, Any]]):
        super().__init__("entries without a resource")
        self.found = found


class FetchFailed(Exception):
    """A read from ``fetch.base_url`` failed: the notification is answered 503 (the server sends it again)."""

    def __init__(self, text: str, error: str, status: int | None):
        super().__init__(text)
        self.text, self.error, self.status = text, error, status


def idempotency_hash(idempotency_key: str | None) -> str:
    """The stored form of an ``Idempotency-Key`` header (its SHA-256; the header itself is not kept); ""
    without one."""
    if not idempotency_key:
        return ""
    return hashlib.sha256(idempotency_key.encode("utf-8", "surrogateescape")).hexdigest()


def first_answer(conn: Any, channel: str, key: str) -> tuple[int, bytes] | None:
    """The status and body a request with this (hashed) Idempotency-Key was first answered with, if any."""
    prior = conn.execute(
        select(IDEMPOTENCY.c.status, IDEMPOTENCY.c.body).where(
            IDEMPOTENCY.c.channel == channel, IDEMPOTENCY.c.key == key
        )
    ).first()
    return None if prior is None else (int(prior.status), str(prior.body).encode())


def stored_answer(conn: Any, channel: str, key: str | None, status: int, text: str, now: float) -> bytes:
    """The OperationOutcome a write answers with; under an ``Idempotency-Key`` it is stored with the messages
    in the same transaction, so a retried request gets this answer and creates nothing."""
    answer = outcome("information", "informational", text)
    if key:
        conn.execute(
            insert(IDEMPOTENCY).values(channel=channel, key=key, status=status, body=answer.decode(), at=now)
        )
    return answer


class Refused(Exception):
    def __init__(self, status: int, code: str, text: str):
        super().__init__(text)
        self.status, self.code, self.text = status, code, text


def resources_of(body: Any, allowed: tuple[str, ...]) -> list[dict[str, Any]]:
    """The resources a pushed body carries (see the module doc); ``Refused`` (4xx) when it carries none
    that can be taken, saying why; :class:`Unfilled` when it is a Bundle with no resource, or with an entry
    without one (a notification that names a focus to read)."""
    if not isinstance(body, dict) or not body.get("resourceType"):
        raise Refused(400, "structure", "the body is not a FHIR resource (a JSON object with resourceType)")
    unfilled = False
    if body["resourceType"] == "Bundle":
        found = []
        for e in body.get("entry", ()) or ():
            res = e.get("resource") if isinstance(e, dict) else None
            if (
                isinstance(res, dict)
                and res.get("resourceType")
                and res["resourceType"] not in NOTIFICATION_META
            ):
                found.append(res)
            elif res is None:
                unfilled = True
        unfilled = unfilled or not found
    else:
        found = [body]
    if allowed:
        wrong = sorted({str(r["resourceType"]) for r in found} - set(allowed))
        if wrong:
            raise Refused(
                422,
                "not-supported",
                f"this endpoint takes {', '.join(allowed)}, not {', '.join(w[:40] for w in wrong)}",
            )
    for r in found:
        if not r.get("id"):
            raise Refused(
                422,
                "required",
                f"a {str(r['resourceType'])[:40]} without an id: the engine matches updates by id; send the "
                "resource as the server stored it (with id and meta.versionId)",
            )
    if unfilled:  # (an exception: the full-resource path pays no test after the call)
        raise Unfilled(found)
    return found


def last_stored_body(conn: Any, channel: str, ref: str) -> bytes | None:
    """The body of the newest stored version of ``ref`` (``Type/id``) on ``channel``, by its control id
    ``Type/id/_history/...``: a deletion's tombstone of a resource pushed in full (the versions read through
    ``fetch:`` are found by ``Store.last_resource_body``).  Only on the deletion path."""
    prefix = f"{ref}/_history/"
    like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    q = select(M.c.raw).where(
        M.c.channel == channel, M.c.control_id.like(like, escape="\\"), M.c.raw.is_not(None)
    )
    if conn.dialect.name == "sqlite":  # bytewise order: the range seeks ix_messages_control_channel
        q = q.where(M.c.control_id >= prefix, M.c.control_id < prefix[:-1] + "0")
    row = conn.execute(q.order_by(M.c.id.desc()).limit(1)).first()
    return bytes(row[0]) if row is not None and row[0] is not None else None


class HttpSource:
    """One channel's HTTP endpoint (an ASGI app)."""

    def __init__(
        self,
        channel: ChannelConfig,
        store: Store,
        committer: Any,
        *,
        ctx: DestinationContext,
        on_stored: Callable[[], None] = lambda: None,
        intake: Any = None,
        metrics: Any = None,
    ):
        self.received = metrics.channel(channel.name).received if metrics is not None else None
        cfg = channel.source.http
        self.intake = intake  # engine.intake.Intake: HL7 v2 over HTTP takes the MLLP intake path
        assert cfg is not None
        self.channel = channel
        self.cfg: HttpSourceConfig = cfg
        self.store = store
        self.committer = committer
        self.on_stored = on_stored
        self.path = "/" + cfg.path.strip("/") if cfg.path.strip("/") else ""
        self.token: bytes | None = None
        auth = dict(cfg.auth)
        if auth.get("type", "none") == "bearer":
            ctx = DestinationContext(ctx.base_dir, channel.file)
            self.token = secret(
                auth.get("token"), what="http source token", ctx=ctx, key="source.auth.token"
            ).encode()
        self.requests = 0
        self.unresolved = metrics.http_unresolved if metrics is not None else None
        self.unresolved_since_log: dict[str, int] = {}
        self.unresolved_logged_at = 0.0
        self.fetcher: Any = None  # engine.sources.fhir_poll.FhirPoller reading from fetch.base_url
        if cfg.fetch is not None:
            from engine.sources.fhir_poll import FhirPoller

            self.fetcher = FhirPoller(
                channel,
                store,
                committer.run_op,
                ctx=ctx,
                on_stored=on_stored,
                metrics=metrics,
                poll=cfg.fetch,
                key="source.fetch",
                source_name=SOURCE_NAME,
                facility="http",  # as pushed versions: a version pushed and read is stored once
            )
        self.search_lock = asyncio.Lock()

    async def aclose(self) -> None:
        if self.fetcher is not None:
            await self.fetcher.aclose()

    # ------------------------------------------------------------------ ASGI
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        status, body, headers = await self._answer(scope, receive)
        if not any(k == b"content-type" for k, _ in headers):
            headers = [(b"content-type", b"application/fhir+json"), *headers]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _answer(
        self, scope: dict[str, Any], receive: Any
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        self.requests += 1
        try:
            hdrs = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
            self._authorise(hdrs)
            method, path = scope["method"], scope["path"]
            if method not in ("POST", "PUT") or not (path == self.path or path.startswith(self.path + "/")):
                raise Refused(
                    404 if method in ("POST", "PUT") else 405,
                    "not-supported",
                    f"send POST {self.path or '/'}",
                )
            body = await self._body(receive)
            ctype = hdrs.get("content-type", "").split(";", 1)[0].strip().lower()
            if not body.strip():
                return await self._resolve(notifications.Notification("empty"), hdrs)
            if ctype not in (*FHIR_TYPES, HL7_TYPE) or (ctype == HL7_TYPE and self.intake is None):
                raise Refused(
                    415,
                    "not-supported",
                    f"send application/fhir+json or {HL7_TYPE}, not {ctype[:60] or 'no content type'}",
                )
            if self.committer.backlog > self.cfg.max_backlog:
                return (
                    503,
                    outcome("error", "transient", "the engine is busy; retry"),
                    [(b"retry-after", b"1")],
                )
            if ctype == HL7_TYPE:
                return await self._hl7(body, scope)
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise Refused(400, "structure", "the body is not valid JSON") from None
            try:
                found = resources_of(parsed, self.cfg.resources)
            except Unfilled as exc:  # entries without a resource (never a full-resource notification)
                found = exc.found
                note = notifications.read(parsed)
                if note.kind and not found:
                    return await self._resolve(note, hdrs)
                if note.kind == "id-only":  # focus resources and some to read (an R5 deletion entry)
                    if self.fetcher is not None:
                        return await self._resolve(note, hdrs, found)
                    self._unresolved(note.kind)  # what the notification carries is stored below
            key = hdrs.get("idempotency-key", "")
            status, answer, new = await self.committer.run_op(
                self._writer(found, key), len(body), durable=True
            )
            if new:
                if self.received is not None:  # sluice_messages_received_total, as for MLLP messages
                    self.received.inc(new)
                self.on_stored()
            return status, answer, []
        except Refused as exc:
            extra = [(b"www-authenticate", b"Bearer")] if exc.status == 401 else []
            return exc.status, outcome("error", exc.code, exc.text), extra

    # ------------------------------------------------------------------ notifications without resources
    async def _resolve(
        self,
        note: notifications.Notification,
        hdrs: dict[str, str],
        carried: list[dict[str, Any]] | None = None,
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """A notification that carries no resource, or (``carried``) not every focus (see the module doc)."""
        if note.kind in notifications.QUIET:
            return 200, outcome("information", "informational", f"{note.kind}: nothing to store"), []
        if self.fetcher is None:
            self._unresolved(note.kind)
            what = "an id-only" if note.kind == "id-only" else "an empty"
            return (
                200,
                outcome(
                    "warning",
                    "incomplete",
                    f"{what} notification: nothing stored; this endpoint has no source.fetch to read the "
                    "changed resources from (the engine's operator is told)",
                ),
                [],
            )
        if self.committer.backlog > self.cfg.max_backlog:
            return 503, outcome("error", "transient", "the engine is busy; retry"), [(b"retry-after", b"1")]
        try:
            if note.kind == "id-only":
                return await self._fetch_focus(note.focus, hdrs.get("idempotency-key", ""), carried or [])
            return await self._search()
        except FetchFailed as exc:
            log.warning(
                "http_notification_fetch_failed",
                channel=self.channel.name,
                kind=note.kind,
                error=exc.error,
                status=exc.status,
            )
            return 503, outcome("error", "transient", exc.text), [(b"retry-after", FETCH_RETRY_AFTER)]

    def _unresolved(self, kind: str) -> None:
        """Counted, and a warning at most once a minute (with how many since the last one)."""
        if self.unresolved is not None:
            self.unresolved.labels(self.channel.name, kind).inc()
        self.unresolved_since_log[kind] = self.unresolved_since_log.get(kind, 0) + 1
        now = time.monotonic()
        if now - self.unresolved_logged_at >= UNRESOLVED_LOG_EVERY:
            self.unresolved_logged_at = now
            counts, self.unresolved_since_log = self.unresolved_since_log, {}
            log.warning(
                "http_notifications_unresolved",
                channel=self.channel.name,
                **{k.replace("-", "_"): n for k, n in sorted(counts.items())},
                hint="id-only and empty Subscription notifications carry no resource: add source.fetch "
                "(base_url and auth of the FHIR server) so the engine reads the changes, or subscribe "
                "with payload full-resource",
            )

    async def _search(self) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """An empty notification: fhir-poll's incremental search of each ``fetch.resources`` type since the
        channel's cursor, each page committed with the cursor; answered when the last page is."""
        stored = 0
        async with self.search_lock:  # one at a time: a notification waits for a search that starts after it
            self.fetcher.open()
            for rtype in self.fetcher.poll.resources:
                try:
                    stored += await self.fetcher.poll_once(rtype)
                except Exception as exc:
                    status = getattr(getattr(exc, "response", None), "status_code", None)
                    raise FetchFailed(
                        f"searching {rtype} at source.fetch.base_url failed"
                        + (f" (HTTP {status})" if status else f" ({type(exc).__name__})")
                        + "; what was read before is stored; send the notification again",
                        type(exc).__name__,
                        status,
                    ) from exc
        text = f"searched {', '.join(self.fetcher.poll.resources)} since the last search: stored {stored} new resource version(s)"
        return 200, outcome("information", "informational", text), []

    async def _fetch_focus(
        self, refs: tuple[str, ...], idempotency_key: str, carried: list[dict[str, Any]]
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """An id-only notification: read every focus under ``fetch.base_url``, then store them in one
        transaction (a version as a pushed one, a 404/410 as a deletion)."""
        base = self.fetcher.poll.base_url
        focus: list[notifications.Focus] = []
        for n, ref in enumerate(refs, start=1):
            try:
                focus.append(notifications.focus(ref, base))
            except notifications.ForeignFocus as exc:
                raise Refused(
                    422,
                    "security",
                    f"focus {n} of the notification is {exc}: the engine reads notified resources only "
                    f"from source.fetch.base_url ({base[:200]}); subscribe on that server, or change "
                    "fetch.base_url",
                ) from None
        if self.cfg.resources:
            wrong = sorted({f.resource_type for f in focus} - set(self.cfg.resources))
            if wrong:
                raise Refused(
                    422,
                    "not-supported",
                    f"this endpoint takes {', '.join(self.cfg.resources)}, not {', '.join(w[:40] for w in wrong)}",
                )
        focus = list({f.url: f for f in focus}.values())
        limit = asyncio.Semaphore(8)

        async def one(f: notifications.Focus) -> dict[str, Any] | history.Deletion:
            async with limit:
                return await self._read(f)

        got = await asyncio.gather(*(one(f) for f in focus))
        found = [g for g in got if isinstance(g, dict)]
        gone = [g for g in got if isinstance(g, history.Deletion)]
        status, answer, new = await self.committer.run_op(
            self._fetched_writer(carried + found, gone, idempotency_key),
            sum(len(orjson.dumps(r)) for r in carried + found),
            durable=True,
        )
        if new:
            if self.received is not None:
                self.received.inc(new)
            self.on_stored()
        return status, answer, []

    async def _read(self, f: notifications.Focus) -> dict[str, Any] | history.Deletion:
        """One focus: its resource, or a :class:`~engine.sources.history.Deletion` (404/410)."""
        try:
            resp = await self.fetcher.read(f.url)
        except Exception as exc:
            raise FetchFailed(
                f"reading {f.resource_type} from source.fetch.base_url failed ({type(exc).__name__}); "
                "nothing was stored; send the notification again",
                type(exc).__name__,
                None,
            ) from exc
        if resp.status_code in (404, 410):
            etag = resp.headers.get("etag", "")
            version = etag.removeprefix("W/").strip('"') if etag else ""
            return history.Deletion(f.resource_type, f.id, version, None)
        res: Any = None
        if resp.status_code == 200:
            try:
                res = orjson.loads(resp.content)
            except orjson.JSONDecodeError:
                res = None
        if (
            not isinstance(res, dict)
            or res.get("resourceType") != f.resource_type
            or str(res.get("id") or "") != f.id
        ):
            raise FetchFailed(
                f"reading {f.resource_type} from source.fetch.base_url answered HTTP {resp.status_code}"
                + ("" if resp.status_code != 200 else " without that resource")
                + "; nothing was stored; send the notification again",
                "status",
                resp.status_code,
            )
        return res

    def _fetched_writer(
        self, found: list[dict[str, Any]], gone: list[history.Deletion], idempotency_key: str
    ) -> Callable[[Any], tuple[int, bytes, int]]:
        """The id-only notification's transaction: the versions read, a tombstone per deletion (the last
        version this channel took, marked deleted: engine/sources/history.py), each remembered as its
        resource's newest; the Idempotency-Key's answer."""
        ch = self.channel
        now = time.time()
        key = idempotency_hash(idempotency_key)
        window = ch.dedupe.window_days * 86400.0

        def row(res: dict[str, Any]) -> NewMessage:
            return resources.message_row(
                ch.name,
                res,
                orjson.dumps(res),
                source=SOURCE_NAME,
                facility="http",
                received_at=now,
                order_by=ch.order_by,
            )

        def write(conn: Any) -> tuple[int, bytes, int]:
            if key and (first := first_answer(conn, ch.name, key)) is not None:
                return first[0], first[1], 0
            rows: dict[str, NewMessage] = {}
            for res in found:
                r = row(res)
                rows.setdefault(r.dedupe_key, r)
            for d in gone:
                last: Any = None
                body = self.store.last_resource_body(conn, ch.name, d.ref)
                if body is None:  # only ever pushed in full (not remembered: nothing added to that path)
                    body = last_stored_body(conn, ch.name, d.ref)
                if body is not None and resources.is_fhir(body):
                    try:
                        last = orjson.loads(body)
                    except orjson.JSONDecodeError:
                        last = None
                r = row(history.tombstone(d, last if isinstance(last, dict) else None, ""))
                rows.setdefault(r.dedupe_key, r)
            seen = self.store.find_duplicates(
                conn, ch.name, list(rows), now - window, [r.control_id for r in rows.values()]
            )
            fresh = [r for k, r in rows.items() if k not in seen]
            ids = self.store.insert_messages(conn, fresh)
            refs = [r.control_id.split("/_history/", 1)[0] for r in fresh]
            self.store.remember_resources(conn, ch.name, list(zip(refs, ids, strict=True)))
            status = 201 if ids else 200
            text = (
                f"read {len(found)} resource version(s) from source.fetch.base_url"
                + (f" and {len(gone)} deletion(s)" if gone else "")
                + f": stored {len(ids)}; {len(rows) - len(ids)} already stored"
            )
            return status, stored_answer(conn, ch.name, key, status, text, now), len(ids)

        return write

    async def _hl7(self, body: bytes, scope: dict[str, Any]) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """HL7 v2 over HTTP: the channel's MLLP intake path (validation, dedupe, durable commit, ACK); the
        answer is the ACK (several for an FHS/BHS batch, one per line), 200 whatever its code."""
        assert self.intake is not None
        client = scope.get("client") or ("http", 0)
        acks = await self.intake.handle(body, f"{client[0]}:{client[1]}")
        return 200, b"\n".join(acks), [(b"content-type", HL7_TYPE.encode())]

    def _authorise(self, hdrs: dict[str, str]) -> None:
        if self.token is None:
            return
        given = hdrs.get("authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].strip().encode(), self.token):
            raise Refused(401, "login", "a valid bearer token is required (Authorization: Bearer ...)")

    async def _body(self, receive: Any) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.cfg.max_body:
                raise Refused(
                    413, "too-costly", f"the body is over {self.cfg.max_body} bytes (source.max_body)"
                )
            chunks.append(chunk)
            if not msg.get("more_body"):
                return b"".join(chunks)

    # ------------------------------------------------------------------ store
    def _writer(
        self, found: list[dict[str, Any]], idempotency_key: str
    ) -> Callable[[Any], tuple[int, bytes, int]]:
        ch = self.channel
        now = time.time()
        rows: dict[str, NewMessage] = {}
        for res in found:
            raw = orjson.dumps(res)
            row = resources.message_row(
                ch.name, res, raw, source=SOURCE_NAME, facility="http", received_at=now, order_by=ch.order_by
            )
            rows.setdefault(row.dedupe_key, row)
        key = idempotency_hash(idempotency_key)
        window = ch.dedupe.window_days * 86400.0

        def write(conn: Any) -> tuple[int, bytes, int]:
            if key and (first := first_answer(conn, ch.name, key)) is not None:
                return first[0], first[1], 0
            seen = self.store.find_duplicates(
                conn, ch.name, list(rows), now - window, [r.control_id for r in rows.values()]
            )  # (with the control ids the look-up seeks ix_messages_control_channel)
            fresh = [r for k, r in rows.items() if k not in seen]
            ids = self.store.insert_messages(conn, fresh)
            status = 201 if ids else 200
            text = f"stored {len(ids)} resource version(s); {len(rows) - len(ids)} already stored"
            return status, stored_answer(conn, ch.name, key, status, text, now), len(ids)

        return write
