"""The alert loop in the engine: every ``evaluate_every``, observe → evaluate → send.

:func:`snapshot_from_server` reads what the rules need from the running engine: message counts per
channel and status over each rule's look-back window (one indexed range query per window, in a
thread), each destination's pending deliveries and the age of the oldest (index-only), the delivery
workers' failure streaks, and the expiry of every certificate file the engine uses.

A notice that a sink could not take stays queued for that sink and is tried again at the next
evaluation, in order (at most :data:`OUTBOX_LIMIT` per sink; beyond that the oldest are dropped with an
error in the log).  Nothing here raises into the engine: a failed snapshot or sink is logged and the
loop goes on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from engine.alerts.certs import file_not_after
from engine.alerts.config import TLS_EXPIRY, AlertsConfig
from engine.alerts.evaluator import CertObs, ChannelObs, DestinationObs, Evaluator, Notice, Snapshot
from engine.alerts.sinks import Sink
from engine.store import Store

if TYPE_CHECKING:
    from engine.config import Config
    from engine.server import Server

log = structlog.get_logger("sluice.alerts")
OUTBOX_LIMIT = 1000


class AlertRunner:
    def __init__(
        self,
        config: AlertsConfig,
        snapshot_fn: Callable[[], Awaitable[Snapshot]],
        sinks: Mapping[str, Sink],
        clock: Callable[[], float] = time.time,
    ):
        self.config = config
        self.snapshot_fn = snapshot_fn
        self.sinks = dict(sinks)
        self.evaluator = Evaluator(config, clock)
        self.outbox: dict[str, collections.deque[Notice]] = {n: collections.deque() for n in self.sinks}
        self.sent: dict[str, int] = dict.fromkeys(self.sinks, 0)

    async def tick(self) -> list[Notice]:
        """One evaluation: observe, evaluate, queue the notices, send what every sink has queued."""
        try:
            snap = await self.snapshot_fn()
        except Exception as exc:
            log.error("alert_snapshot_failed", error=type(exc).__name__, detail=str(exc)[:200])
            notices: list[Notice] = []
        else:
            notices = self.evaluator.evaluate(snap)
        for n in notices:
            for name in n.sinks:
                box = self.outbox.get(name)
                if box is None:
                    continue
                box.append(n)
                if len(box) > OUTBOX_LIMIT:
                    lost = box.popleft()
                    log.error("alert_notice_dropped", sink=name, rule=lost.rule, incident=lost.incident)
        await self.flush()
        return notices

    async def flush(self) -> None:
        await asyncio.gather(*(self._drain(name) for name in self.sinks))

    async def _drain(self, name: str) -> None:
        box, sink = self.outbox[name], self.sinks[name]
        while box:
            n = box[0]
            try:
                await sink.send(n)
            except Exception as exc:
                log.warning(
                    "alert_sink_failed",
                    sink=name,
                    rule=n.rule,
                    incident=n.incident,
                    queued=len(box),
                    error=type(exc).__name__,
                    detail=str(exc)[:300],
                )
                return  # keep it (and what follows, in order) for the next evaluation
            box.popleft()
            self.sent[name] += 1

    async def run(self, stop: asyncio.Event) -> None:
        log.info(
            "alerts_started",
            rules=len(self.config.rules),
            sinks=sorted(self.sinks),
            every=self.config.evaluate_every,
        )
        while not stop.is_set():
            try:
                await self.tick()
            except Exception as exc:  # never take the engine down
                log.error("alert_evaluation_failed", error=type(exc).__name__, detail=str(exc)[:200])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.evaluate_every)

    async def close(self) -> None:
        for sink in self.sinks.values():
            try:
                await sink.close()
            except Exception as exc:
                log.warning("alert_sink_close_failed", sink=sink.name, error=type(exc).__name__)


# --------------------------------------------------------------------------- observing the engine


def received_counts(store: Store, since: float) -> dict[str, tuple[dict[str, int], float]]:
    """channel → (status → messages received since ``since``, the newest one's time).

    A range on ``ix_messages_received``: the cost follows the traffic inside the window, not the table.
    Counting again at every evaluation (rather than adding up deltas) sees a message's final status
    even when it was still being processed at the previous evaluation, and survives a restart.
    """
    # SQLite would rather walk the whole (channel, status, id) index to skip the GROUP BY sort.
    table, mark = ("messages INDEXED BY ix_messages_received", "?") if store.is_sqlite else ("messages", "%s")
    sql = (
        f"SELECT channel, status, count(*), max(received_at) FROM {table} "
        f"WHERE received_at >= {mark} GROUP BY channel, status"
    )
    out: dict[str, tuple[dict[str, int], float]] = {}
    with store.engine.connect() as conn:
        for channel, status, n, last in conn.exec_driver_sql(sql, (since,)).all():
            counts, newest = out.get(channel, ({}, 0.0))
            counts[status] = int(n)
            out[channel] = (counts, max(newest, float(last)))
    return out


def _channel_obs(
    config: Config, store: Store, windows: tuple[float, ...], now: float
) -> dict[str, ChannelObs]:
    per_window = {w: received_counts(store, now - w) for w in windows}
    out: dict[str, ChannelObs] = {}
    for ch in config.channels:
        if not ch.enabled:
            continue
        counts = {w: per_window[w].get(ch.name, ({}, 0.0))[0] for w in windows}
        lasts = [per_window[w][ch.name][1] for w in windows if ch.name in per_window[w]]
        out[ch.name] = ChannelObs(counts=counts, last_received_at=max(lasts) if lasts else None)
    return out


def cert_files(config: Config) -> dict[str, tuple[str, ...]]:
    """Every certificate file the engine presents or sends: path → who uses it.

    Channel listeners (``source.tls.cert``, read as the listener reads it), destinations (``tls.cert``,
    an mtls ``auth.cert``; relative to routes.yaml), the admin API's certificate, and each
    ``tls_expiry`` rule's own ``files``.
    """
    found: dict[str, list[str]] = {}

    def add(path: Any, owner: str, base: Path | None) -> None:
        if not path or not isinstance(path, str | Path):
            return
        p = Path(path)
        if base is not None and not p.is_absolute():
            p = base / p
        found.setdefault(str(p), []).append(owner)

    for ch in config.channels:
        if ch.enabled and ch.source.tls is not None:
            add(ch.source.tls.cert, f"channel {ch.name}", None)
    for name, dc in config.destinations.items():
        for part in ("tls", "auth"):
            spec = dc.options.get(part)
            if isinstance(spec, Mapping):
                add(spec.get("cert"), f"destination {name}", config.base_dir)
    add(getattr(config.admin, "tls_cert", None), "admin API", config.base_dir)
    for rule in config.alerts.rules:
        if rule.kind == TLS_EXPIRY:
            for f in rule.files:
                add(f, f"rule {rule.name}", config.base_dir)
    return {p: tuple(dict.fromkeys(owners)) for p, owners in found.items()}


def read_certs(files: Mapping[str, tuple[str, ...]]) -> dict[str, CertObs]:
    out: dict[str, CertObs] = {}
    for path, owners in files.items():
        try:
            out[path] = CertObs(not_after=file_not_after(path), owners=owners)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            out[path] = CertObs(error=reason or type(exc).__name__, owners=owners)
    return out


def observe(config: Config, store: Store, workers: list[Any], now: float) -> Snapshot:
    """A snapshot of the engine (blocking: run it in a thread)."""
    alerts = config.alerts
    windows = alerts.windows()
    dests = list(config.destinations)
    pending = store.pending_summary()  # what the metrics scrape reads: one grouped query on the pending rows
    by_name = {w.config.name: w for w in workers}
    destinations: dict[str, DestinationObs] = {}
    for d in dests:
        n, oldest = pending.get(d, (0, None))
        w = by_name.get(d)
        destinations[d] = DestinationObs(
            pending=n,
            oldest_pending_at=oldest,
            consecutive_failures=int(getattr(w, "consecutive_failures", 0)),
            delivered=int(getattr(w, "delivered", 0)),
            failed=int(getattr(w, "failed", 0)),
            dead=int(getattr(w, "dead", 0)),
        )
    certs = read_certs(cert_files(config)) if any(r.kind == TLS_EXPIRY for r in alerts.rules) else {}
    return Snapshot(
        at=now,
        channels=_channel_obs(config, store, windows, now),
        destinations=destinations,
        certs=certs,
    )


async def snapshot_from_server(server: Server) -> Snapshot:
    """What the alert rules look at, from a running engine (store reads in a thread)."""
    assert server.store is not None
    return await asyncio.to_thread(observe, server.config, server.store, list(server.delivery), time.time())
