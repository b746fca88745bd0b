"""``source: {kind: http}``: FHIR resources, Bundles and Subscription notifications pushed over HTTP(S).

A plain ASGI app served by uvicorn in the engine's loop (like the admin API).  ``POST {path}`` (or
``{path}/{Type}``, ``PUT {path}/{Type}/{id}``) with ``application/fhir+json``:

* a resource → one message; a Bundle (transaction, batch, collection, history) → one message per entry
  resource; a subscription notification (R4B/R5 ``subscription-notification`` Bundle, or the R4 backport's
  with a ``SubscriptionStatus``/``Parameters`` first entry) → its focus resources; an R4 rest-hook POST
  with an empty body (id-only) is answered 200 and stores nothing;
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
from engine.sources import resources
from engine.store import IDEMPOTENCY, NewMessage, Store

log = structlog.get_logger("sluice.http_source")

SOURCE_NAME = "http"
FHIR_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
HL7_TYPE = "x-application/hl7-v2+er7"
NOTIFICATION_META = frozenset({"SubscriptionStatus", "Parameters"})


def outcome(severity: str, code: str, text: str) -> bytes:
    return orjson.dumps(
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": text}],
        }
    )


class Refused(Exception):
    def __init__(self, status: int, code: str, text: str):
        super().__init__(text)
        self.status, self.code, self.text = status, code, text


def resources_of(body: Any, allowed: tuple[str, ...]) -> list[dict[str, Any]]:
    """The resources a pushed body carries (see the module doc); ``Refused`` (4xx) when it carries none
    that can be taken, saying why."""
    if not isinstance(body, dict) or not body.get("resourceType"):
        raise Refused(400, "structure", "the body is not a FHIR resource (a JSON object with resourceType)")
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
    return found


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
                return (
                    200,
                    outcome("information", "informational", "nothing to store (empty notification)"),
                    [],
                )
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
            found = resources_of(parsed, self.cfg.resources)
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
        key = (
            hashlib.sha256(idempotency_key.encode("utf-8", "surrogateescape")).hexdigest()
            if idempotency_key
            else ""
        )
        window = ch.dedupe.window_days * 86400.0

        def write(conn: Any) -> tuple[int, bytes, int]:
            if key:
                prior = conn.execute(
                    select(IDEMPOTENCY.c.status, IDEMPOTENCY.c.body).where(
                        IDEMPOTENCY.c.channel == ch.name, IDEMPOTENCY.c.key == key
                    )
                ).first()
                if prior is not None:
                    return int(prior.status), str(prior.body).encode(), 0
            seen = self.store.find_duplicates(
                conn, ch.name, list(rows), now - window, [r.control_id for r in rows.values()]
            )  # (with the control ids the look-up seeks ix_messages_control_channel)
            fresh = [r for k, r in rows.items() if k not in seen]
            ids = self.store.insert_messages(conn, fresh)
            status = 201 if ids else 200
            text = f"stored {len(ids)} resource version(s); {len(rows) - len(ids)} already stored"
            answer = outcome("information", "informational", text)
            if key:
                conn.execute(
                    insert(IDEMPOTENCY).values(
                        channel=ch.name, key=key, status=status, body=answer.decode(), at=now
                    )
                )
            return status, answer, len(ids)

        return write
