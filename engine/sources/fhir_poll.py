"""``source: {kind: fhir-poll}``: take a FHIR server's changed resources into the store, incrementally.

Each round, per resource type: ``GET {base}/{Type}?_lastUpdated=gt{cursor - overlap}&_sort=_lastUpdated
&_count=N`` (plus the channel's ``params``), then keyset pages (``_lastUpdated=ge{newest of the page}``;
``_offset`` only to step past a full page of one timestamp).  Each page is one write transaction through
the committer: its new resource versions become messages (engine/sources/resources.py) and the cursor
moves to the page's newest ``meta.lastUpdated``, together, so the cursor never runs ahead of what is
stored.  A version already stored (same resource id and ``meta.versionId``) is skipped: the overlap
window and the ``ge`` pages fetch some twice by design, and a restart (even a SIGKILL mid-page) starts
again from the last committed cursor without emitting anything twice.

Auth and TLS are the fhir destination's options (bearer, basic, OAuth2, SMART backend, mTLS).  A failed
poll is logged (status and resource type, never content) and retried at the next interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import datetime, timedelta
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
from engine.sources import resources
from engine.sources.resources import instant, parse_instant
from engine.store import CURSORS, NewMessage, Store

log = structlog.get_logger("sluice.fhir_poll")

SOURCE_NAME = "fhir-poll"


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
    ):
        self.received = metrics.channel(channel.name).received if metrics is not None else None
        poll = channel.source.poll
        if poll is None:
            raise ConfigError("not a fhir-poll source", file=channel.file, key="source.kind")
        self.channel = channel
        self.poll: FhirPollConfig = poll
        self.store = store
        self.run_op = run_op  # Committer.run_op: the page's write transaction (durable)
        self.on_stored = on_stored
        key = "source"
        ctx = DestinationContext(ctx.base_dir, channel.file)
        self.auth = Auth(poll.auth, ctx=ctx, key=f"{key}.auth")
        tls = dict(poll.tls)
        if self.auth.tls:
            tls |= self.auth.tls
        self.ssl = build_ssl_context(tls, ctx=ctx, key=f"{key}.tls")
        self.facility = urlsplit(poll.base_url).netloc
        self.client: httpx.AsyncClient | None = None
        self.polls = 0
        self.taken = 0  # resource versions stored
        self.last_error = ""

    # ------------------------------------------------------------------ the loop
    async def run(self, stop: asyncio.Event) -> None:
        self.client = httpx.AsyncClient(verify=self.ssl, timeout=self.poll.timeout)
        try:
            while not stop.is_set():
                for rtype in self.poll.resources:
                    try:
                        await self.poll_once(rtype)
                        self.last_error = ""
                    except Exception as exc:
                        self.last_error = type(exc).__name__
                        log.warning(
                            "fhir_poll_failed",
                            channel=self.channel.name,
                            resource=rtype,
                            error=type(exc).__name__,
                            status=getattr(getattr(exc, "response", None), "status_code", None),
                        )
                self.polls += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll.interval)
        finally:
            await self.client.aclose()
            self.client = None

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

    async def _get(self, url: str, params: dict[str, Any]) -> dict[str, Any]:
        assert self.client is not None
        for attempt in (1, 2):
            headers = {"Accept": "application/fhir+json", **await self.auth.headers(self.client, "fhir-poll")}
            resp = await self.client.get(url, params=params, headers=headers)
            if resp.status_code == 401 and self.auth.refreshable and attempt == 1:
                self.auth.invalidate()
                continue
            resp.raise_for_status()
            body = orjson.loads(resp.content)
            if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
                raise ValueError("the search answer is not a Bundle")
            return body
        raise AssertionError("unreachable")

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
                source=SOURCE_NAME,
                facility=self.facility,
                received_at=now,
                dedupe=True,
                order_by=ch.order_by,
            )
            rows.setdefault(row.dedupe_key, row)
        window = max(ch.dedupe.window_days * 86400.0, self.poll.overlap * 10)

        def write(conn: Any) -> int:
            seen = self.store.find_duplicates(
                conn, ch.name, list(rows), now - window, [r.control_id for r in rows.values()]
            )  # (with the control ids the look-up seeks ix_messages_control_channel)
            fresh = [r for k, r in rows.items() if k not in seen]
            self.store.insert_messages(conn, fresh)
            if newest is not None:
                current = conn.execute(
                    select(CURSORS.c.cursor).where(CURSORS.c.channel == ch.name, CURSORS.c.resource == rtype)
                ).first()
                if current is None:
                    conn.execute(
                        insert(CURSORS).values(
                            channel=ch.name, resource=rtype, cursor=instant(newest), updated_at=now
                        )
                    )
                elif (old := parse_instant(current[0])) is None or newest > old:
                    conn.execute(
                        update(CURSORS)
                        .where(CURSORS.c.channel == ch.name, CURSORS.c.resource == rtype)
                        .values(cursor=instant(newest), updated_at=now)
                    )
            return len(fresh)

        return write
