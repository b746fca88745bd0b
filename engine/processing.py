"""Processing one stored message through its channel: filter → transform → routes.

Used by the processing worker (``ack: on-commit``) and inline by the committer
(``ack: after-processing``); either way it runs inside the store transaction
that records its result, so a message is never half-processed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Protocol

import structlog

from engine import redact, writeback
from engine.config import ChannelConfig, Config
from engine.config.problems import Problems, attempt
from engine.destinations.base import CONTENT_HL7
from engine.errors import Location, MessageContentError, SluiceError
from engine.hl7 import Message, decode_warning, parse_bytes
from engine.intake import Output, ProcessResult
from engine.pipeline import Pipeline, Predicate, StageContext, Work
from engine.sources import resources
from engine.stages import build_filter, build_pipeline
from engine.store import ERROR, FILTERED, PROCESSED, REVIEW, NewDelivery, RankView, Store

log = structlog.get_logger("sluice.processing")


class Ranks(Protocol):
    """Where :meth:`ChannelRuntime.record` reads the status ranks already applied: a store's
    ``RankView`` in the engine, an in-memory one in channel tests (engine/channeltest.py)."""

    def get(self, keys: Sequence[str]) -> dict[str, int]: ...


@dataclass(frozen=True)
class Route:
    destination: str
    filter: Predicate | None


_REQUIRED_AT = {
    "Patient": Location("MRG", 1, 1),
    "Appointment": Location("SCH", 1, 2),
    "Account": Location("MRG", 1, 3),
    "Encounter": Location("MRG", 1, 5),
}
_REQUIRED_WHAT = {
    "Patient": "the prior patient of a merge or identifier change",
    "Appointment": "the appointment being cancelled",
    "Account": "the prior account of an account merge, move or number change",
    "Encounter": "the prior visit of a visit merge or visit number change",
}


def _raised_at(exc: BaseException) -> str:
    """``file.py:123 in function`` of the innermost frame of ``exc``'s traceback (no values)."""
    tb = exc.__traceback__
    if tb is None:
        return "an unknown place"
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f"{code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} in {code.co_name}"


