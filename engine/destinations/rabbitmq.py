"""RabbitMQ destination (kind ``rabbitmq``, aio-pika): persistent messages with publisher confirms.

A message counts as delivered only when the broker confirms it.  A nack, an unroutable message (with
``mandatory: true``), a confirm timeout or a lost connection raise a retryable DeliveryError; the engine's
worker retries.  A publish whose confirm was lost may have reached the broker, so delivery is at-least-once:
consumers dedupe on the AMQP ``message_id`` (the Sluice message id) or the ``x-sluice-*`` headers.

The connection is re-opened on demand with exponential backoff (``reconnect_initial`` doubling up to
``reconnect_max``); while the broker is down every publish fails fast with ``retry_after`` set to the time
until the next reconnect attempt, never hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import string
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import orjson

from engine.destinations.base import Destination, DestinationContext, Outbound, secret
from engine.destinations.http import check_choice, check_positive, render_body
from engine.errors import ConfigError, DeliveryError, PermanentDeliveryError
from engine.ratelimit import Limiter
from engine.registry import destination

ITEM_FIELDS = ("type", "trigger", "channel", "destination", "control_id", "message_id", "resourceType")
SKIP_TYPES = ("MessageHeader", "Provenance", "AuditEvent")


def resource_type(item: Outbound) -> str:
    """``meta['resourceType']``, else the payload's resourceType; for a Bundle its first clinical entry's type."""
    if item.meta.get("resourceType"):
        return item.meta["resourceType"]
    try:
        doc = orjson.loads(item.payload)
    except orjson.JSONDecodeError:
        return "none"
    if not isinstance(doc, dict):
        return "none"
    if doc.get("resourceType") != "Bundle":
        return str(doc.get("resourceType") or "none")
    for entry in doc.get("entry") or []:
        rt = (entry.get("resource") or {}).get("resourceType") if isinstance(entry, dict) else None
        if rt and rt not in SKIP_TYPES:
            return str(rt)
    return "Bundle"


@destination("rabbitmq")
class RabbitMQDestination(Destination):
    kind = "rabbitmq"
    options = {
        "url": "amqp://guest:guest@127.0.0.1/",  # or {env: NAME} / {file: path} when it carries a password
        "exchange": "sluice",
        "exchange_type": "topic",
        "routing_key": "hl7.{type}.{trigger}",
        "payload": "fhir",  # fhir (the channel's output) | hl7 (raw v2) | both (JSON envelope)
        "mandatory": False,  # true: an unroutable message (no bound queue) is an error, not silently dropped
        "confirm_timeout": 10.0,
        "connect_timeout": 5.0,
        "reconnect_initial": 0.5,
        "reconnect_max": 30.0,
        "concurrency": 16,
        "rate_limit": 0,
    }

    def __init__(self, name: str, options: Mapping[str, Any], ctx: DestinationContext) -> None:
        super().__init__(name, options, ctx)
        key = f"destinations.{name}"
        url = self.opts["url"]
        if isinstance(url, Mapping):
            url = secret(url, what="rabbitmq url", ctx=ctx, key=f"{key}.url")
        elif isinstance(url, str):
            pw = urlsplit(url).password
            if pw and pw != "guest":
                raise ConfigError(
                    "the rabbitmq url carries a password and must not be written in the YAML",
                    file=ctx.config_file,
                    key=f"{key}.url",
                    hint="write url: {env: SLUICE_AMQP_URL} or {file: /run/secrets/amqp_url}",
                )
        else:
            raise ConfigError(
                "url must be an amqp:// URL or a secret", file=ctx.config_file, key=f"{key}.url"
            )
        if not str(url).startswith(("amqp://", "amqps://")):
            raise ConfigError(
                "url must start with amqp:// or amqps://", file=ctx.config_file, key=f"{key}.url"
            )
        self.url = str(url)
        self.exchange_name = str(self.opts["exchange"])
        self.exchange_type = check_choice(
            self.opts["exchange_type"],
            ("topic", "direct", "fanout", "headers"),
            ctx=ctx,
            key=f"{key}.exchange_type",
        )
        self.routing_key = str(self.opts["routing_key"])
        try:
            self.key_fields = {f for _, f, _, _ in string.Formatter().parse(self.routing_key) if f}
        except ValueError as exc:
            raise ConfigError(
                f"routing_key template is malformed: {exc}", file=ctx.config_file, key=f"{key}.routing_key"
            ) from exc
        self.payload = check_choice(
            self.opts["payload"], ("fhir", "hl7", "both"), ctx=ctx, key=f"{key}.payload"
        )
        self.mandatory = bool(self.opts["mandatory"])
        self.confirm_timeout = check_positive(
            self.opts["confirm_timeout"], ctx=ctx, key=f"{key}.confirm_timeout"
        )
        self.connect_timeout = check_positive(
            self.opts["connect_timeout"], ctx=ctx, key=f"{key}.connect_timeout"
        )
        self.reconnect_initial = check_positive(
            self.opts["reconnect_initial"], ctx=ctx, key=f"{key}.reconnect_initial"
        )
        self.reconnect_max = check_positive(self.opts["reconnect_max"], ctx=ctx, key=f"{key}.reconnect_max")
        self.limiter = Limiter.from_options(self.opts, config_file=ctx.config_file, key=key)
        self._conn: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._lock = asyncio.Lock()
        self._backoff = 0.0
        self._next_attempt = 0.0
        self.clock: Callable[[], float] = time.monotonic  # times the reconnect backoff; tests fake it
        self.connects = 0  # successful (re)connections, for tests and metrics

    # ------------------------------------------------------------------ connection

    def _where(self) -> str:
        u = urlsplit(self.url)
        return f"{u.hostname}:{u.port or (5671 if u.scheme == 'amqps' else 5672)}"

    async def start(self) -> None:
        """Connect and declare the exchange.  A broker that is down is not fatal (deliveries retry);
        an exchange that exists with another type is a ConfigError."""
        try:
            await self._ensure()
        except PermanentDeliveryError as exc:
            raise ConfigError(
                str(exc), file=self.ctx.config_file, key=f"destinations.{self.name}.exchange"
            ) from exc
        except DeliveryError:
            pass

    def _usable(self) -> bool:
        return (
            self._exchange is not None
            and self._conn is not None
            and not self._conn.is_closed
            and self._channel is not None
            and not self._channel.is_closed
        )

    async def _ensure(self) -> aio_pika.abc.AbstractExchange:
        if self._usable():
            assert self._exchange is not None
            return self._exchange
        async with self._lock:
            if self._usable():
                assert self._exchange is not None
                return self._exchange
            await self._drop()
            wait = self._next_attempt - self.clock()
            if wait > 0:
                raise DeliveryError(
                    f"{self.name}: broker {self._where()} unreachable; next reconnect attempt in {wait:.1f}s",
                    retry_after=wait,
                    category="network",
                )
            try:
                conn = await aio_pika.connect(self.url, timeout=self.connect_timeout)
            except (TimeoutError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS) as exc:
                raise self._failed(
                    f"cannot connect to broker {self._where()} ({type(exc).__name__}: {exc})"
                ) from exc
            try:
                channel = await asyncio.wait_for(
                    conn.channel(publisher_confirms=True, on_return_raises=True), self.connect_timeout
                )
                exchange = await asyncio.wait_for(
                    channel.declare_exchange(
                        self.exchange_name, aio_pika.ExchangeType(self.exchange_type), durable=True
                    ),
                    self.connect_timeout,
                )
            except aio_pika.exceptions.ChannelPreconditionFailed as exc:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2)
                raise PermanentDeliveryError(
                    f"{self.name}: exchange {self.exchange_name!r} exists with other settings ({exc}); "
                    "make exchange/exchange_type match it (it must be durable) or use another exchange name",
                    category="server",
                ) from exc
            except (TimeoutError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS) as exc:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2)
                raise self._failed(
                    f"cannot open a channel on {self._where()} ({type(exc).__name__}: {exc})"
                ) from exc
            self._conn, self._channel, self._exchange = conn, channel, exchange
            self._backoff = 0.0
            self._next_attempt = 0.0
            self.connects += 1
            return exchange

    def _failed(self, text: str) -> DeliveryError:
        """Schedule the next reconnect attempt (exponential backoff with jitter) and say when it is."""
        self._backoff = min(
            self.reconnect_max, self._backoff * 2 if self._backoff else self.reconnect_initial
        )
        delay = self._backoff * random.uniform(0.8, 1.2)
        self._next_attempt = self.clock() + delay
        return DeliveryError(
            f"{self.name}: {text}; will retry (next reconnect in {delay:.1f}s)",
            retry_after=delay,
            category="network",
        )

    async def _drop(self) -> None:
        conn, self._conn, self._channel, self._exchange = self._conn, None, None, None
        if conn is not None and not conn.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)

    async def close(self) -> None:
        async with self._lock:
            await self._drop()

    # ------------------------------------------------------------------ publishing

    def render_routing_key(self, item: Outbound) -> str:
        fields: dict[str, Any] = dict(item.meta)
        fields |= {
            "type": item.message_type,
            "trigger": item.trigger,
            "channel": item.channel,
            "destination": item.destination,
            "control_id": item.control_id,
            "message_id": item.message_id,
        }
        if "resourceType" in self.key_fields:
            fields["resourceType"] = resource_type(item)
        try:
            return self.routing_key.format(**fields)
        except (KeyError, IndexError, AttributeError, ValueError) as exc:
            raise PermanentDeliveryError(
                f"{self.name}: routing_key {self.routing_key!r} needs {exc} which this message does not have; "
                f"use item fields ({', '.join(ITEM_FIELDS)}) or meta keys set by the channel",
                category="validation",
            ) from exc

    def build_message(self, item: Outbound) -> aio_pika.Message:
        body, content_type = render_body(item, self.payload)
        return aio_pika.Message(
            body,
            content_type=content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=str(item.message_id),
            correlation_id=item.control_id,
            app_id="sluice",
            type=f"{item.message_type}^{item.trigger}",
            timestamp=datetime.now(UTC),
            headers={
                "x-sluice-message-id": item.message_id,
                "x-sluice-channel": item.channel,
                "x-sluice-control-id": item.control_id,
                "x-sluice-message-type": item.message_type,
                "x-sluice-trigger": item.trigger,
                "x-sluice-attempt": item.attempt,
            },
        )

    async def deliver(self, item: Outbound) -> str:
        routing_key = self.render_routing_key(item)
        message = self.build_message(item)
        async with self.limiter.slot():
            await self.limiter.request()
            exchange = await self._ensure()
            try:
                await asyncio.wait_for(
                    exchange.publish(
                        message, routing_key, mandatory=self.mandatory, timeout=self.confirm_timeout
                    ),
                    self.confirm_timeout + 1,
                )
            except aio_pika.exceptions.PublishError as exc:
                raise DeliveryError(
                    f"{self.name}: broker returned the message as unroutable (routing key {routing_key!r}, "
                    f"exchange {self.exchange_name!r}): bind a queue for it; will retry",
                    category="server",
                ) from exc
            except aio_pika.exceptions.DeliveryError as exc:
                # A nack: the broker could not take it (a full queue with overflow reject-publish, or
                # an internal error); both pass with time.
                raise DeliveryError(
                    f"{self.name}: broker refused (nack) the message; will retry", category="throttling"
                ) from exc
            except TimeoutError as exc:
                await self._drop()
                raise DeliveryError(
                    f"{self.name}: no publisher confirm within {self.confirm_timeout:g}s; will retry "
                    "(the broker may still have it: consumers dedupe on message_id)",
                    category="network",
                ) from exc
            except aio_pika.exceptions.CONNECTION_EXCEPTIONS as exc:
                await self._drop()
                raise self._failed(f"connection lost while publishing ({type(exc).__name__}: {exc})") from exc
        return f"confirmed {self.exchange_name}/{routing_key}"
