"""MLLP destination: forward the message to another MLLP endpoint and check its ACK.

The connection is reused between messages.  MSA-2 must echo our MSH-10; AA/CA is
delivered; AE/AR follow the destination's ``on_error`` policy (``retry`` or
``dead-letter``); a timeout or a broken connection is retried.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, ClassVar

from engine import registry
from engine.client import MLLPClient, parse_ack
from engine.destinations.base import Destination, DestinationContext, Outbound
from engine.errors import ConfigError, DeliveryError, PermanentDeliveryError


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
        self.ssl = self._ssl(self.opts["tls"])
        self.client = MLLPClient(
            str(self.opts["host"]),
            int(self.opts["port"]),
            ssl=self.ssl,
            connect_timeout=float(self.opts["connect_timeout"]),
            ack_timeout=float(self.opts["ack_timeout"]),
        )
        self.lock = asyncio.Lock()

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
        async with self.lock:  # one message in flight per connection
            ack = await self.client.send(payload)
        info = parse_ack(ack)
        if info.control_id != item.control_id:
            raise DeliveryError(
                f"ACK does not match: MSA-2 is {info.control_id!r}, expected {item.control_id!r}"
            )
        if info.code in ("AA", "CA"):
            return info.code
        reason = f"receiver answered {info.code}" + (f" {info.error_code}" if info.error_code else "")
        if info.text:
            reason += f": {info.text}"
        if self.opts["on_error"] == "retry" or info.code in ("CR",):
            raise DeliveryError(reason)
        raise PermanentDeliveryError(reason)

    async def close(self) -> None:
        await self.client.close()
