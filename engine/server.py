"""Start-up, main loop and shutdown (uvicorn's shape: Server(config).run()).

Start: open the store, put messages a crash left in flight back in the queue,
start destinations, workers and one listener per channel.  SIGTERM/SIGINT:
stop accepting, answer frames already received, let workers finish their
current batch, close destinations and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from functools import partial
from typing import Any

import structlog

from engine import __version__, collector, keyring, native, privacy, registry
from engine.admin import operations, search
from engine.alerts.runner import AlertRunner, snapshot_from_server
from engine.alerts.sinks import build_sinks
from engine.config import Config
from engine.destinations.base import Destination, DestinationContext
from engine.errors import ConfigError
from engine.intake import Committer, Intake
from engine.limits import InflightBudget, prepare_process, trim_memory
from engine.listener import Listener, MLLPProtocol
from engine.metrics import Metrics
from engine.processing import ChannelRuntime
from engine.procpool import ProcessingPool
from engine.store import Store
from engine.workers import DeliveryWorker, ProcessingWorker

log = structlog.get_logger("sluice.server")


def build_destinations(config: Config) -> dict[str, Destination]:
    registry.load_plugins(config.plugin_paths, config.plugins, config.base_dir)
    ctx = DestinationContext(base_dir=config.base_dir, config_file=config.file)
    out: dict[str, Destination] = {}
    for name, dc in config.destinations.items():
        cls = registry.DESTINATIONS.get(dc.kind)
        if cls is None:
            known = ", ".join(sorted(registry.DESTINATIONS))
            raise ConfigError(
                f"unknown destination kind {dc.kind!r}",
                file=config.file,
                key=f"destinations.{name}.kind",
                hint=f"known kinds: {known}",
            )
        out[name] = cls(name, dc.options, ctx)
    return out


class Server:
    def __init__(self, config: Config):
        self.config = config
        self.owner = f"{config.node_id}@{socket.gethostname()}"  # stable across restarts; unique per node
        self.store: Store | None = None
        self.committer: Committer | None = None
        self.listeners: list[Listener] = []
        self.pollers: list[Any] = []  # engine.sources.fhir_poll.FhirPoller, one per fhir-poll channel
        self.processing: list[ProcessingWorker] = []
        self.delivery: list[DeliveryWorker] = []
        self.destinations: dict[str, Destination] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.pool: ProcessingPool | None = None
        self.should_exit = asyncio.Event()
        self.started = asyncio.Event()
        self.admin: Any = None  # engine.admin.service.AdminService while the admin API runs
        self.patient_key: bytes | None = None
        # Prometheus metrics (engine/metrics.py), served by the admin app as GET /metrics.
        self.metrics = Metrics(
            channels=[ch.name for ch in config.channels if ch.enabled],
            destinations=list(config.destinations),
            version=__version__,
            build="compiled" if native.COMPILED else "pure",
            node=config.node_id,
        )
        self.alerts: AlertRunner | None = None
        self.alerts_stop = asyncio.Event()

    async def start(self) -> None:
        cfg = self.config
        keys = keyring.from_config(cfg)  # a missing or malformed key file stops the start here
        self.store = store = await asyncio.to_thread(partial(Store, cfg.store_url, keys=keys))
        for warning in privacy.warnings(cfg):
            log.warning("store_files_not_private", detail=warning)
        # Take back what this node had in flight before it stopped (other nodes' leases expire on their own).
        recovered = await asyncio.to_thread(store.recover, None if store.is_sqlite else self.owner)
        if recovered:
            log.info("recovered_in_flight", messages=recovered)
        self.patient_key = await asyncio.to_thread(search.installation_key, store)
        self.destinations = build_destinations(cfg)  # also imports the user's plugins
        alert_sinks = build_sinks(cfg.alerts, cfg.node_id) if cfg.alerts.active else {}  # secrets: fail now
        runtimes = {ch.name: ChannelRuntime(cfg, ch, store) for ch in cfg.channels if ch.enabled}
        if cfg.processing_workers > 0:
            self.pool = ProcessingPool(cfg, cfg.processing_workers)
        self.budget: InflightBudget[MLLPProtocol] = InflightBudget(cfg.limits.inflight_bytes)  # all listeners
        self.committer = committer = Committer(store)
        committer.start()
        self.metrics.watch_store(store)
        self.metrics.watch_committer(committer)
        for name, dest in self.destinations.items():
            await dest.start()
            self.delivery.append(
                DeliveryWorker(
                    cfg.destinations[name],
                    dest,
                    store,
                    committer,
                    owner=self.owner,
                    metrics=self.metrics,
                    batch_bytes=cfg.limits.batch_bytes,
                )
            )
        by_dest = {w.config.name: w for w in self.delivery}
        for ch in cfg.channels:
            if not ch.enabled:
                continue
            rt = runtimes[ch.name]
            dests = [by_dest[r.destination] for r in ch.routes if r.destination in by_dest]

            def wake(ds: list[DeliveryWorker] = dests) -> None:
                for d in ds:
                    d.wake.set()

            pw = ProcessingWorker(
                rt,
                store,
                self.owner,
                wake,
                committer,
                pool=self.pool,
                metrics=self.metrics,
                batch_bytes=cfg.limits.batch_bytes,
            )
            self.processing.append(pw)
            if ch.source.kind == "fhir-poll":  # no listener: the poller stores what it takes
                from engine.destinations.base import DestinationContext
                from engine.sources.fhir_poll import FhirPoller

                poller = FhirPoller(
                    ch,
                    store,
                    committer.run_op,
                    ctx=DestinationContext(cfg.base_dir, ch.file),
                    on_stored=pw.wake.set,
                )
                self.pollers.append(poller)
                log.info(
                    "polling",
                    channel=ch.name,
                    resources=",".join(ch.source.poll.resources if ch.source.poll else ()),
                )
                continue
            intake = Intake(ch, self.committer, rt, patient_key=self.patient_key, metrics=self.metrics)
            intake.on_stored = pw.wake.set if ch.ack == "on-commit" else wake
            listener = Listener(
                ch.name, ch.source, intake, metrics=self.metrics, limits=cfg.limits, budget=self.budget
            )
            await listener.start()
            self.listeners.append(listener)
            log.info(
                "listening",
                channel=ch.name,
                host=ch.source.host,
                port=listener.port,
                tls=ch.source.tls is not None,
                ack=ch.ack,
                store=store.safe_url,
            )
        log.info("hot modules", build=native.REASON)
        await self._apply_pauses()
        if cfg.admin.enabled:
            await self._start_admin()
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(w.run()) for w in self.processing]
        self.tasks += [loop.create_task(d.run()) for d in self.delivery]
        self.tasks += [loop.create_task(p.run(self.should_exit)) for p in self.pollers]
        if any(
            ch.retention.bodies_days is not None or ch.retention.rows_days is not None for ch in cfg.channels
        ):
            self.tasks.append(loop.create_task(self._retention()))
        self.tasks.append(loop.create_task(trim_memory(self.should_exit)))  # RSS falls back after bursts
        if cfg.alerts.active:
            self.alerts = AlertRunner(cfg.alerts, lambda: snapshot_from_server(self), alert_sinks)
            self.tasks.append(loop.create_task(self.alerts.run(self.alerts_stop)))
        self.tasks.append(loop.create_task(self._housekeeping()))
        self.started.set()

    # ------------------------------------------------------------------ admin API
    async def _start_admin(self) -> None:
        from engine.admin import tokens
        from engine.admin.app import AdminContext, create_app
        from engine.admin.service import AdminService

        cfg, store = self.config, self.store
        assert store is not None and self.patient_key is not None
        oidc = None
        if cfg.admin.oidc is not None:
            from engine.admin.oidc import OIDCVerifier

            oidc = OIDCVerifier(cfg.admin.oidc)
        ctx = AdminContext(
            config=cfg,
            store=store,
            engine=self,
            patient_key=self.patient_key,
            tokens=tokens.TokenVerifier(store),
            oidc=oidc,
            metrics_auth=cfg.admin.metrics_auth,
        )
        service = AdminService(
            create_app(ctx),
            cfg.admin.host,
            cfg.admin.port,
            certfile=cfg.admin.tls_cert,
            keyfile=cfg.admin.tls_key,
        )
        service.bind(cfg.file)
        await service.start()
        self.admin = service
        log.info("admin_listening", url=service.url, port=service.bound_port, oidc=oidc is not None)

    async def _apply_pauses(self) -> None:
        assert self.store is not None
        paused = await asyncio.to_thread(operations.paused, self.store)
        for w in self.processing:
            w.paused = ("channel", w.runtime.channel.name) in paused
        for d in self.delivery:
            d.paused = ("destination", d.config.name) in paused

    async def _housekeeping(self, every: float = 2.0) -> None:
        """Pauses set by the CLI or another node apply within seconds; old plain patient keys get hashed."""
        assert self.store is not None and self.patient_key is not None
        try:
            n = await asyncio.to_thread(search.rehash_legacy, self.store, self.patient_key)
            if n:
                log.info("patient_keys_hashed", messages=n)
        except Exception as exc:
            log.error("patient_key_rehash_failed", error=type(exc).__name__)
        while not self.should_exit.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.should_exit.wait(), every)
            try:
                await self._apply_pauses()
            except Exception as exc:
                log.warning("pause_refresh_failed", error=type(exc).__name__)

    # EngineView (engine/admin/status.py): what the admin API reads from the running engine
    def ready(self) -> dict[str, bool]:
        checks = {f"listener:{lst.channel_name}": lst.listening for lst in self.listeners}
        checks["committer"] = self.committer is not None and self.committer.alive
        return checks

    def live_channels(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for lst in self.listeners:
            out[lst.channel_name] = {
                "listening": lst.listening,
                "port": lst.port,
                "connections": lst.stats.connections,
                "last_message_at": lst.stats.last_frame_at or None,
            }
        return out

    def metric_samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def render_metrics(self) -> tuple[bytes, str]:
        return self.metrics.render()

    def apply_pause(self, kind: str, name: str, paused: bool) -> None:
        for w in self.processing:
            if kind == "channel" and w.runtime.channel.name == name:
                w.paused = paused
                if not paused:
                    w.wake.set()
        for d in self.delivery:
            if kind == "destination" and d.config.name == name:
                d.paused = paused
                if not paused:
                    d.wake.set()

    async def _retention(self, first: float = 60.0, every: float = 3600.0) -> None:
        """Apply each channel's retention in small batches, in a thread, without blocking intake."""
        assert self.store is not None
        store = self.store
        await asyncio.sleep(first)
        while not self.should_exit.is_set():
            for ch in self.config.channels:
                r = ch.retention
                if r.bodies_days is None and r.rows_days is None:
                    continue
                now = time.time()
                try:
                    done = await asyncio.to_thread(
                        store.prune,
                        ch.name,
                        bodies_before=now - r.bodies_days * 86400 if r.bodies_days is not None else None,
                        rows_before=now - r.rows_days * 86400 if r.rows_days is not None else None,
                    )
                    if done["bodies"] or done["rows"]:
                        log.info("retention_pruned", channel=ch.name, **done)
                except Exception as exc:
                    log.error("retention_failed", channel=ch.name, error=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.should_exit.wait(), every)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.should_exit.set)
        await self.start()
        collector.tune()  # this process is the engine: start-up objects out of the collector's way
        await self.should_exit.wait()
        log.info("shutting_down")
        await self.stop()

    async def stop(self) -> None:
        self.alerts_stop.set()  # first: shutting down is not an incident
        for listener in self.listeners:
            await listener.stop_accepting()
        for listener in self.listeners:
            await listener.drain()
        for w in self.processing:
            w.stopping = True
            w.wake.set()
        for d in self.delivery:
            d.stopping = True
            d.wake.set()
        if self.tasks:
            _done, pending = await asyncio.wait(self.tasks, timeout=15)
            for t in pending:
                t.cancel()
        if self.alerts is not None:
            await self.alerts.close()
        for dest in self.destinations.values():
            try:
                await dest.close()
            except Exception as exc:
                log.warning("destination_close_failed", error=type(exc).__name__)
        if self.admin is not None:
            await self.admin.stop()
        if self.pool is not None:
            await asyncio.to_thread(self.pool.close)
        if self.committer is not None:
            await asyncio.to_thread(self.committer.stop)
        if self.store is not None:
            # Anything a worker had claimed but not finished goes back to the queue.
            await asyncio.to_thread(self.store.recover, self.owner)
            self.store.close()
        log.info("stopped")

    def run(self) -> None:
        # Files the engine creates (store, WAL, SHM, output directories and files) are its own.
        os.umask(privacy.PRIVATE_UMASK)
        # The committer thread hands results back to the event loop many times a second; with
        # the default 5 ms GIL switch interval every hand-off can stall that long (a convoy).
        sys.setswitchinterval(0.0005)
        from engine import logflood

        logflood.apply(self.config.logging.flood)
        prepare_process(sum(ch.source.max_connections for ch in self.config.channels if ch.enabled))
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
            asyncio.run(self.serve())
        else:
            uvloop.run(self.serve())
