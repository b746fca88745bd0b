"""A test plugin destination, registered exactly as a user's plugin would be (routes.yaml ``plugins:``).

It appends each delivered control id to a log file.  Control ids listed in ``fail_file`` fail
with a retryable error, those in ``reject_file`` with a permanent one; tests edit the files to
make a destination fail and recover.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, ClassVar

from engine import registry
from engine.destinations.base import Destination, DestinationContext, Outbound
from engine.errors import DeliveryError, PermanentDeliveryError


def _ids(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except FileNotFoundError:
        return set()


@registry.destination("recorder")
class Recorder(Destination):
    kind = "recorder"
    options: ClassVar[dict[str, Any]] = {"log": None, "fail_file": "", "reject_file": "", "delay": 0.0}

    def __init__(self, name: str, options: Any, ctx: DestinationContext):
        super().__init__(name, options, ctx)
        self.log = Path(self.opts["log"])
        self.fail = Path(self.opts["fail_file"]) if self.opts["fail_file"] else None
        self.reject = Path(self.opts["reject_file"]) if self.opts["reject_file"] else None

    async def deliver(self, item: Outbound) -> str:
        if self.opts["delay"]:
            await asyncio.sleep(float(self.opts["delay"]))
        if self.reject is not None and item.control_id in _ids(self.reject):
            raise PermanentDeliveryError(f"recorder rejects {item.control_id}")
        if self.fail is not None and item.control_id in _ids(self.fail):
            raise DeliveryError(f"recorder is down for {item.control_id}")
        with self.log.open("a") as f:
            f.write(item.control_id + "\n")
        return "recorded"


@registry.destination("batch-recorder")
class BatchRecorder(Recorder):
    """The same, taking a whole round in one call across order keys (like the file destination)."""

    kind = "batch-recorder"
    batch_across_keys = True

    async def deliver_many(self, items: list[Outbound]) -> list[str | BaseException | None]:
        out: list[str | BaseException | None] = [None] * len(items)
        for i, item in enumerate(items):
            try:
                out[i] = await self.deliver(item)
            except DeliveryError as exc:
                out[i] = exc
                break
        return out
