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
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import structlog

from engine import __version__, collector, keyring, native, privacy, registry
from engine import config as config_mod
from engine import reload as reload_mod
from engine.admin import operations, search
from engine.admin.roles import Principal
from engine.alerts.runner import AlertRunner, snapshot_from_server
from engine.alerts.sinks import build_sinks
from engine.config import ChannelConfig, Config
from engine.destinations.base import Destination, DestinationContext
from engine.errors import ConfigError
from engine.intake import Committer, Intake
from engine.limits import InflightBudget, prepare_process, trim_memory
from engine.listener import Listener, MLLPProtocol, make_ssl_context
from engine.metrics import Metrics
from engine.processing import ChannelRuntime
from engine.procpool import ProcessingPool
from engine.reload import Plan
from engine.store import Store, migrations
from engine.workers import DeliveryWorker, ProcessingWorker

log = structlog.get_logger("sluice.server")


def build_destinations(config: Config, only: Iterable[str] | None = None) -> dict[str, Destination]:
    """Every destination of ``config`` (or those named in ``only``), built and not yet started."""
    registry.load_plugins(config.plugin_paths, config.plugins, config.base_dir)
    ctx = DestinationContext(base_dir=config.base_dir, config_file=config.file)
    out: dict[str, Destination] = {}
    wanted = None if only is None else set(only)
    for name, dc in config.destinations.items():
        if wanted is not None and name not in wanted:
            continue
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


def check_ports(cfg: Config) -> None:
    """A listen port already in use stops the start before anything is created (the store file included).

    Probed the way the listeners bind (SO_REUSEADDR), so a port in TIME_WAIT is not reported.
    """
    first = cfg.channels[0].name if cfg.channels else None
    for ch in cfg.channels:
        if not ch.enabled or ch.source.kind not in ("mllp", "http") or ch.source.port == 0:
            continue
        flag = " or `sluice run --port P`" if ch.name == first else ""
        _probe(
            ch.source.host,
            ch.source.port,
            f"channel {ch.name} cannot listen on {ch.source.host}:{ch.source.port}",
            file=ch.file,
            key="source.port",
            hint=f"another program uses the port: stop it, or choose a free port with source.port{flag}",
        )
    if cfg.admin.enabled and cfg.admin.port != 0:
        _probe(
            cfg.admin.host,
            cfg.admin.port,
            f"the admin API cannot listen on {cfg.admin.host}:{cfg.admin.port}",
            file=cfg.file,
            key="admin.port",
            hint="choose a free port (admin.port, --admin-port or SLUICE_ADMIN_PORT) "
            "or turn the API off with admin: {enabled: false}",
        )


def _probe(host: str, port: int, what: str, *, file: str, key: str, hint: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"{what}: {exc.strerror or exc}", file=file, key=key, hint=hint) from None


