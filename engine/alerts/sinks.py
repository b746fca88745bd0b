"""Where notices go: a signed webhook, the log, e-mail.  The only I/O of the alerting code besides the store.

A sink's ``send`` raises when the notice did not get through; the runner keeps it and tries again at the
next evaluation (see ``engine.alerts.runner``).  Secrets come from the environment or a file, resolved
when the sinks are built (engine start), so a missing one stops the start naming its key.

Webhook body: the notice as JSON (``Notice.as_dict``) plus ``event``, ``node``, ``sent_at`` and
``version``.  Headers: ``X-Sluice-Timestamp`` (= ``sent_at``, epoch seconds), ``X-Sluice-Signature:
sha256=<hex HMAC-SHA256 of the body with the secret>`` when a secret is set, ``X-Sluice-Event`` and
``X-Sluice-Notice-Id`` (the same on a retry: receivers can drop duplicates).  The signature covers the
body, which carries the timestamp, so a receiver checks the signature, then that ``sent_at`` is recent.
"""

from __future__ import annotations

import asyncio
import hashlib
import smtplib
import ssl
import time
from collections.abc import Mapping
from email.message import EmailMessage

import httpx
import orjson
import structlog

from engine.alerts.config import (
    AlertsConfig,
    LogSinkConfig,
    SinkConfig,
    SmtpSinkConfig,
    WebhookSinkConfig,
    sink_config,
)
from engine.alerts.evaluator import FIRING, Notice
from engine.destinations.base import DestinationContext, secret
from engine.destinations.http import USER_AGENT, resolve_headers, sign

log = structlog.get_logger("sluice.alerts")
BODY_VERSION = 1


class SinkError(Exception):
    """A notice did not get through; it stays queued for the next evaluation."""


def notice_id(notice: Notice) -> str:
    """Stable per notice (incident, state, reminder number): the same on every retry."""
    key = f"{notice.incident}/{notice.state}/{notice.reminder}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


class Sink:
    name: str = ""

    async def send(self, notice: Notice) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections (engine shutdown)."""


class LogSink(Sink):
    def __init__(self, name: str = "log"):
        self.name = name

    async def send(self, notice: Notice) -> None:
        d = notice.as_dict()
        fields = {k: v for k, v in d.items() if k not in ("state", "subject")}
        fields.update(subject_type=notice.subject_type, subject=notice.subject)
        if notice.state == FIRING:
            log.warning("alert_firing", **fields)
        else:
            log.info("alert_resolved", **fields)


class WebhookSink(Sink):
    def __init__(self, cfg: WebhookSinkConfig, *, key: bytes | None, headers: Mapping[str, str], node: str):
        self.name = cfg.name
        self.cfg = cfg
        self.key = key
        self.headers = dict(headers)
        self.node = node
        self.client: httpx.AsyncClient | None = None

    def body(self, notice: Notice, sent_at: int) -> bytes:
        doc = {
            "version": BODY_VERSION,
            "event": f"alert.{notice.state}",
            **notice.as_dict(),
            "node": self.node,
            "sent_at": sent_at,
        }
        return orjson.dumps(doc)

    async def send(self, notice: Notice) -> None:
        if self.client is None:
            self.client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.cfg.timeout),
                follow_redirects=False,
                headers={"User-Agent": USER_AGENT},
            )
        sent_at = int(time.time())
        body = self.body(notice, sent_at)
        headers = {
            **self.headers,
            "Content-Type": "application/json",
            "X-Sluice-Event": f"alert.{notice.state}",
            "X-Sluice-Notice-Id": notice_id(notice),
            "X-Sluice-Timestamp": str(sent_at),
        }
        if self.key is not None:
            headers["X-Sluice-Signature"] = sign(body, self.key)
        try:
            resp = await self.client.post(self.cfg.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise SinkError(f"webhook {self.name}: {type(exc).__name__} ({exc})") from exc
        if not 200 <= resp.status_code < 300:
            raise SinkError(f"webhook {self.name}: HTTP {resp.status_code}")

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None


class SmtpSink(Sink):
    def __init__(self, cfg: SmtpSinkConfig, *, password: str | None, node: str):
        self.name = cfg.name
        self.cfg = cfg
        self.password = password
        self.node = node

    def message(self, notice: Notice) -> EmailMessage:
        c = self.cfg
        msg = EmailMessage()
        state = "FIRING" if notice.state == FIRING else "RESOLVED"
        again = f" (reminder {notice.reminder})" if notice.reminder else ""
        msg["Subject"] = (
            f"{c.subject_prefix} {state}{again}: {notice.rule} on {notice.subject_type} {notice.subject}"
        )
        msg["From"] = c.sender
        msg["To"] = ", ".join(c.to)
        msg["Message-ID"] = f"<{notice_id(notice)}@sluice.{self.node or 'local'}>"
        d = notice.as_dict()
        lines = [notice.summary, ""] + [
            f"{k}: {v}" for k, v in d.items() if k not in ("summary", "subject") and v is not None
        ]
        lines += [f"subject: {notice.subject_type} {notice.subject}", f"node: {self.node}"]
        msg.set_content("\n".join(lines) + "\n")
        return msg

    def _send_sync(self, msg: EmailMessage) -> None:
        c = self.cfg
        smtp: smtplib.SMTP
        if c.ssl:
            smtp = smtplib.SMTP_SSL(c.host, c.port, timeout=c.timeout, context=ssl.create_default_context())
        else:
            smtp = smtplib.SMTP(c.host, c.port, timeout=c.timeout)
        try:
            if c.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if c.username:
                smtp.login(c.username, self.password or "")
            smtp.send_message(msg)
        finally:
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                smtp.close()

    async def send(self, notice: Notice) -> None:
        try:
            await asyncio.to_thread(self._send_sync, self.message(notice))
        except (smtplib.SMTPException, OSError) as exc:
            raise SinkError(f"smtp {self.name}: {type(exc).__name__} ({exc})") from exc


def build_sink(cfg: SinkConfig, alerts: AlertsConfig, node: str = "") -> Sink:
    ctx = DestinationContext(base_dir=alerts.base_dir, config_file=alerts.file)
    key = f"alerts.sinks.{cfg.name}"
    if isinstance(cfg, LogSinkConfig):
        return LogSink(cfg.name)
    if isinstance(cfg, WebhookSinkConfig):
        k = (
            secret(cfg.secret, what="webhook secret", ctx=ctx, key=f"{key}.secret").encode()
            if cfg.secret
            else None
        )
        headers = resolve_headers(cfg.headers, ctx=ctx, key=f"{key}.headers")
        return WebhookSink(cfg, key=k, headers=headers, node=node)
    pw = secret(cfg.password, what="smtp password", ctx=ctx, key=f"{key}.password") if cfg.password else None
    return SmtpSink(cfg, password=pw, node=node)


def build_sinks(alerts: AlertsConfig, node: str = "") -> dict[str, Sink]:
    """Every sink a rule uses, built (secrets resolved): raises ConfigError naming the key."""
    names = dict.fromkeys(s for r in alerts.rules for s in r.sinks)
    return {n: build_sink(sink_config(alerts, n), alerts, node) for n in names}
