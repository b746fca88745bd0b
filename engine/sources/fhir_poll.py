"""``source: {kind: fhir-poll}``: take a FHIR server's changed resources into the store, incrementally.

Each round, per resource type: ``GET {base}/{Type}?_lastUpdated=gt{cursor - overlap}&_sort=_lastUpdated
&_count=N`` (plus the channel's ``params``), then keyset pages (``_lastUpdated=ge{newest of the page}``;
``_offset`` only to step past a full page of one timestamp).  Each page is one write transaction through
the committer: its new resource versions become messages (engine/sources/resources.py) and the cursor
moves to the page's newest ``meta.lastUpdated``, together, so the cursor never runs ahead of what is
stored.  A version already stored (same resource id and ``meta.versionId``) is skipped: the overlap
window and the ``ge`` pages fetch some twice by design, and a restart (even a SIGKILL mid-page) starts
again from the last committed cursor without emitting anything twice.

Deletions (engine/sources/history.py): when the server's CapabilityStatement (``GET {base}/metadata``, read
once at start) lists ``history-type`` for a type, each round also reads ``GET {base}/{Type}/_history?_since=
{history cursor - overlap}&_count=N`` and its ``next`` pages.  Its deleted versions become tombstone
messages, stored with the history cursor (``{Type}/_history``, the newest time of any entry read) in one
transaction after the round's last page: a kill mid-round stores nothing of it, and the next round reads
the same versions again, deduped by id + versionId like the search's.  Without a cursor the first round
only asks for the newest entry (``_count=1``) and starts from its time, before that type's first search.
A server without type-level history (no CapabilityStatement, no ``history-type``, or ``_history``
answering 404/405) is logged once (``fhir_poll_deletions_not_followed``) and shown by
``sluice_fhir_poll_deletions_followed{channel, resource} 0``; its deletions are not followed.

Auth and TLS are the fhir destination's options (bearer, basic, OAuth2, SMART backend, mTLS).  A failed
poll is logged (status and resource type, never content) and retried at the next interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import structlog
from sqlalchemy import insert, select, update

from engine.config import ChannelConfig, FhirPollConfig
from engine.destinations.base import DestinationContext
from engine.destinations.fhir import Auth
from engine.destinations.http import build_ssl_context
from engine.errors import ConfigError
from engine.sources import history, resources
from engine.sources.resources import instant, parse_instant
from engine.store import CURSORS, NewMessage, Store

log = structlog.get_logger("sluice.fhir_poll")

SOURCE_NAME = "fhir-poll"
HISTORY_CURSOR = "{}/_history"  # the history cursor's row in source_cursors, per resource type
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # the history cursor of a type whose history was empty


class HistoryUnsupported(Exception):
    """The server answered ``_history`` with 404/405: it has no type-level history."""


class FhirPoller:
    """One channel's poller: :meth:`run` until ``stop`` is set."""

    def __init__(
        self,
        channel: ChannelConfig,
        store: Store,
        run_op: Callable[..., Any],
        *,
        ctx: DestinationContext,
        on_stored: Callable[[], None] = lambda: None,
        metrics: Any = None,
        poll: FhirPollConfig | None = None,
        key: str = "source",
        source_name: str = SOURCE_NAME,
        facility: str | None = None,
    ):
        """``poll``, ``key``, ``source_name`` and ``facility`` for another source that searches the same way
        (an http source's ``fetch:``, engine/sources/http.py): its config, where its keys are, and what its
        stored versions say they came from (so they dedupe against the versions it takes otherwise)."""
        self.received = metrics.channel(channel.name).received if metrics is not None else None
        poll = poll or channel.source.poll
        if poll is None:
            raise ConfigError("not a fhir-poll source", file=channel.file, key="source.kind")
        self.channel = channel
        self.poll: FhirPollConfig = poll
        self.store = store
        self.run_op = run_op  # Committer.run_op: the page's write transaction (durable)
        self.on_stored = on_stored
        self.source_name = source_name
        ctx = DestinationContext(ctx.base_dir, channel.file)
        self.auth = Auth(poll.auth, ctx=ctx, key=f"{key}.auth")
        tls = dict(poll.tls)
        if self.auth.tls:
            tls |= self.auth.tls
        self.ssl = build_ssl_context(tls, ctx=ctx, key=f"{key}.tls")
        self.facility = urlsplit(poll.base_url).netloc if facility is None else facility
        self.client: httpx.AsyncClient | None = None
        self.polls = 0
        self.taken = 0  # resource versions stored
        self.last_error = ""
        # per resource type: True deletions are followed, False not (the server has no type-level
        # history), absent: not known yet (the CapabilityStatement could not be read so far)
        self.deletions: dict[str, bool] = {}
        self.deletions_gauge = metrics.poll_deletions if metrics is not None else None

    # ------------------------------------------------------------------ the loop
    async def run(self, stop: asyncio.Event) -> None:
        self.open()
        try:
            while not stop.is_set():
                if len(self.deletions) < len(self.poll.resources):
                    await self.read_capabilities()
                for rtype in self.poll.resources:
                    # (a failing history never holds up the search: each step is tried on its own)
                    ok = await self._step(self.start_history, rtype, history=True)
                    ok = await self._step(self.poll_once, rtype) and ok
                    ok = await self._step(self.poll_history, rtype, history=True) and ok
                    if ok:
                        self.last_error = ""
                self.polls += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll.interval)
        finally:
            await self.aclose()

    def open(self) -> httpx.AsyncClient:
        """The HTTP client (made once; closed by :meth:`run` at its end, or by :meth:`aclose`)."""
        if self.client is None:
            self.client = httpx.AsyncClient(verify=self.ssl, timeout=self.poll.timeout)
        return self.client

    async def aclose(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()

    async def read(self, url: str) -> httpx.Response:
        """``GET url`` with the source's credentials (one retry with a new token on a 401)."""
        self.open()
        return await self._request(url, {})

    async def _step(self, fn: Callable[[str], Awaitable[Any]], rtype: str, *, history: bool = False) -> bool:
        """One step of a round for one type (a history step only while its deletions are followed); a
        failure is logged (status and type, never content) and tried again at the next interval."""
        if history and not self.deletions.get(rtype):
            return True
        try:
            await fn(rtype)
            return True
        except HistoryUnsupported as exc:
            self.not_followed(rtype, str(exc))
            return True
        except Exception as exc:
            self.last_error = type(exc).__name__
            log.warning(
                "fhir_poll_failed",
                channel=self.channel.name,
                resource=rtype,
                what="_history" if history else "search",
                error=type(exc).__name__,
                status=getattr(getattr(exc, "response", None), "status_code", None),
            )
            return False

    async def poll_once(self, rtype: str) -> int:
        """One round for one resource type: every page since the cursor; returns versions stored."""
        cursor = await asyncio.to_thread(self.cursor, rtype)
        lower: datetime | None = None
        if cursor is not None:
            lower = cursor - timedelta(seconds=self.poll.overlap)
        op = "gt"
        offset = 0
        stored = 0
        while True:
            params: dict[str, Any] = {
                **self.poll.params,
                "_sort": "_lastUpdated",
                "_count": self.poll.page_size,
            }
            if lower is not None:
                params["_lastUpdated"] = op + instant(lower)
            if offset:
                params["_offset"] = offset
            bundle = await self._get(f"{self.poll.base_url}/{rtype}", params)
            found = [
                e["resource"]
                for e in bundle.get("entry", ()) or ()
                if isinstance(e, dict)
                and isinstance(e.get("resource"), dict)
                and e["resource"].get("resourceType") == rtype
                and (e.get("search") or {}).get("mode", "match") == "match"
            ]
            newest = max(
                (
                    t
                    for r in found
                    if (t := parse_instant(str((r.get("meta") or {}).get("lastUpdated") or "")))
                ),
                default=None,
            )
            new = await self.run_op(self._page_writer(rtype, found, newest), 0, durable=True)
            if new:  # processed while the next page is fetched (and not lost to a later page's failure)
                stored += new
                self.taken += new
                if self.received is not None:  # sluice_messages_received_total, as for MLLP messages
                    self.received.inc(new)
                self.on_stored()
            if len(found) < self.poll.page_size or newest is None:
                break
            if lower is not None and newest <= lower:
                offset += len(found)  # a full page of one timestamp: step past it
            else:
                lower, op, offset = newest, "ge", 0
        return stored

    # ------------------------------------------------------------------ deletions (_history)
    async def read_capabilities(self) -> None:
        """Which types' deletions can be followed, from the CapabilityStatement (once; a transient failure
        is tried again at the next round)."""
        try:
            resp = await self._request(f"{self.poll.base_url}/metadata", {})
        except Exception:
            return  # not reachable now (or no token yet): the search logs it; asked again next round
        if resp.status_code in (401, 403, 408, 429) or resp.status_code >= 500:
            return
        try:
            body: Any = orjson.loads(resp.content) if resp.status_code == 200 else None
        except orjson.JSONDecodeError:
            body = None
        types = history.history_types(body)
        for rtype in self.poll.resources:
            if rtype in self.deletions:
                continue
            if types is None:
                self.not_followed(
                    rtype, f"the server has no CapabilityStatement at /metadata (HTTP {resp.status_code})"
                )
            elif rtype not in types:
                self.not_followed(rtype, f"the server's CapabilityStatement has no history-type for {rtype}")
            else:
                self.deletions[rtype] = True
                if self.deletions_gauge is not None:
                    self.deletions_gauge.labels(self.channel.name, rtype).set(1)

    def not_followed(self, rtype: str, why: str) -> None:
        """Deletions of ``rtype`` are not followed: one warning line, and the gauge at 0."""
        if self.deletions.get(rtype) is False:
            return
        self.deletions[rtype] = False
        if self.deletions_gauge is not None:
            self.deletions_gauge.labels(self.channel.name, rtype).set(0)
        log.warning(
            "fhir_poll_deletions_not_followed",
            channel=self.channel.name,
            resource=rtype,
            reason=why,
            hint="deleted resources are not taken (no S17/A29/CA for them); cancel by status instead, or "
            "use a server with type-level history (_history)",
        )

    async def _history_page(self, url: str, params: dict[str, Any]) -> dict[str, Any]:
        resp = await self._request(url, params)
        if resp.status_code in (404, 405):
            raise HistoryUnsupported(f"the server answered _history with HTTP {resp.status_code}")
        return self._bundle(resp)

    async def start_history(self, rtype: str) -> None:
        """A type without a history cursor starts at its newest history entry (``_count=1``: the history is
        newest first): deletions after it are followed, older ones were of resources never taken."""
        name = HISTORY_CURSOR.format(rtype)
        if await asyncio.to_thread(self.cursor, name) is not None:
            return
        bundle = await self._history_page(f"{self.poll.base_url}/{rtype}/_history", {"_count": 1})
        page = history.parse_page(bundle, rtype)
        start = page.newest if page.entries else EPOCH
        if start is not None:
            await self.run_op(self._history_writer(rtype, [], start), 0, durable=True)

    async def poll_history(self, rtype: str) -> int:
        """Every history page since the history cursor: the deletions are stored, with the cursor, after
        the last page (one transaction); returns the deletions stored."""
        name = HISTORY_CURSOR.format(rtype)
        cursor = await asyncio.to_thread(self.cursor, name)
        params: dict[str, Any] = {"_count": self.poll.page_size}
        if cursor is not None:
            params["_since"] = instant(max(cursor - timedelta(seconds=self.poll.overlap), EPOCH))
        url = f"{self.poll.base_url}/{rtype}/_history"
        seen: set[str] = set()
        found: dict[tuple[str, str], history.Deletion] = {}
        newest: datetime | None = None
        while True:
            page = history.parse_page(await self._history_page(url, params), rtype)
            for d in page.deletions:
                found.setdefault((d.id, d.version), d)
            if page.newest is not None and (newest is None or page.newest > newest):
                newest = page.newest
            seen.add(str(httpx.URL(url, params=params or None)))
            if not page.next_url or not page.entries:
                break
            url, params = history.follow(page.next_url, self.poll.base_url), {}
            if url in seen:
                break  # a server whose next link points back: stop rather than loop
        if not found and (newest is None or (cursor is not None and newest <= cursor)):
            return 0  # nothing to store and the cursor stays: no write transaction
        new = await self.run_op(self._history_writer(rtype, list(found.values()), newest), 0, durable=True)
        if new:
            self.taken += new
            if self.received is not None:
                self.received.inc(new)
            self.on_stored()
        return int(new)

    # ------------------------------------------------------------------ HTTP
    async def _request(self, url: str, params: dict[str, Any]) -> httpx.Response:
        assert self.client is not None
        for attempt in (1, 2):
            headers = {"Accept": "application/fhir+json", **await self.auth.headers(self.client, "fhir-poll")}
            # (params None, not {}: an empty mapping would drop the query of a next link's URL)
            resp = await self.client.get(url, params=params or None, headers=headers)
            if resp.status_code == 401 and self.auth.refreshable and attempt == 1:
                self.auth.invalidate()
                continue
            return resp
        raise AssertionError("unreachable")

    @staticmethod
    def _bundle(resp: httpx.Response) -> dict[str, Any]:
        resp.raise_for_status()
        body = orjson.loads(resp.content)
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            raise ValueError("the search answer is not a Bundle")
        return body

    async def _get(self, url: str, params: dict[str, Any]) -> dict[str, Any]:
        return self._bundle(await self._request(url, params))

    # ------------------------------------------------------------------ store side
    def cursor(self, rtype: str) -> datetime | None:
        with self.store.engine.connect() as conn:
            row = conn.execute(
                select(CURSORS.c.cursor).where(
                    CURSORS.c.channel == self.channel.name, CURSORS.c.resource == rtype
                )
            ).first()
        return parse_instant(row[0]) if row is not None else None

    def _page_writer(
        self, rtype: str, found: list[dict[str, Any]], newest: datetime | None
    ) -> Callable[[Any], int]:
        ch = self.channel
        now = time.time()
        rows: dict[str, NewMessage] = {}
        for res in found:
            raw = orjson.dumps(res)
            row = resources.message_row(
                ch.name,
                res,
                raw,
                source=self.source_name,
                facility=self.facility,
                received_at=now,
                dedupe=True,
                order_by=ch.order_by,
            )
            rows.setdefault(row.dedupe_key, row)

        def write(conn: Any) -> int:
            fresh = self._store_new(conn, rows, now)
            if newest is not None:
                self._advance(conn, rtype, newest, now)
            return len(fresh)

        return write

    def _store_new(self, conn: Any, rows: dict[str, NewMessage], now: float) -> list[NewMessage]:
        """Insert the rows not stored before (dedupe key), remember each as its resource's newest version."""
        ch = self.channel
        window = max(ch.dedupe.window_days * 86400.0, self.poll.overlap * 10)
        seen = self.store.find_duplicates(
            conn, ch.name, list(rows), now - window, [r.control_id for r in rows.values()]
        )  # (with the control ids the look-up seeks ix_messages_control_channel)
        fresh = [r for k, r in rows.items() if k not in seen]
        ids = self.store.insert_messages(conn, fresh)
        refs = [r.control_id.split("/_history/", 1)[0] for r in fresh]
        self.store.remember_resources(conn, ch.name, list(zip(refs, ids, strict=True)))
        return fresh

    def _advance(self, conn: Any, name: str, newest: datetime, now: float) -> None:
        """Move cursor ``name`` (a resource type, or ``Type/_history``) to ``newest``; never back."""
        ch = self.channel
        current = conn.execute(
            select(CURSORS.c.cursor).where(CURSORS.c.channel == ch.name, CURSORS.c.resource == name)
        ).first()
        if current is None:
            conn.execute(
                insert(CURSORS).values(channel=ch.name, resource=name, cursor=instant(newest), updated_at=now)
            )
        elif (old := parse_instant(current[0])) is None or newest > old:
            conn.execute(
                update(CURSORS)
                .where(CURSORS.c.channel == ch.name, CURSORS.c.resource == name)
                .values(cursor=instant(newest), updated_at=now)
            )

    def _history_writer(
        self, rtype: str, deletions: list[history.Deletion], newest: datetime | None
    ) -> Callable[[Any], int]:
        """The history round's transaction: a tombstone per deletion (oldest first), the history cursor."""
        ch = self.channel
        now = time.time()
        order = sorted(deletions, key=lambda d: (d.at or EPOCH, d.id))

        def write(conn: Any) -> int:
            rows: dict[str, NewMessage] = {}
            for d in order:
                last: Any = None
                body = self.store.last_resource_body(conn, ch.name, d.ref)
                if body is not None and resources.is_fhir(body):
                    with contextlib.suppress(orjson.JSONDecodeError):
                        last = orjson.loads(body)
                res = history.tombstone(
                    d, last if isinstance(last, dict) else None, instant(d.at) if d.at else ""
                )
                row = resources.message_row(
                    ch.name,
                    res,
                    orjson.dumps(res),
                    source=self.source_name,
                    facility=self.facility,
                    received_at=now,
                    dedupe=True,
                    order_by=ch.order_by,
                )
                rows.setdefault(row.dedupe_key, row)
            fresh = self._store_new(conn, rows, now)
            if newest is not None:
                self._advance(conn, HISTORY_CURSOR.format(rtype), newest, now)
            return len(fresh)

        return write
