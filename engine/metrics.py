"""Prometheus metrics: one :class:`Metrics` per engine, on its own registry.

The engine process is where every fact becomes final, so that is where everything is counted:
intake (received, duplicates, statuses decided at intake) after the group commit that made it
durable; processing statuses after the committer has recorded a worker batch (conversion runs in
worker processes, but the result only counts once it is written); delivery outcomes after the
delivery round's outcomes are written.  A write that is rolled back and retried is therefore
counted once, and nothing runs in the worker processes (no multiprocess-mode files).

The hot path gets label children bound once per channel or destination (:class:`ChannelMetrics`,
:class:`DestinationMetrics`), so counting costs a method call (~0.4 µs a prometheus-client counter, ~1 µs
a histogram observation).  The per-message metrics (received, duplicates, patient match failures, ACKs
by code, ACK latency, messages processed, deliveries by outcome, delivery lag) are cheaper still: plain
ints on :class:`Tally` and :class:`LatencyTally` objects, no lock, exported at scrape time by
:class:`_TallyCollector` under the same names, labels, HELP texts, bucket bounds and sample order as the
prometheus-client families they replace.
Their writers are the event loop (listener, intake, sources, delivery rounds) and the processing code's
threads (a recorded batch's statuses); ``value += n`` on an int attribute is not interrupted by a GIL switch in CPython 3.11+
with the GIL (no eval-breaker check between the load and the store; a free-threaded build would need a
tally per thread), and the scrape only reads ints and a float, so a scrape sees each tally at one instant; a histogram's ``_count`` is the sum of its buckets, so it always
matches its ``+Inf`` bucket (its ``_sum`` may trail by the observation in flight).

Queue depth, oldest pending age, connections and the committer backlog are read at scrape time
(:class:`_ScrapeCollector`): one grouped, index-only query on the store and the listeners' live
counters.

Components take ``metrics: Metrics | None = None``; ``None`` counts nothing.  The admin app serves
:meth:`Metrics.render` as ``GET /metrics`` (it queries the store: call it off the event loop, e.g.
``await asyncio.to_thread(metrics.render)``).
"""

from __future__ import annotations

import errno
import ssl
import sys
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import prometheus_client
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from engine.errors import REJECTION_CLASSES, DeliveryError

if TYPE_CHECKING:
    from engine.store import Store

log = structlog.get_logger("sluice.metrics")

# The ``_created`` series prometheus-client adds to every counter and histogram double the output for
# nothing Prometheus uses; the engine process has no other metrics, so turning them off is local to us.
prometheus_client.disable_created_metrics()

CONTENT_TYPE: str = getattr(
    prometheus_client.exposition, "CONTENT_TYPE_PLAIN_0_0_4", prometheus_client.CONTENT_TYPE_LATEST
)

# frame received → ACK written: sub-millisecond when idle, tens of ms under load, seconds when the store stalls
ACK_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# message received → delivered (the sync lag): sub-second normally; minutes to hours while a destination is down
DELIVERY_LAG_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0, 86400.0,
)  # fmt: skip

ACK_CODES = ("AA", "AE", "AR", "CA", "CE", "CR")
# Final message statuses (engine.store): decided at intake or by processing.
STATUSES = ("processed", "filtered", "error", "review", "rejected", "quarantined", "ignored")
OUTCOMES = ("delivered", "retry", "dead")
# Rejection classes that say the destination itself is unavailable (not that it refused one message).
UNAVAILABLE = frozenset({"network", "server", "auth", "throttling"})


class Tally:
    """A counter for one label set, incremented with plain int arithmetic (no lock: see the module doc)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n


class LatencyTally:
    """A histogram for one label set: a count per bucket (the last is ``+Inf``) and the sum observed."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bucket i holds bounds[i-1] < value <= bounds[i] (Prometheus ``le``); above the last: +Inf
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """(``le`` → cumulative count, sum), as the exposition wants them."""
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), list(self.counts), strict=True):
            total += n
            buckets.append((floatToGoString(bound), total))
        return buckets, self.sum