class Server:
    def __init__(self, config: Config):
        self.config = config
        self.owner = f"{config.node_id}@{socket.gethostname()}"  # stable across restarts; unique per node
        self.store: Store | None = None
        self.committer: Committer | None = None
        self.listeners: list[Listener] = []
        self.pollers: list[Any] = []  # engine.sources.fhir_poll.FhirPoller, one per fhir-poll channel
        self.http_sources: list[Any] = []  # engine.admin.service.AdminService serving an HttpSource
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
        self.alerts_task: asyncio.Task[None] | None = None
        # live reload (engine/reload.py): tasks by worker, routes by channel, one reload at a time
        self.worker_tasks: dict[int, asyncio.Task[None]] = {}
        self.routes_of: dict[str, tuple[str, ...]] = {}
        self.delivery_by_name: dict[str, DeliveryWorker] = {}
        self.reload_lock = asyncio.Lock()
        self.admin_ctx: Any = None  # engine.admin.app.AdminContext: its config follows a reload

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
        # Before any worker: order and resource-state keys written in clear by an older version become
        # keyed hashes, so every key of one patient has one form (ordering lanes, status guards).
        for step, rows in (await asyncio.to_thread(migrations.upgrade_data, store)).items():
            log.info(step, rows=rows)  # plain_keys_hashed
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
            self.delivery.append(self._delivery_worker(cfg, name, dest))
        for ch in cfg.channels:
            if not ch.enabled:
                continue
            if ch.source.kind == "fhir-poll":  # no listener: the poller stores what it takes
                self._add_poller(ch, runtimes[ch.name])
                continue
            if ch.source.kind == "http":  # FHIR pushed over HTTP(S): answered after the durable commit
                await self._add_http_source(ch, runtimes[ch.name])
                continue
            listener = self._listener(ch, runtimes[ch.name])
            await listener.start()
            self._add_channel(ch, runtimes[ch.name], listener)
        log.info("hot modules", build=native.REASON)
        await self._apply_pauses()
        if cfg.admin.enabled:
            await self._start_admin()
        loop = asyncio.get_running_loop()
        self.tasks = []
        for pw in self.processing:
            self._run_worker(pw)
        for dw in self.delivery:
            self._run_worker(dw)
        self.tasks += [loop.create_task(p.run(self.should_exit)) for p in self.pollers]
        if any(
            ch.retention.bodies_days is not None or ch.retention.rows_days is not None for ch in cfg.channels
        ):
            self.tasks.append(loop.create_task(self._retention()))
        self.tasks.append(loop.create_task(trim_memory(self.should_exit)))  # RSS falls back after bursts
        if cfg.alerts.active:
            self._start_alerts(cfg, alert_sinks)
        self.tasks.append(loop.create_task(self._housekeeping()))
        self.started.set()

    # ------------------------------------------------------------------ parts (start and reload)
    def _delivery_worker(self, cfg: Config, name: str, dest: Destination) -> DeliveryWorker:
        assert self.store is not None and self.committer is not None
        dw = DeliveryWorker(
            cfg.destinations[name],
            dest,
            self.store,
            self.committer,
            owner=self.owner,
            metrics=self.metrics,
            batch_bytes=cfg.limits.batch_bytes,
        )
        self.delivery_by_name[name] = dw
        return dw

    def _run_worker(self, worker: ProcessingWorker | DeliveryWorker) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(worker.run())
        self.worker_tasks[id(worker)] = task
        self.tasks.append(task)
        return task

    def _wake_destinations(self, channel: str) -> Callable[[], None]:
        """Wake the delivery workers of ``channel``'s routes, looked up when called (a reload swaps them)."""

        def wake() -> None:
            by_name = self.delivery_by_name
            for name in self.routes_of.get(channel, ()):
                d = by_name.get(name)
                if d is not None:
                    d.wake.set()

        return wake

    def _listener(self, ch: ChannelConfig, runtime: ChannelRuntime) -> Listener:
        return Listener(
            ch.name,
            ch.source,
            self._intake(ch, runtime, None),
            metrics=self.metrics,
            limits=self.config.limits,
            budget=self.budget,
        )

    def _intake(self, ch: ChannelConfig, runtime: ChannelRuntime, worker: ProcessingWorker | None) -> Intake:
        assert self.committer is not None
        intake = Intake(ch, self.committer, runtime, patient_key=self.patient_key, metrics=self.metrics)
        if worker is not None:
            intake.on_stored = worker.wake.set if ch.ack == "on-commit" else self._wake_destinations(ch.name)
        return intake

    def _processing_worker(self, ch: ChannelConfig, runtime: ChannelRuntime) -> ProcessingWorker:
        assert self.store is not None and self.committer is not None
        self.routes_of[ch.name] = tuple(r.destination for r in ch.routes)
        pw = ProcessingWorker(
            runtime,
            self.store,
            self.owner,
            self._wake_destinations(ch.name),
            self.committer,
            pool=self.pool,
            metrics=self.metrics,
            batch_bytes=self.config.limits.batch_bytes,
        )
        self.processing.append(pw)
        return pw

    def _add_poller(self, ch: ChannelConfig, runtime: ChannelRuntime) -> None:
        """A fhir-poll channel: its poller stores what it takes, its worker processes it (no listener)."""
        from engine.destinations.base import DestinationContext
        from engine.sources.fhir_poll import FhirPoller

        assert self.store is not None and self.committer is not None
        pw = self._processing_worker(ch, runtime)
        poller = FhirPoller(
            ch,
            self.store,
            self.committer.run_op,
            ctx=DestinationContext(self.config.base_dir, ch.file),
            on_stored=pw.wake.set,
            metrics=self.metrics,
        )
        self.pollers.append(poller)
        log.info(
            "polling",
            channel=ch.name,
            resources=",".join(ch.source.poll.resources if ch.source.poll else ()),
        )

    async def _add_http_source(self, ch: ChannelConfig, runtime: ChannelRuntime) -> None:
        """A ``kind: http`` channel: its endpoint (uvicorn in this loop) stores, its worker processes."""
        from engine.admin.service import AdminService
        from engine.destinations.base import DestinationContext
        from engine.sources.http import HttpSource

        assert self.store is not None and self.committer is not None
        pw = self._processing_worker(ch, runtime)
        app = HttpSource(
            ch,
            self.store,
            self.committer,
            ctx=DestinationContext(self.config.base_dir, ch.file),
            on_stored=pw.wake.set,
            intake=self._intake(ch, runtime, pw),
            metrics=self.metrics,
        )
        tls = ch.source.tls
        service = AdminService(
            app,
            ch.source.host,
            ch.source.port,
            certfile=tls.cert if tls else None,
            keyfile=tls.key if tls else None,
            cafile=tls.ca if tls else None,
            require_client_cert=bool(tls and tls.require_client_cert),
            what=f"channel {ch.name}'s http source",
            key="source",
        )
        service.bind(ch.file)
        await service.start()
        self.http_sources.append(service)
        log.info("http_listening", channel=ch.name, url=service.url, port=service.bound_port)

    def _add_channel(
        self, ch: ChannelConfig, runtime: ChannelRuntime, listener: Listener
    ) -> ProcessingWorker:
        """A started listener joins the engine with its processing worker (its task started by the caller)."""
        assert self.store is not None
        pw = self._processing_worker(ch, runtime)
        listener.intake = self._intake(ch, runtime, pw)
        self.listeners.append(listener)
        log.info(
            "listening",
            channel=ch.name,
            host=ch.source.host,
            port=listener.port,
            tls=ch.source.tls is not None,
            ack=ch.ack,
            store=self.store.safe_url,
        )
        return pw

    # ------------------------------------------------------------------ live reload
    async def reload(self, who: Principal | None = None, source: str = "") -> Plan:
        """Load the config files again and apply them (engine/reload.py); ConfigError leaves all as it was.

        Logged and audited (``config.reload``) whether it applies or not.
        """
        from engine.admin import audit
        from engine.admin.commands import os_user

        who = who or os_user()
        async with self.reload_lock:
            cfg = self.config
            try:
                if not self.started.is_set() or self.should_exit.is_set():
                    raise ConfigError(
                        "the engine is starting or stopping",
                        file=cfg.file,
                        hint="reload again once it runs; nothing was changed",
                    )
                new = await asyncio.to_thread(config_mod.load, cfg.file, cfg.overrides, env=cfg.env)
                plan = await self._apply(new)
            except ConfigError as exc:
                log.warning("config_reload_failed", source=source, error=str(exc))
                await self._audit_reload(audit, who, source, {"ok": False, "error": str(exc)})
                raise
            log.info("config_reloaded", source=source, changes=plan.describe())
            await self._audit_reload(audit, who, source, {"ok": True, **plan.summary()})
            return plan

    async def _audit_reload(self, audit: Any, who: Principal, source: str, detail: dict[str, Any]) -> None:
        if self.store is None:  # asked before the store was open (still starting): the log has it
            return
        try:
            target = f"config:{self.config.file}"
            await asyncio.to_thread(
                audit.write, self.store, who, audit.CONFIG_RELOAD, target=target, detail=detail, source=source
            )
        except Exception as exc:  # the reload itself is done (or refused); say the trail missed it
            log.error("config_reload_audit_failed", error=type(exc).__name__)

    async def _apply(self, new: Config) -> Plan:
        plan = reload_mod.plan(self.config, new)
        if plan.empty:
            self._set_config(new)
            return plan
        assert self.store is not None
        for name in (
            *plan.channels_added,
            *plan.channels_removed,
            *plan.channels_changed,
            *plan.channels_rebound,
        ):
            ch = new.channel(name) if name in {c.name for c in new.channels} else self.config.channel(name)
            before = self.config.channel(name) if name in {c.name for c in self.config.channels} else ch
            if ch.source.kind != "mllp" or before.source.kind != "mllp":
                # fhir-poll and http channels have no listener to swap: applied at the next start
                raise ConfigError(
                    f"channel {name} ({ch.source.kind} source) changed: a live reload applies MLLP channels only",
                    file=ch.file,
                    key="source.kind",
                    hint="restart the engine to apply it; the running config is unchanged",
                )
        # 1. Prepare everything that can fail; nothing running is touched yet.
        runtimes = {
            name: ChannelRuntime(new, new.channel(name), self.store)
            for name in (*plan.channels_added, *plan.channels_changed)
        }
        fresh = build_destinations(new, only=(*plan.destinations_added, *plan.destinations_changed))
        alerts_changed = "alerts" in plan.sections_changed
        alert_sinks = build_sinks(new.alerts, new.node_id) if alerts_changed and new.alerts.active else {}
        for name in plan.channels_changed:
            tls = new.channel(name).source.tls
            if tls is not None:
                try:
                    make_ssl_context(tls)  # the files are there and hold a certificate and its key
                except (OSError, ValueError) as exc:
                    raise ConfigError(
                        f"cannot load the TLS files: {exc}",
                        file=new.channel(name).file,
                        key="source.tls",
                        hint="check source.tls.cert and key; the running config is unchanged",
                    ) from None
        started: list[Destination] = []
        bound: dict[str, Listener] = {}
        servers: dict[str, Any] = {}
        try:
            for dest in fresh.values():
                await dest.start()
                started.append(dest)
            for name in plan.channels_added:
                listener = self._listener(new.channel(name), runtimes[name])
                await listener.start()
                bound[name] = listener
            for name in plan.channels_rebound:
                servers[name] = await self._listener_of(name).bind(new.channel(name).source)
        except Exception as exc:
            for listener in bound.values():
                await listener.stop_accepting()
            for srv in servers.values():
                srv.close()
            for dest in started:
                with contextlib.suppress(Exception):
                    await dest.close()
            if isinstance(exc, ConfigError):
                raise
            if isinstance(exc, OSError):
                raise ConfigError(
                    f"cannot listen on the new address: {exc.strerror or exc}",
                    file=new.file,
                    hint="choose a free port (another process may use it); the running config is unchanged",
                ) from None
            raise ConfigError(
                f"a destination did not start: {type(exc).__name__}: {exc}",
                file=new.file,
                hint="fix the destination's settings; the running config is unchanged",
            ) from None
        # 2. Apply.  Worker processes get the new pipelines before any message of a new channel reaches them.
        if self.pool is not None and (plan.channels_added or plan.channels_changed):
            await asyncio.to_thread(self.pool.reload, new)
        old_config = self.config
        self._set_config(new)
        if alerts_changed:
            await self._swap_alerts(new, alert_sinks)
        for name in (*plan.destinations_removed, *plan.destinations_changed):
            await self._stop_delivery(name)  # first: never two workers delivering one queue
        for name, dest in fresh.items():
            self.destinations[name] = dest
            dw = self._delivery_worker(new, name, dest)
            self.delivery.append(dw)
            self._run_worker(dw)
        for name in plan.channels_removed:
            await self._remove_channel(name)
        for name in plan.channels_changed:
            ch = new.channel(name)
            listener, pw = self._listener_of(name), self._worker_of(name)
            pw.runtime = runtimes[name]
            self.routes_of[name] = tuple(r.destination for r in ch.routes)
            listener.intake = self._intake(ch, runtimes[name], pw)
            listener.update(ch.source, servers.get(name))
            if name in servers:
                old = old_config.channel(name).source
                log.info("listener_rebound", channel=name, port=listener.port, old_port=old.port)
        for name, listener in bound.items():
            ch = new.channel(name)
            pw = self._add_channel(ch, runtimes[name], listener)
            self._run_worker(pw)
        await self._apply_pauses()
        return plan

    def _start_alerts(self, cfg: Config, sinks: Any) -> None:
        self.alerts = AlertRunner(cfg.alerts, lambda: snapshot_from_server(self), sinks)
        self.alerts_task = asyncio.get_running_loop().create_task(self.alerts.run(self.alerts_stop))
        self.tasks.append(self.alerts_task)

    async def _swap_alerts(self, new: Config, sinks: Any) -> None:
        """Live reload of ``alerts:``: the old runner stops (alerts firing now are evaluated afresh)."""
        if self.alerts is not None:
            self.alerts_stop.set()
            if self.alerts_task is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(self.alerts_task, 15)
            await self.alerts.close()
            self.alerts = None
        self.alerts_stop = asyncio.Event()
        if new.alerts.active:
            self._start_alerts(new, sinks)

    def _set_config(self, new: Config) -> None:
        self.config = new
        if self.admin_ctx is not None:
            self.admin_ctx.config = new

    def _listener_of(self, channel: str) -> Listener:
        return next(lst for lst in self.listeners if lst.channel_name == channel)

    def _worker_of(self, channel: str) -> ProcessingWorker:
        return next(w for w in self.processing if w.runtime.channel.name == channel)

    async def _stop_worker(self, worker: ProcessingWorker | DeliveryWorker) -> None:
        worker.stopping = True
        worker.wake.set()
        task = self.worker_tasks.pop(id(worker), None)
        if task is not None:
            _done, pending = await asyncio.wait([task], timeout=15)
            for t in pending:
                t.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
            if task in self.tasks:
                self.tasks.remove(task)

    async def _stop_delivery(self, name: str) -> None:
        """Stop the destination's worker after its current round; its queue waits in the store."""
        for dw in [d for d in self.delivery if d.config.name == name]:
            await self._stop_worker(dw)
            self.delivery.remove(dw)
            if self.delivery_by_name.get(name) is dw:
                del self.delivery_by_name[name]
        dest = self.destinations.pop(name, None)
        if dest is not None:
            try:
                await dest.close()
            except Exception as exc:
                log.warning("destination_close_failed", error=type(exc).__name__)

    async def _remove_channel(self, name: str) -> None:
        """A channel taken out: stop accepting, answer what its connections sent, close them, stop its worker."""
        listener = self._listener_of(name)
        await listener.stop_accepting()
        await listener.drain()
        self.listeners.remove(listener)
        self.metrics.unwatch_listener(listener)
        pw = self._worker_of(name)
        await self._stop_worker(pw)
        self.processing.remove(pw)
        self.routes_of.pop(name, None)

    def _on_hangup(self) -> None:
        """SIGHUP: reload; the outcome goes to the log and the audit trail (no one waits for an answer)."""

        async def run() -> None:
            with contextlib.suppress(ConfigError):
                await self.reload(source="signal SIGHUP")

        self.tasks.append(asyncio.get_running_loop().create_task(run()))

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
        self.admin_ctx = ctx
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
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self._on_hangup)  # sluice reload without a token
        await self.start()
        if not reload_mod.write_pid(self.config.pid_file):
            log.warning("pid_file_not_written", hint="sluice reload needs an admin token (--token) then")
        collector.tune()  # this process is the engine: start-up objects out of the collector's way
        await self.should_exit.wait()
        log.info("shutting_down")
        reload_mod.remove_pid(self.config.pid_file)
        await self.stop()

    async def stop(self) -> None:
        self.alerts_stop.set()  # first: shutting down is not an incident
        for svc in self.http_sources:  # answered requests are committed; no new ones
            await svc.stop()
            if hasattr(svc.app, "aclose"):
                await svc.app.aclose()  # the http source's client to fetch.base_url
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
        check_ports(self.config)  # before the store file or anything else is created
        prepare_process(sum(ch.source.max_connections for ch in self.config.channels if ch.enabled))
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
            asyncio.run(self.serve())
        else:
            uvloop.run(self.serve())