class ChannelRuntime:
    """A channel's compiled pipeline and routes."""

    def __init__(
        self, config: Config, channel: ChannelConfig, store: Store | None, problems: Problems | None = None
    ):
        """``problems`` (``sluice check``): each step's and route filter's error is kept there, not raised."""
        self.channel = channel
        self.store = store
        self._wb_secret: bytes | None = None
        ctx = StageContext(
            channel=channel.name,
            base_dir=config.base_dir,
            config_file=channel.file,
            site_tz=channel.site_tz,
            strictness=channel.strictness,
        )
        self.pipeline: Pipeline = build_pipeline(channel.filter, channel.transform, ctx, problems)
        if channel.validate == "structure":  # after the filter, before the first step (engine/validation.py)
            from engine.validation import structure_step

            self.pipeline = replace(self.pipeline, steps=(structure_step(), *self.pipeline.steps))
        self.routes = tuple(
            Route(
                r.destination,
                attempt(problems, partial(build_filter, r.filter, ctx, f"routes[{i}].filter"), None),
            )
            for i, r in enumerate(channel.routes)
        )

    def _secret(self, conn: Any) -> bytes:
        """The installation's write-back HMAC key (read once, in the caller's transaction)."""
        if self._wb_secret is not None:
            return self._wb_secret
        secret, committed = writeback.installation_secret(conn)
        if committed:
            self._wb_secret = secret
        return secret

    def process(
        self, conn: Any, message_id: int, msg: Message, raw: bytes, only: list[str] | None = None
    ) -> ProcessResult:
        """Run the pipeline and decide what to record (both steps below, one after the other)."""
        return self.record(conn, self.run(message_id, msg, raw), only)

    def run_raw(self, message_id: int, raw: bytes) -> ProcessResult:
        """Parse and :meth:`run` (what a processing worker, or a worker process, does per message)."""
        if resources.is_fhir(raw):  # a FHIR resource (engine/sources/resources.py): a header, no parse
            return self.run(message_id, resources.header(raw), raw, resources.CONTENT_FHIR)
        try:
            src = self.channel.source
            msg = parse_bytes(raw, src.fallback_charset, src.utf8_fallback)
        except SluiceError as exc:
            return ProcessResult(ERROR, str(exc), exc)
        return self.run(message_id, msg, raw)

    def run(
        self, message_id: int, msg: Message, raw: bytes, content_type: str = CONTENT_HL7
    ) -> ProcessResult:
        """The pure part: filter, transform steps and route filters; no store access."""
        work = Work(message=msg, raw=raw, payload=raw, content_type=content_type)
        try:
            out = self.pipeline.run(work)
        except SluiceError as exc:
            log.info(
                "processing_failed",
                channel=self.channel.name,
                message_id=message_id,
                control_id=redact.control_id(msg.control_id),
                error=type(exc).__name__,
                code=exc.hl7_error,
                location=str(exc.location) if exc.location else None,
            )
            return ProcessResult(ERROR, str(exc), exc)
        except Exception as exc:  # a bug in a step: the message is kept and marked, never lost
            log.error(
                "processing_crashed",
                channel=self.channel.name,
                message_id=message_id,
                control_id=redact.control_id(msg.control_id),
                error=type(exc).__name__,
            )
            # The exception's own text may quote message content (a KeyError names the key): the
            # reason carries the type and where it was raised, which is what a developer needs.
            err = MessageContentError(
                f"internal error in a transform step: {type(exc).__name__} at {_raised_at(exc)}", code="207"
            )
            err.ack_code = "AR"  # type: ignore[misc]
            return ProcessResult(ERROR, str(err), err)
        if out is None:
            return ProcessResult(FILTERED, "filtered by the channel filter")
        routes = [r.destination for r in self.routes if r.filter is None or r.filter(msg)]
        facts = dict(out.facts)
        if "writeback" in facts:  # record() decides which candidate is sent (engine/writeback.py)
            facts["writeback"] = {**facts["writeback"], "message_id": message_id}
        if content_type == CONTENT_HL7 and (
            charset := decode_warning(raw, self.channel.source.utf8_fallback)
        ):
            # not read as MSH-18 declares, at intake and above (engine.hl7.decode: charset_fallback,
            # charset_unknown): said once, first, with the message
            facts["warnings"] = [list(charset), *facts.get("warnings", ())]
        output = Output(
            out.payload, out.content_type, {k: str(v) for k, v in out.meta.items()}, facts, routes
        )
        return ProcessResult(PROCESSED, "", None, output=output)

    def record(
        self,
        conn: Any,
        prepared: ProcessResult,
        only: list[str] | None = None,
        force: bool = False,
        view: RankView | Ranks | None = None,
    ) -> ProcessResult:
        """Inside the store transaction: status guards, required keys and one delivery per route.

        ``force`` (an operator's replay of a message held for review) applies it despite its guards.
        """
        out = prepared.output
        if prepared.status != PROCESSED or out is None:
            return prepared
        result = self._decide(conn, prepared, out, only, force, view)
        # what the conversion dropped or changed is recorded whatever the decision (held, filtered, error)
        warned = out.facts.get("warnings")
        if warned:
            result.warnings = [(str(k), str(t)) for k, t in warned]
        return result

    def _decide(
        self,
        conn: Any,
        prepared: ProcessResult,
        out: Output,
        only: list[str] | None,
        force: bool,
        view: RankView | Ranks | None,
    ) -> ProcessResult:
        if view is not None:
            ranks_of = view.get
        else:
            store = self.store
            assert store is not None, "record() runs in the engine process, which has the store"
            ranks_of = lambda keys: store.resource_ranks(conn, keys)  # noqa: E731
        facts: Mapping[str, Any] = out.facts
        guards = dict(facts.get("guards", ()) or ())
        ranks: dict[str, int] = {}
        if guards and force:
            ranks.update(guards)
        elif guards:
            current = ranks_of(list(guards))
            for key, rank in guards.items():
                if current.get(key, -1) > rank:
                    reason = (
                        "held for manual review: this message carries a lower result status than one already "
                        "applied (e.g. preliminary after final); replay it if it should be applied anyway"
                    )
                    return ProcessResult(REVIEW, reason)
                ranks[key] = rank
        for key in facts.get("keys", ()) or ():
            ranks.setdefault(key, 0)
        for key in facts.get("requires", ()) or ():
            if key not in ranks and not ranks_of([key]):
                rtype = key.split("?", 1)[0]
                err = MessageContentError(
                    f"this message refers to {'an' if rtype[:1] in 'AEIOU' else 'a'} {rtype} the engine has never "
                    "received "
                    f"({_REQUIRED_WHAT.get(rtype, 'a prior record')}); send that first or replay after it arrives",
                    code="204",
                    location=_REQUIRED_AT.get(rtype),
                )
                # ``missing``: counted as a patient match failure (engine.metrics) once recorded.
                return ProcessResult(ERROR, str(err), err, missing=rtype)
        payload, packed, meta = out.payload, out.packed, out.meta
        if (wb := facts.get("writeback")) is not None:
            decision = writeback.apply(conn, self.channel.name, int(wb["message_id"]), wb, self._secret(conn))
            if decision.message is None:
                return ProcessResult(
                    FILTERED, decision.reason, ranks=ranks, writeback_skipped=decision.skipped
                )
            payload, packed, meta = decision.payload, False, {**meta, "hl7_message": decision.message}
        deliveries = [
            NewDelivery(dest, payload, out.content_type, meta, packed=packed)
            for dest in out.routes
            if only is None or dest in only
        ]
        if not deliveries and self.routes:
            return ProcessResult(FILTERED, "no route accepted the message", ranks=ranks)
        return ProcessResult(PROCESSED, "", None, deliveries, ranks)