class ChannelMetrics:
    """One channel's label children, bound once (the intake and listener hot paths use these)."""

    __slots__ = (
        "_ack_labels",
        "_acks",
        "_family",
        "_processed",
        "_rejections",
        "_warnings",
        "ack_latency",
        "duplicates",
        "name",
        "patient_match_failures",
        "received",
    )

    def __init__(self, family: Metrics, name: str):
        self._family = family
        self.name = name
        self.received = family.tally("received", name)
        self.ack_latency = family.latency("ack_latency", ACK_LATENCY_BUCKETS, name)
        self.duplicates = family.tally("duplicates", name)
        self.patient_match_failures = family.tally("patient_match_failures", name)
        self._acks = {code: family.tally("acks", name, code) for code in ACK_CODES}  # MSA-1 as written
        self._ack_labels = dict(self._acks)  # code label → tally
        self._processed = {s: family.tally("processed", name, s) for s in STATUSES}
        self._rejections = {c: family.rejections.labels(name, c) for c in REJECTION_CLASSES}
        self._warnings: dict[str, Any] = {}

    def ack(self, code: str) -> None:
        """One ACK written with MSA-1 ``code``."""
        tally = self._acks.get(code)
        if tally is None:  # a code outside HL7 table 0008 (cannot come from Sluice's own ACK builder)
            label = code or "none"
            tally = self._ack_labels.get(label)
            if tally is None:
                tally = self._ack_labels[label] = self._family.tally("acks", self.name, label)
            self._acks[code] = tally
        tally.value += 1

    def processed(self, status: str, n: int = 1) -> None:
        """``n`` messages reached the final status ``status``."""
        tally = self._processed.get(status)
        if tally is None:
            tally = self._processed[status] = self._family.tally("processed", self.name, status)
        tally.value += n

    def writeback_skipped(self, reason: str, n: int = 1) -> None:
        """``n`` write-back resource versions sent nothing, for ``reason`` (engine/writeback.py)."""
        self._family.writeback_skipped.labels(self.name, reason).inc(n)

    def warned(self, kind: str, n: int = 1) -> None:
        """``n`` conversion warnings of ``kind`` recorded with this channel's messages (kinds are the
        converter's fixed event names, a small set: never a value)."""
        child = self._warnings.get(kind)
        if child is None:
            child = self._warnings[kind] = self._family.conversion_warnings.labels(self.name, kind)
        child.inc(n)

    def rejection(self, klass: str) -> None:
        """A delivery of one of this channel's messages failed for a reason of class ``klass``."""
        self._rejections[klass if klass in self._rejections else "server"].inc()


class DestinationMetrics:
    """One destination's label children, bound once."""

    __slots__ = ("dead_letters", "lag", "name", "outcomes", "up")

    def __init__(self, family: Metrics, name: str):
        self.name = name
        self.outcomes = {o: family.tally("deliveries", name, o) for o in OUTCOMES}
        self.lag = family.latency("delivery_lag", DELIVERY_LAG_BUCKETS, name)
        self.dead_letters = family.dead_letters.labels(name)
        self.up = family.destination_up.labels(name)
        self.up.set(1)


class ListenerView(Protocol):
    """What the scrape reads from a listener (engine.listener.Listener)."""

    channel_name: str

    @property
    def stats(self) -> Any: ...


class CommitterView(Protocol):
    backlog: int


