"""Channel and destination status for the admin API: live counters, queue figures, pause state.

Counters are this node's since it started (read from its Prometheus registry, so the API and
``/metrics`` never disagree); queue figures come from the store (every node's rows).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol

from sqlalchemy import func, select

from engine.admin.roles import Principal
from engine.config import Config
from engine.reload import Plan
from engine.store import M, Store


class EngineView(Protocol):
    """What the admin app may ask of the running engine (engine.server.Server implements it)."""

    def ready(self) -> dict[str, bool]: ...

    def live_channels(self) -> dict[str, dict[str, Any]]: ...

    def metric_samples(self) -> Mapping[tuple[str, tuple[tuple[str, str], ...]], float]: ...

    def render_metrics(self) -> tuple[bytes, str]: ...

    def apply_pause(self, kind: str, name: str, paused: bool) -> None: ...

    async def reload(self, who: Principal | None = None, source: str = "") -> Plan: ...


Samples = Mapping[tuple[str, tuple[tuple[str, str], ...]], float]


# Final statuses that count as errors: failed processing, held for review, refused or quarantined at intake.
ERRORED = ("error", "review", "rejected", "quarantined")


def _sum(samples: Samples, name: str, **labels: str) -> int:
    return int(samples.get((name, tuple(sorted(labels.items()))), 0.0))


def queue_figures(store: Store) -> dict[str, tuple[int, float]]:
    """destination → (pending deliveries, created_at of the oldest): the query the metrics scrape runs."""
    return store.pending_summary()


def last_received(store: Store, channel: str) -> float | None:
    with store.engine.connect() as conn:
        mid = conn.execute(select(func.max(M.c.id)).where(M.c.channel == channel)).scalar()
        if mid is None:
            return None
        return conn.execute(select(M.c.received_at).where(M.c.id == mid)).scalar()


def channels(
    config: Config, store: Store, view: EngineView, paused: Mapping[tuple[str, str], tuple[float, str]]
) -> list[dict[str, Any]]:
    live = view.live_channels()
    samples = view.metric_samples()
    queues = queue_figures(store)
    out = []
    for ch in config.channels:
        lv = live.get(ch.name, {})
        processed = {
            s: _sum(samples, "sluice_messages_processed_total", channel=ch.name, status=s)
            for s in ("processed", "filtered", *ERRORED)
        }
        acks = {c: _sum(samples, "sluice_acks_total", channel=ch.name, code=c) for c in ("AA", "AE", "AR")}
        last = lv.get("last_message_at") or last_received(store, ch.name)
        dests = [r.destination for r in ch.routes]
        out.append(
            {
                "name": ch.name,
                "enabled": ch.enabled,
                "status": "paused"
                if ("channel", ch.name) in paused
                else ("running" if ch.enabled else "disabled"),
                "paused": ("channel", ch.name) in paused,
                "listen": f"{ch.source.host}:{lv.get('port', ch.source.port)}",
                "listening": bool(lv.get("listening", False)),
                "connections": int(lv.get("connections", 0)),
                "destinations": dests,
                "counters": {
                    "received": _sum(samples, "sluice_messages_received_total", channel=ch.name),
                    "filtered": processed["filtered"],
                    "errored": sum(processed[s] for s in ERRORED),
                    "processed": processed["processed"],
                    "AA": acks["AA"],
                    "AE": acks["AE"],
                    "AR": acks["AR"],
                    "duplicates_prevented": _sum(
                        samples, "sluice_duplicates_prevented_total", channel=ch.name
                    ),
                    "queued": sum(queues.get(d, (0, None))[0] for d in dests),
                },
                "last_message_at": last,
            }
        )
    return out


def destinations(
    config: Config, store: Store, view: EngineView, paused: Mapping[tuple[str, str], tuple[float, str]]
) -> list[dict[str, Any]]:
    queues = queue_figures(store)
    samples = view.metric_samples()
    now = time.time()
    out = []
    for name, dc in config.destinations.items():
        depth, oldest = queues.get(name, (0, None))
        out.append(
            {
                "name": name,
                "kind": dc.kind,
                "status": "paused" if ("destination", name) in paused else "running",
                "paused": ("destination", name) in paused,
                "counters": {
                    "delivered": _sum(
                        samples, "sluice_deliveries_total", destination=name, outcome="delivered"
                    ),
                    "retried": _sum(samples, "sluice_deliveries_total", destination=name, outcome="retry"),
                    "dead_lettered": _sum(samples, "sluice_dead_letters_total", destination=name),
                    "queued": depth,
                },
                "queue_depth": depth,
                "oldest_pending_age_seconds": round(now - oldest, 3) if oldest else 0.0,
            }
        )
    return out
