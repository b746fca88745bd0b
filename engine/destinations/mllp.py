"""MLLP destination: forward the message to another MLLP endpoint and check its ACK.

Connections are reused between messages, one message in flight on each (MLLP has no
pipelining).  ``concurrency`` caps how many connections (so messages in flight) there are,
1 by default; ``rate_limit`` caps messages sent per second (engine/ratelimit.py, as for the
other kinds).  MSA-2 must echo our MSH-10; AA/CA is delivered; AE/AR follow the
destination's ``on_error`` policy (``retry`` or ``dead-letter``); a timeout or a broken
connection is retried.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, ClassVar

from engine import registry
from engine.client import MLLPClient, parse_ack
from engine.destinations.base import Destination, DestinationContext, Outbound
from engine.errors import ConfigError, DeliveryError, PermanentDeliveryError
from engine.ratelimit import Limiter


@registry.destination("mllp")
class MLLPDestination(Destination):
    kind = "mllp"
    options: ClassVar[dict[str, Any]] = {
        "host": None,
        "port": None,
        "ack_timeout": 30.0,
        "connect_timeout": 10.0,
        "on_error": "dead-letter",  # what to do with AE/AR: dead-letter or retry
        "tls": False,  # true, or {ca: file, cert: file, key: file, verify: true}
        "payload": "hl7",  # hl7: forward the raw message; output: forward the channel's output
        "concurrency": 1,  # connections, each with one message in flight; 0 = as many as the lanes
        "rate_limit": 0,  # messages per second; 0 = unlimited
    }

    def __init__(self, name: str, options: Any, ctx: DestinationContext):
        super().__init__(name, options, ctx)
        if self.opts["on_error"] not in ("dead-letter", "retry"):
            raise ConfigError(
                "on_error must be dead-letter or retry",
                file=ctx.config_file,
                key=f"destinations.{name}.on_error",
            )
        if self.opts["payload"] not in ("hl7", "output"):
            raise ConfigError(
                "payload must be hl7 or output", file=ctx.config_file, key=f"destinations.{name}.payload"
            )
        self.limiter = Limiter.from_options(
            self.opts, config_file=ctx.config_file, key=f"destinations.{name}"
        )
        self.ssl = self._ssl(self.opts["tls"])
        # Connections not sending right now.  A new one is opened only when every existing one is busy,
        # and the limiter's slot caps the busy ones, so there are never more than `concurrency`.
        self._idle: list[MLLPClient] = []
        self.clients: list[MLLPClient] = []

    def _client(self) -> MLLPClient:
        if self._idle:
            return self._idle.pop()
        client = MLLPClient(
            str(self.opts["host"]),
            int(self.opts["port"]),
            ssl=self.ssl,
            connect_timeout=float(self.opts["connect_timeout"]),
            ack_timeout=float(self.opts["ack_timeout"]),
        )
        self.clients.append(client)
        return client

    def _ssl(self, spec: Any) -> ssl.SSLContext | None:
        if not spec:
            return None
        ctx = ssl.create_default_context()
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - {"ca", "cert", "key", "verify"})
            if unknown:
                raise ConfigError(
                    f"unknown tls option(s) {', '.join(unknown)}",
                    file=self.ctx.config_file,
                    key=f"destinations.{self.name}.tls",
                    hint="allowed: ca, cert, key, verify",
                )
            try:
                if spec.get("ca"):
                    ctx.load_verify_locations(str(self.ctx.base_dir / str(spec["ca"])))
                if spec.get("cert"):
                    ctx.load_cert_chain(
                        str(self.ctx.base_dir / str(spec["cert"])),
                        str(self.ctx.base_dir / str(spec.get("key", ""))),
                    )
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"cannot load the TLS files: {exc}",
                    file=self.ctx.config_file,
                    key=f"destinations.{self.name}.tls",
                    hint="ca, cert and key are PEM files; relative paths resolve against the directory of routes.yaml",
                ) from exc
            if spec.get("verify") is False:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def deliver(self, item: Outbound) -> str:
        payload = item.raw if self.opts["payload"] == "hl7" else item.payload
        async with self.limiter.slot():
            await self.limiter.request()
            client = self._client()  # one message in flight per connection
            try:
                ack = await client.send(payload)
            finally:
                self._idle.append(client)
        info = parse_ack(ack)
        # MSA-2 echoes the MSH-10 of what was sent: the stored message's, or the output's own (a
        # fhir-to-hl7 channel's message is a FHIR resource; its output is the HL7 message).
        expected = item.control_id if payload is item.raw else sent_control_id(payload, item.control_id)
        if info.control_id != expected:
            raise DeliveryError(
                f"ACK does not match: MSA-2 is {info.control_id!r}, expected {expected!r}",
                category="server",
            )
        if info.code in ("AA", "CA"):
            return info.code
        reason = f"receiver answered {info.code}" + (f" {info.error_code}" if info.error_code else "")
        if info.text:
            reason += f": {info.text}"
        category = nack_category(info.code, info.error_code, info.text)
        if self.opts["on_error"] == "retry" or info.code in ("CR",):
            raise DeliveryError(reason, category=category)
        raise PermanentDeliveryError(reason, category=category)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients))


def sent_control_id(payload: bytes, default: str) -> str:
    """MSH-10 of an HL7 v2 payload (``default`` when it does not start with an MSH segment)."""
    if not payload.startswith(b"MSH") or len(payload) < 4:
        return default
    sep = payload[3:4]
    first = payload.split(b"\r", 1)[0]
    fields = first.split(sep)
    return fields[9].decode("latin-1") if len(fields) > 9 else default


_BUSY = ("busy", "overload", "too many", "try again", "try later", "unavailable", "throttl", "rate limit")


def nack_category(code: str, error_code: str, text: str) -> str:
    """The rejection class of a negative ACK (MSA-1 AE/AR/CE/CR, ERR-3 / MSA-3 text).

    AE/CE (application error) say the content is wrong: ``validation``.  AR/CR (reject) are, by the
    standard, for reasons unrelated to content (system down, internal error): ``server``, unless the
    receiver says it is busy (``throttling``), the record is locked (HL7 table 0357 code 206:
    ``conflict``) or it names a content or header problem (codes 100-105, 200-205: ``validation``).
    """
    lowered = text.lower()
    if any(word in lowered for word in _BUSY):
        return "throttling"
    if error_code == "206":
        return "conflict"
    if code in ("AE", "CE"):
        return "validation"
    if error_code[:1] == "1" or error_code in ("200", "201", "202", "203", "204", "205"):
        return "validation"
    return "server"