class Metrics:
    """The engine's metric families on a registry of its own (several engines can share a process)."""

    def __init__(
        self,
        *,
        channels: Iterable[str] = (),
        destinations: Iterable[str] = (),
        version: str = "",
        build: str = "",
        node: str = "",
    ):
        self.registry = r = CollectorRegistry()
        # Tallied families: name → (label values, tally) in the order first seen (as prometheus-client
        # orders a family's children)
        self._series: dict[str, list[tuple[tuple[str, ...], Tally | LatencyTally]]] = {}
        r.register(
            _TallyCollector(
                self,
                "received",
                "sluice_messages_received",
                "HL7 messages received (each member of a batch counts; frames refused before parsing count once).",
                ["channel"],
            )
        )
        r.register(
            _TallyCollector(
                self,
                "acks",
                "sluice_acks",
                "Acknowledgements written back to senders, by MSA-1 code.",
                ["channel", "code"],
            )
        )
        r.register(
            _TallyCollector(
                self,
                "ack_latency",
                "sluice_ack_latency_seconds",
                "Time from a complete MLLP frame received to its ACK written to the connection.",
                ["channel"],
                histogram=True,
            )
        )
        r.register(
            _TallyCollector(
                self,
                "processed",
                "sluice_messages_processed",
                "Messages that reached a final status: at intake (rejected, quarantined, error, ignored) or "
                "by processing (processed, filtered, error, review).",
                ["channel", "status"],
            )
        )
        r.register(
            _TallyCollector(
                self,
                "deliveries",
                "sluice_deliveries",
                "Delivery attempts by outcome: delivered, retry (failed, tried again later), dead (dead-lettered).",
                ["destination", "outcome"],
            )
        )
        r.register(
            _TallyCollector(
                self,
                "delivery_lag",
                "sluice_delivery_lag_seconds",
                "Time from the message received to its delivery confirmed by the destination (the sync lag).",
                ["destination"],
                histogram=True,
            )
        )
        r.register(
            _TallyCollector(
                self,
                "duplicates",
                "sluice_duplicates_prevented",
                "Resent messages (same sender, facility and MSH-10, same content) answered from the store, not "
                "processed again.",
                ["channel"],
            )
        )
        r.register(
            _TallyCollector(
                self,
                "patient_match_failures",
                "sluice_patient_match_failures",
                "Messages that could not be matched to a patient: referring to a Patient the engine never "
                "received, or dead-lettered because a FHIR conditional write matched several Patients.",
                ["channel"],
            )
        )
        self.conversion_warnings = Counter(
            "sluice_conversion_warnings",
            "Located warnings recorded with processed messages, by kind: what a conversion dropped or changed "
            "instead of rejecting the message (e.g. field_dropped, charset_fallback, charset_unknown, "
            "encounter_end_before_start).",
            ["channel", "kind"],
            registry=r,
        )
        self.rejections = Counter(
            "sluice_rejections",
            "Failed delivery attempts by cause: validation, auth, throttling, server, network, conflict; "
            "channel is the message's channel.",
            ["channel", "class"],
            registry=r,
        )
        self.writeback_skipped = Counter(
            "sluice_writeback_skipped",
            "Write-back (fhir-to-hl7) resource versions that sent nothing, by reason: unchanged (nothing the "
            "HL7 carries changed), cancel_never_sent (cancelled or deleted before anything was sent), already_closed.",
            ["channel", "reason"],
            registry=r,
        )
        self.poll_deletions = Gauge(
            "sluice_fhir_poll_deletions_followed",
            "fhir-poll: 1 while deletions of the resource type are taken from the server's _history, 0 when "
            "the server does not support type-level history for it (no history-type in its "
            "CapabilityStatement, or _history answered 404/405): deletions are then not followed.",
            ["channel", "resource"],
            registry=r,
        )
        self.http_unresolved = Counter(
            "sluice_http_notifications_unresolved",
            "http source: Subscription notifications without resources (kind id-only, or empty: an R4 "
            "rest-hook without a body) answered 200 but not resolved, because the source has no fetch: "
            "section to read the changed resources from.",
            ["channel", "kind"],
            registry=r,
        )
        self.dead_letters = Counter(
            "sluice_dead_letters", "Deliveries moved to the dead-letter queue.", ["destination"], registry=r
        )
        self.destination_up = Gauge(
            "sluice_destination_up",
            "0 while the destination's latest delivery round failed for an availability reason (network, "
            "server, auth, throttling) and delivered nothing; 1 otherwise.",
            ["destination"],
            registry=r,
        )
        Gauge(
            "sluice_build_info",
            "Sluice version and hot-module build.",
            ["version", "build", "node"],
            registry=r,
        ).labels(version, build, node).set(1)
        self._channels: dict[str, ChannelMetrics] = {}
        self._destinations: dict[str, DestinationMetrics] = {}
        for name in channels:
            self.channel(name)
        for name in destinations:
            self.destination(name)
        self._scrape = _ScrapeCollector(self)
        r.register(self._scrape)

    # -- label children ---------------------------------------------------------------------------
    def tally(self, family: str, *labels: str) -> Tally:
        """A new counter series of ``family`` (a :class:`_TallyCollector`'s) for ``labels``."""
        t = Tally()
        self._series[family].append((labels, t))
        return t

    def latency(self, family: str, bounds: tuple[float, ...], *labels: str) -> LatencyTally:
        """A new histogram series of ``family`` for ``labels``."""
        t = LatencyTally(bounds)
        self._series[family].append((labels, t))
        return t

    def channel(self, name: str) -> ChannelMetrics:
        m = self._channels.get(name)
        if m is None:
            m = self._channels[name] = ChannelMetrics(self, name)
        return m

    def destination(self, name: str) -> DestinationMetrics:
        m = self._destinations.get(name)
        if m is None:
            m = self._destinations[name] = DestinationMetrics(self, name)
        return m

    # -- read at scrape time ----------------------------------------------------------------------
    def watch_store(self, store: Store) -> None:
        """Queue depth and oldest pending age per destination come from this store at each scrape."""
        self._scrape.store = store

    def watch_listener(self, listener: ListenerView) -> None:
        """Live connection counts (and accepted/refused/framing-error totals) from this listener."""
        self._scrape.listeners.append(listener)

    def unwatch_listener(self, listener: ListenerView) -> None:
        """A listener taken out by a live reload (its channel removed) is no longer scraped."""
        if listener in self._scrape.listeners:
            self._scrape.listeners.remove(listener)

    def watch_committer(self, committer: CommitterView) -> None:
        self._scrape.committer = committer

    # -- exposition -------------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """(body, content type) in the Prometheus text format; runs the scrape-time store query."""
        return prometheus_client.generate_latest(self.registry), CONTENT_TYPE


class _TallyCollector(Collector):
    """One family read from its tallies (:class:`Tally`, :class:`LatencyTally`) at scrape time.

    Registered where the prometheus-client family it replaces was, so the exposition keeps its order; its
    series come in the order they were made (``Metrics.tally``/``latency``), as prometheus-client's children.
    """

    def __init__(
        self,
        metrics: Metrics,
        family: str,
        name: str,
        documentation: str,
        labels: list[str],
        *,
        histogram: bool = False,
    ):
        self.series = metrics._series.setdefault(family, [])
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.histogram = histogram

    def describe(self) -> Iterator[Metric]:
        if self.histogram:
            yield HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        else:
            yield CounterMetricFamily(self.name, self.documentation, labels=self.labels)

    def collect(self) -> Iterator[Metric]:
        if self.histogram:
            histogram = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
            for labels, lat in list(self.series):
                assert isinstance(lat, LatencyTally)
                buckets, total = lat.cumulative()
                histogram.add_metric(list(labels), buckets, total)
            yield histogram
            return
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, tally in list(self.series):
            assert isinstance(tally, Tally)
            family.add_metric(list(labels), tally.value)
        yield family


class _ScrapeCollector(Collector):
    """Families computed when scraped: queue depth and age (store), connections, committer backlog."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.store: Store | None = None
        self.listeners: list[ListenerView] = []
        self.committer: CommitterView | None = None
        self._store_failing = False

    def describe(self) -> Iterator[Metric]:
        yield from _Families()

    def collect(self) -> Iterator[Metric]:
        f = _Families()
        if self.store is not None:
            try:
                pending = self.store.pending_summary()
            except Exception as exc:  # a scrape must not fail because the store is briefly unreachable
                if not self._store_failing:
                    log.warning("metrics_store_query_failed", error=type(exc).__name__, detail=str(exc)[:200])
                self._store_failing = True
                f.store_up.add_metric([], 0)
            else:
                self._store_failing = False
                f.store_up.add_metric([], 1)
                now = time.time()
                for name in dict.fromkeys([*self.metrics._destinations, *pending]):
                    count, oldest = pending.get(name, (0, None))
                    f.queue_depth.add_metric([name], count)
                    f.oldest_age.add_metric([name], max(0.0, now - oldest) if oldest is not None else 0.0)
                yield f.queue_depth
                yield f.oldest_age
            yield f.store_up
        if self.listeners:
            for lst in self.listeners:
                st = lst.stats
                f.connections.add_metric([lst.channel_name], st.connections)
                f.accepted.add_metric([lst.channel_name], st.accepted_total)
                f.refused.add_metric([lst.channel_name], st.refused_total)
                f.evicted.add_metric([lst.channel_name], st.evicted_total)
                f.framing_errors.add_metric([lst.channel_name], st.framing_errors)
            yield f.connections
            yield f.accepted
            yield f.refused
            yield f.evicted
            yield f.framing_errors
        if self.committer is not None:
            f.backlog.add_metric([], self.committer.backlog)
            yield f.backlog


class _Families:
    """The scrape-time families, fresh for each scrape."""

    def __init__(self) -> None:
        self.queue_depth = GaugeMetricFamily(
            "sluice_queue_depth", "Pending deliveries (waiting or retrying).", labels=["destination"]
        )
        self.oldest_age = GaugeMetricFamily(
            "sluice_oldest_pending_age_seconds",
            "Age of the oldest pending delivery (0 when none is pending).",
            labels=["destination"],
        )
        self.connections = GaugeMetricFamily(
            "sluice_connections", "Open MLLP connections.", labels=["channel"]
        )
        self.accepted = CounterMetricFamily(
            "sluice_connections_accepted", "MLLP connections accepted.", labels=["channel"]
        )
        self.refused = CounterMetricFamily(
            "sluice_connections_refused",
            "MLLP connections refused at the connection cap (only with source.max_connections: 0).",
            labels=["channel"],
        )
        self.evicted = CounterMetricFamily(
            "sluice_connections_evicted",
            "MLLP connections closed so a newcomer could be served (max_connections, max_connections_per_peer).",
            labels=["channel"],
        )
        self.framing_errors = CounterMetricFamily(
            "sluice_framing_errors", "MLLP connections closed for broken framing.", labels=["channel"]
        )
        self.backlog = GaugeMetricFamily(
            "sluice_committer_backlog", "Intake jobs waiting for the group commit."
        )
        self.store_up = GaugeMetricFamily(
            "sluice_store_up", "1 when the scrape-time store query succeeded, 0 when it failed."
        )

    def __iter__(self) -> Iterator[Metric]:
        return iter(
            (
                self.queue_depth,
                self.oldest_age,
                self.connections,
                self.accepted,
                self.refused,
                self.evicted,
                self.framing_errors,
                self.backlog,
                self.store_up,
            )
        )


# -- rejection classes ------------------------------------------------------------------------------
_NETWORK_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.ENOTCONN,
    }
)
_AUTH_ERRNOS = frozenset({errno.EACCES, errno.EPERM})


def rejection_class(exc: BaseException) -> str:
    """Why a delivery failed, as one of ``engine.errors.REJECTION_CLASSES``.

    A :class:`~engine.errors.DeliveryError` says so itself (``category``, set where the destinations
    raise); this classifies whatever comes without one: plugin destinations, raw library errors.
    """
    category = getattr(exc, "category", None)
    if category in REJECTION_CLASSES:
        return str(category)
    httpx = sys.modules.get("httpx")
    if httpx is not None:
        if isinstance(exc, httpx.HTTPStatusError):
            from engine.destinations.http import status_category

            return status_category(exc.response.status_code)
        if isinstance(exc, httpx.TransportError):
            return "network"
    if isinstance(exc, (TimeoutError, ConnectionError, ssl.SSLError)):
        return "network"
    if isinstance(exc, OSError):
        if exc.errno in _NETWORK_ERRNOS:
            return "network"
        if exc.errno in _AUTH_ERRNOS:
            return "auth"
        return "server"
    if isinstance(exc, DeliveryError):
        # Retrying can help: the other side had trouble; it cannot: it refused this message.
        return "server" if exc.retryable else "validation"
    if isinstance(exc, (ValueError, TypeError, KeyError, UnicodeError)):
        return "validation"  # the payload did not fit what the destination (plugin) expects
    return "server"
