"""Channel tests: ``channels/<name>_test.yaml`` beside a channel, run by ``sluice test``.

A test file names its channel and lists cases; each case sends a sequence of messages through the
channel exactly as the engine would (the intake's own checks and ACK decision, then the channel's
compiled pipeline and its record step: status guards, required records, routes) and applies every
FHIR transaction Bundle it delivers to an in-memory FHIR target (engine/fhirtarget.py), so a test
checks the *final* state a server would hold after, say, A01 then A03.  Expectations::

    channel: allscripts
    cases:
      - name: admit then discharge
        input: [samples/a01.hl7, samples/a03.hl7]   # files; or inline HL7 under `hl7:`
        expect:
          ack: AA                     # every message's ACK code, or a list (one per message)
          status: processed           # processed | filtered | error | review | rejected (| quarantined...)
          fhir:                       # FHIRPath on the final state: each must give true
            - "Encounter.where(identifier.value = 'V100').status = 'finished'"
          golden: expected/admit_discharge.json   # the whole final state, compared as JSON

A write-back channel (source ``fhir-poll`` or ``http``, step ``fhir-to-hl7``) takes FHIR resources and
sends HL7 v2: its cases give resources (``fhir:`` inline, or ``.json``/``.yaml`` files under ``input:``),
each taken as the source stores it (engine/sources/resources.py: the same row, the same dedupe by id and
``meta.versionId``), run through the compiled pipeline and the record step, whose write-back decision
(engine/writeback.py) runs against an in-memory store of its own per case.  They expect the HL7 sent::

    cases:
      - name: booked, moved, cancelled
        fhir: [appointments/booked.json, appointments/moved.json, appointments/cancelled.json]
        expect:
          hl7:                        # one per resource: what was sent, or `nothing`
            - {MSH-9: SIU^S12, SCH-1: PA-1001}
            - SIU^S13                 # short for {MSH-9: SIU^S13}
            - SIU^S15
          golden: expected/booked_moved_cancelled.hl7   # every message sent, MSH-7/MSH-10 masked

Each case starts from an empty target and an empty store.  Paths are relative to the test file's folder
(else to the folder of routes.yaml).  The format is documented in docs/testing-channels.md.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
import yaml

from engine import ack as ackmod
from engine.config import ChannelConfig, Config
from engine.destinations.base import CONTENT_HL7
from engine.errors import ConfigError, SluiceError
from engine.fhirtarget import FhirTarget, TargetError
from engine.hl7 import parse_bytes, parse_path
from engine.intake import Committer, Intake, render_ack
from engine.processing import ChannelRuntime
from engine.sources import resources
from engine.store import ERROR, PROCESSED, RECEIVED

TEST_SUFFIX = "_test.yaml"
STATUSES = ("processed", "filtered", "error", "review", "rejected", "quarantined", "ignored", "duplicate")
_CASE_KEYS = {"name", "input", "hl7", "fhir", "expect"}
_EXPECT_KEYS = {"ack", "status", "fhir", "golden", "hl7"}
FHIR_SUFFIXES = (".json", ".yaml", ".yml")
NOTHING = "nothing"
MASK = "*"  # what MSH-7 and MSH-10 read as in an HL7 golden file


# -- the test file -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Expect:
    ack: tuple[str, ...] | str | None = None  # one code for every message, or one per message
    status: tuple[str, ...] | str | None = None
    fhir: tuple[str, ...] = ()
    golden: Path | None = None
    # per message: None (not checked), {} (nothing sent) or {HL7 path: expected value} of the message sent
    hl7: tuple[dict[str, str] | None, ...] | None = None


@dataclass(frozen=True)
class Case:
    name: str
    messages: tuple[tuple[str, bytes], ...]  # (label, raw message)
    expect: Expect


@dataclass(frozen=True)
class TestFile:
    file: Path
    channel: str
    cases: tuple[Case, ...]


def test_file_of(channel: ChannelConfig) -> Path:
    """``channels/allscripts.yaml`` → ``channels/allscripts_test.yaml``."""
    f = Path(channel.file)
    return f.with_name(f.stem + TEST_SUFFIX)


def _err(file: Path, key: str, what: str, hint: str = "") -> ConfigError:
    return ConfigError(what, file=str(file), key=key, hint=hint or "see docs/testing-channels.md")


def _codes(
    value: Any, file: Path, key: str, allowed: Sequence[str] | None = None
) -> tuple[str, ...] | str | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise _err(file, key, "must be a code or a list of codes, one per message")
    if allowed is not None:
        for v in items:
            if v not in allowed:
                raise _err(file, key, f"unknown status {v!r}", f"use one of: {', '.join(allowed)}")
    return value if isinstance(value, str) else tuple(items)


def load_test_file(path: Path, base_dir: Path) -> TestFile:
    """Read and check a ``*_test.yaml`` file; a ``ConfigError`` says which key is wrong and how to fix it."""
    from engine.cli import split_messages

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _err(path, "", f"cannot read the test file: {exc.strerror}", "check the path") from exc
    except yaml.YAMLError as exc:
        raise _err(path, "", f"not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise _err(path, "", "a test file is a mapping with `channel:` and `cases:`")
    unknown = set(data) - {"channel", "cases"}
    if unknown:
        raise _err(path, sorted(unknown)[0], "unknown key", "a test file has `channel:` and `cases:`")
    channel = data.get("channel")
    if not isinstance(channel, str) or not channel:
        raise _err(path, "channel", "the channel this file tests is missing")
    raw_cases = data.get("cases")
    if not isinstance(raw_cases, list) or not raw_cases:
        raise _err(path, "cases", "a list of cases is needed")
    cases: list[Case] = []
    names: set[str] = set()
    for n, rc in enumerate(raw_cases):
        key = f"cases[{n}]"
        if not isinstance(rc, dict):
            raise _err(path, key, "a case is a mapping with name, input (or hl7) and expect")
        bad = set(rc) - _CASE_KEYS
        if bad:
            raise _err(
                path, f"{key}.{sorted(bad)[0]}", "unknown key", f"a case has: {', '.join(sorted(_CASE_KEYS))}"
            )
        name = rc.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _err(path, f"{key}.name", "every case needs a name")
        if name in names:
            raise _err(path, f"{key}.name", f"two cases are named {name!r}", "give each case its own name")
        names.add(name)
        messages: list[tuple[str, bytes]] = []
        inputs = rc.get("input") or []
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list):
            raise _err(path, f"{key}.input", "a file name or a list of file names")
        for item in inputs:
            if isinstance(item, dict) and set(item) == {"hl7"}:
                messages.extend(_inline(str(item["hl7"]), "inline", split_messages))
                continue
            if not isinstance(item, str):
                raise _err(path, f"{key}.input", "each input is a file name (or `{hl7: ...}` inline)")
            f = _resolve(item, path.parent, base_dir)
            if f is None:
                raise _err(
                    path, f"{key}.input", f"file {item!r} not found", f"paths are relative to {path.parent}"
                )
            if f.suffix.lower() in FHIR_SUFFIXES:
                messages.extend(_fhir_file(f, item, path, f"{key}.input"))
                continue
            for i, raw in enumerate(split_messages(f.read_bytes()), 1):
                messages.append((f"{item}#{i}", raw))
        if rc.get("hl7") is not None:
            messages.extend(_inline(str(rc["hl7"]), "inline", split_messages))
        fhir_items = rc.get("fhir") or []
        if not isinstance(fhir_items, list):
            fhir_items = [fhir_items]
        for i, item in enumerate(fhir_items, 1):
            where = f"{key}.fhir[{i - 1}]"
            if isinstance(item, str):
                f = _resolve(item, path.parent, base_dir)
                if f is None:
                    raise _err(
                        path, where, f"file {item!r} not found", f"paths are relative to {path.parent}"
                    )
                messages.extend(_fhir_file(f, item, path, where))
            elif isinstance(item, dict):
                messages.extend(_fhir_items(item, f"fhir#{i}", path, where))
            else:
                raise _err(
                    path, where, "each item is a FHIR resource (a mapping) or a file name (.json/.yaml)"
                )
        if not messages:
            raise _err(
                path,
                f"{key}.input",
                "the case sends no message",
                "give `input:` files, inline `hl7:` messages or `fhir:` resources",
            )
        ex = rc.get("expect") or {}
        if not isinstance(ex, dict):
            raise _err(path, f"{key}.expect", "a mapping with ack, status, fhir and/or golden")
        bad = set(ex) - _EXPECT_KEYS
        if bad:
            raise _err(
                path,
                f"{key}.expect.{sorted(bad)[0]}",
                "unknown key",
                f"expect has: {', '.join(sorted(_EXPECT_KEYS))}",
            )
        fhir = ex.get("fhir") or []
        if isinstance(fhir, str):
            fhir = [fhir]
        if not isinstance(fhir, list) or not all(isinstance(x, str) for x in fhir):
            raise _err(path, f"{key}.expect.fhir", "a list of FHIRPath expressions (strings)")
        golden = ex.get("golden")
        if golden is not None and not isinstance(golden, str):
            raise _err(
                path, f"{key}.expect.golden", "a file name (.json: the FHIR state; .hl7: the HL7 sent)"
            )
        expect = Expect(
            ack=_codes(ex.get("ack"), path, f"{key}.expect.ack"),
            status=_codes(ex.get("status"), path, f"{key}.expect.status", STATUSES),
            fhir=tuple(fhir),
            golden=(path.parent / golden) if golden else None,
            hl7=_hl7_expect(ex.get("hl7"), len(messages), path, f"{key}.expect.hl7"),
        )
        if expect.ack is not None and any(resources.is_fhir(raw) for _, raw in messages):
            raise _err(
                path,
                f"{key}.expect.ack",
                "a FHIR resource is not acknowledged (the source stores it; there is no ACK)",
                "check `status:` (and `hl7:`, what was sent) instead",
            )
        for what, value in (("ack", expect.ack), ("status", expect.status)):
            if isinstance(value, tuple) and len(value) != len(messages):
                raise _err(
                    path,
                    f"{key}.expect.{what}",
                    f"{len(value)} codes for {len(messages)} messages",
                    "give one code for all, or one per message",
                )
        cases.append(Case(name, tuple(messages), expect))
    return TestFile(path, channel, tuple(cases))


def _fhir_items(body: Any, label: str, path: Path, key: str) -> list[tuple[str, bytes]]:
    """A resource, a Bundle or a subscription notification → one message per resource (as the http source
    takes them: engine/sources/http.py), each the JSON the source would store."""
    from engine.sources.http import Refused, Unfilled, resources_of

    try:
        found = resources_of(body, ())
    except Unfilled as exc:  # a test file's Bundle: only the resources it carries (nothing is read)
        found = exc.found
    except Refused as exc:
        raise _err(path, key, exc.text, "write each resource as the FHIR server holds it") from None
    if len(found) == 1:
        return [(label, orjson.dumps(found[0]))]
    return [(f"{label}.{i}", orjson.dumps(r)) for i, r in enumerate(found, 1)]


def _fhir_file(f: Path, name: str, path: Path, key: str) -> list[tuple[str, bytes]]:
    """A ``.json`` or ``.yaml`` file holding a FHIR resource (or a Bundle, or a YAML list of resources)."""
    text = f.read_text(encoding="utf-8")
    try:
        body = json.loads(text) if f.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise _err(path, key, f"{name} is not valid {f.suffix[1:].upper()}: {exc}") from None
    bodies = body if isinstance(body, list) else [body]
    out: list[tuple[str, bytes]] = []
    for i, b in enumerate(bodies, 1):
        out.extend(_fhir_items(b, name if len(bodies) == 1 else f"{name}#{i}", path, key))
    return out


def _hl7_expect(value: Any, count: int, path: Path, key: str) -> tuple[dict[str, str] | None, ...] | None:
    """``expect.hl7``: one item per message, ``nothing``, a message type (``SIU^S12``) or field: value pairs."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise _err(
            path, key, "a list with one item per message: `nothing`, a message type or field: value pairs"
        )
    if len(value) != count:
        raise _err(
            path, key, f"{len(value)} items for {count} messages", "give one item per message, in order"
        )
    out: list[dict[str, str] | None] = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if item is None or item == NOTHING:
            out.append({})
            continue
        if isinstance(item, str):
            item = {"MSH-9": item}
        if not isinstance(item, dict) or not item:
            raise _err(
                path, where, "`nothing`, a message type such as SIU^S12, or a mapping of HL7 field: value"
            )
        checks: dict[str, str] = {}
        for field_path, want in item.items():
            try:
                parse_path(str(field_path))
            except ValueError as exc:
                raise _err(path, f"{where}.{field_path}", str(exc)) from None
            if isinstance(want, bool) or not isinstance(want, str | int | float):
                raise _err(path, f"{where}.{field_path}", "the expected value is text (quote it)")
            checks[str(field_path)] = str(want)
        out.append(checks)
    return tuple(out)


def _inline(text: str, label: str, split: Any) -> list[tuple[str, bytes]]:
    raws: list[bytes] = split(text.encode("utf-8"))
    return [(f"{label}#{i}", raw) for i, raw in enumerate(raws, 1)]


def _resolve(name: str, *folders: Path) -> Path | None:
    for folder in folders:
        p = folder / name
        if p.is_file():
            return p
    return None


# -- running -------------------------------------------------------------------------------------
@dataclass
class MessageOutcome:
    label: str
    status: str
    ack: str
    reason: str = ""
    sent: bytes | None = None  # the HL7 v2 message the channel sent for it (write-back, HL7 routes)
    fhir: bool = False  # the input was a FHIR resource

    @property
    def sent_type(self) -> str:
        """``SIU^S12`` of the HL7 message sent, ``nothing`` when none was (only said for FHIR inputs or HL7
        output)."""
        if self.sent is None:
            return NOTHING if self.fhir else ""
        return "^".join(parse_bytes(self.sent)["MSH-9"].split("^")[:2])


@dataclass
class CaseResult:
    case: Case
    outcomes: list[MessageOutcome] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    state: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    updated: bool = False

    @property
    def ok(self) -> bool:
        return not self.failures


class _Ranks:
    """The store's resource status ranks, in memory (engine.store.RankView's rules)."""

    def __init__(self) -> None:
        self.known: dict[str, int] = {}

    def get(self, keys: Sequence[str]) -> dict[str, int]:
        return {k: self.known[k] for k in keys if k in self.known}

    def set(self, ranks: dict[str, int]) -> None:
        for key, rank in ranks.items():
            if rank > self.known.get(key, -1):
                self.known[key] = rank


class Runner:
    """Runs one channel's cases through its compiled pipeline (as ``sluice convert --channel`` does)."""

    def __init__(self, config: Config, channel: ChannelConfig):
        self.channel = channel
        self.runtime = ChannelRuntime(config, channel, store=None)

    def run_case(self, case: Case, update: bool = False) -> CaseResult:
        result = CaseResult(case)
        target = FhirTarget()
        ranks = _Ranks()
        seen: dict[str, tuple[str, str]] = {}  # dedupe key -> (content hash, ack code)
        intake = Intake(self.channel, cast(Committer, None))  # decide() never touches the committer
        db = _case_store()  # the record step's write-back state (engine/writeback.py), empty per case
        try:
            for n, (label, raw) in enumerate(case.messages, 1):
                with db.begin() as conn:
                    if resources.is_fhir(raw):
                        result.outcomes.extend(
                            self._resource(conn, n, label, raw, target, ranks, seen, result)
                        )
                    else:
                        result.outcomes.extend(
                            self._one(conn, intake, n, label, raw, target, ranks, seen, result)
                        )
        finally:
            db.dispose()
        self._check(result, target, update)
        return result

    def _resource(
        self,
        conn: Any,
        n: int,
        label: str,
        raw: bytes,
        target: FhirTarget,
        ranks: _Ranks,
        seen: dict[str, tuple[str, str]],
        result: CaseResult,
    ) -> Iterator[MessageOutcome]:
        """A FHIR resource taken by the channel's fhir-poll or http source: stored as the source stores it
        (one row per resource version, dedupe by id and meta.versionId), then processed and recorded."""
        resource = orjson.loads(raw)
        src = self.channel.source
        if src.kind == "mllp":
            yield MessageOutcome(
                label,
                "rejected",
                "",
                "an mllp source takes HL7 v2 only; FHIR resources come in through a fhir-poll or http source",
                fhir=True,
            )
            return
        kinds = src.poll if src.poll is not None else src.http
        allowed: tuple[str, ...] = kinds.resources if kinds is not None else ()
        rtype = str(resource.get("resourceType") or "")
        if allowed and rtype not in allowed:
            yield MessageOutcome(
                label,
                "rejected",
                "",
                f"the channel's {src.kind} source takes {', '.join(allowed)}, not {rtype[:40]} (nothing is stored)",
                fhir=True,
            )
            return
        row = resources.message_row(
            self.channel.name,
            resource,
            raw,
            source=src.kind,
            facility="sluice-test",
            received_at=0.0,
            order_by=self.channel.order_by,
        )
        if row.dedupe_key in seen:
            yield MessageOutcome(
                label,
                "duplicate",
                "",
                "this resource version (id and meta.versionId) was taken before: the source stores it once",
                fhir=True,
            )
            return
        seen[row.dedupe_key] = (row.content_hash, "")
        yield self._process(conn, n, label, row.raw, "", target, ranks, result, fhir=True)

    def _one(
        self,
        conn: Any,
        intake: Intake,
        n: int,
        label: str,
        raw: bytes,
        target: FhirTarget,
        ranks: _Ranks,
        seen: dict[str, tuple[str, str]],
        result: CaseResult,
    ) -> Iterator[MessageOutcome]:
        jobs, immediate = intake.decide(raw, "sluice test")
        if not jobs:
            from engine.client import parse_ack
            from engine.intake import split_acks

            acks = [parse_ack(a) for a in split_acks(immediate)]
            code = "/".join(a.code for a in acks) or "-"
            reason = "; ".join(f"{a.error_code} {a.text}".strip() for a in acks)
            yield MessageOutcome(label, "rejected", code, f"{reason} (nothing is stored)".lstrip())
            return
        for k, job in enumerate(jobs, 1):
            where = label if len(jobs) == 1 else f"{label} (batch message {k})"
            row = job.row
            if row.status != RECEIVED:
                yield MessageOutcome(where, row.status, row.ack_code, row.reason)
                continue
            if row.dedupe_key:
                prior = seen.get(row.dedupe_key)
                if prior is not None and prior[0] == row.content_hash:
                    yield MessageOutcome(where, "duplicate", prior[1], "same bytes as an earlier message")
                    continue
                if prior is not None and self.channel.dedupe.on_conflict == "reject":
                    yield MessageOutcome(
                        where, "quarantined", "AE", "control id (MSH-10) already received with other content"
                    )
                    continue
            outcome = self._process(conn, n, where, row.raw, row.ack_code, target, ranks, result, job.message)
            if row.dedupe_key:
                seen[row.dedupe_key] = (row.content_hash, outcome.ack)
            yield outcome

    def _process(
        self,
        conn: Any,
        n: int,
        where: str,
        raw: bytes,
        ack: str,
        target: FhirTarget,
        ranks: _Ranks,
        result: CaseResult,
        message: Any = None,
        *,
        fhir: bool = False,
    ) -> MessageOutcome:
        """The compiled pipeline, then the record step (guards, required records, write-back decision,
        routes) in the case's store transaction: what a processing worker and the committer do."""
        prepared = self.runtime.run_raw(n, raw)
        recorded = self.runtime.record(conn, prepared, view=ranks)
        if message is not None and self.channel.ack == "after-processing":
            err = recorded.error
            decided = ackmod.ACCEPTED if err is None else ackmod.Outcome(err.ack_code, err)
            ack = render_ack(message, decided)[1]
        sent = None
        if recorded.status == PROCESSED:
            ranks.set(recorded.ranks)
            out = prepared.output
            if out is not None and (recorded.deliveries or not self.runtime.routes):
                self._apply(out.payload, out.content_type, where, target, result)
            sent = next((d.payload for d in recorded.deliveries if d.content_type == CONTENT_HL7), None)
        reason = recorded.reason
        if recorded.status == ERROR and isinstance(recorded.error, SluiceError):
            reason = f"{recorded.error.hl7_error}: {reason}"
        return MessageOutcome(where, recorded.status, ack, reason, sent=sent, fhir=fhir)

    @staticmethod
    def _apply(payload: bytes, content_type: str, where: str, target: FhirTarget, result: CaseResult) -> None:
        if "json" not in content_type:
            return  # HL7 or other output: no FHIR state (fhir assertions then find nothing)
        try:
            bundle = orjson.loads(payload)
            if isinstance(bundle, dict) and bundle.get("resourceType") == "Bundle":
                target.apply(bundle)
        except (orjson.JSONDecodeError, TargetError) as exc:
            result.failures.append(f"{where}: the FHIR target refused the output: {exc}")

    # -- expectations -----------------------------------------------------------------------------
    def _check(self, result: CaseResult, target: FhirTarget, update: bool) -> None:
        ex = result.case.expect
        for what, expected in (("status", ex.status), ("ack", ex.ack)):
            if expected is None:
                continue
            for i, o in enumerate(result.outcomes):
                want = expected if isinstance(expected, str) else expected[i] if i < len(expected) else "?"
                got = getattr(o, what)
                if got != want:
                    why = f"\n    reason:   {o.reason}" if o.reason else ""
                    result.failures.append(
                        f"{what} of message {i + 1} ({o.label})\n    expected: {want}\n    got:      {got}{why}"
                    )
        result.state = final_state(target)
        held = list(target.all())
        for expr in ex.fhir:
            ok, got = evaluate(expr, held)
            if not ok:
                result.failures.append(f"fhir: {expr}\n    expected: true\n    got:      {got}")
        if ex.hl7 is not None:
            for i, (o, checks) in enumerate(zip(result.outcomes, ex.hl7, strict=False), 1):
                if checks is not None:
                    result.failures.extend(_hl7_failures(i, o, checks))
        if ex.golden is not None:
            if ex.golden.suffix.lower() == ".hl7":
                self._golden(result, ex.golden, update, sent_text(result.outcomes))
            else:
                self._golden(result, ex.golden, update)

    @staticmethod
    def _golden(result: CaseResult, golden: Path, update: bool, text: str | None = None) -> None:
        if text is None:
            text = json.dumps(result.state, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        what = "the HL7 sent" if golden.suffix.lower() == ".hl7" else "the final state"
        if update:
            if not golden.exists() or golden.read_text(encoding="utf-8") != text:
                golden.parent.mkdir(parents=True, exist_ok=True)
                golden.write_text(text, encoding="utf-8")
                result.updated = True
            return
        if not golden.exists():
            result.failures.append(
                f"golden: {_shown(golden)} does not exist (run `sluice test --update` to write it)"
            )
            return
        expected = golden.read_text(encoding="utf-8")
        if expected != text:
            diff = difflib.unified_diff(
                expected.splitlines(),
                text.splitlines(),
                f"expected ({_shown(golden)})",
                "got",
                lineterm="",
                n=2,
            )
            lines = list(diff)
            shown = lines[:80] + ([f"... {len(lines) - 80} more diff lines"] if len(lines) > 80 else [])
            result.failures.append(
                f"golden: {what} differs (`sluice test --update` accepts it)\n    " + "\n    ".join(shown)
            )


def _shown(path: Path) -> str:
    """A path as the analyst typed it: relative to the current folder when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _case_store() -> Any:
    """An in-memory store holding the write-back tables (engine/store/tables.py), for one case."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import StaticPool

    from engine.store import SETTINGS, WRITEBACK, WRITEBACK_LOG, Base

    engine = create_engine("sqlite://", poolclass=StaticPool)
    Base.metadata.create_all(engine, tables=[SETTINGS, WRITEBACK, WRITEBACK_LOG])
    return engine


def field_matches(got: str, want: str) -> bool:
    """An expected value matches the field when equal, or when it gives fewer components and those are the
    field's first ones (``SIU^S12`` matches ``SIU^S12^SIU_S12``; ``PA-1`` does not match ``PA-10^SLUICE``)."""
    if got == want:
        return True
    wanted = want.split("^")
    return got.split("^")[: len(wanted)] == wanted


def _hl7_failures(i: int, o: MessageOutcome, want: dict[str, str]) -> list[str]:
    head = f"hl7 of message {i} ({o.label})"
    why = f"\n    reason:   {o.reason}" if o.reason else ""
    if not want:
        if o.sent is None:
            return []
        return [f"{head}\n    expected: nothing sent\n    got:      {o.sent_type}"]
    if o.sent is None:
        shown = ", ".join(f"{k}: {v}" for k, v in want.items())
        return [f"{head}\n    expected: {shown}\n    got:      nothing sent ({o.status}){why}"]
    msg = parse_bytes(o.sent)
    out: list[str] = []
    for path, value in want.items():
        got = msg[path]
        if not field_matches(got, value):
            out.append(f"{head}: {path}\n    expected: {value}\n    got:      {got or '(empty)'}")
    return out


def masked(payload: bytes) -> str:
    """An HL7 message as a golden file holds it: a segment a line, MSH-7 and MSH-10 masked (they change with
    the time and the content digest, not with what the test checks)."""
    lines = (
        payload.decode("utf-8", "replace").replace("\r\n", "\r").replace("\n", "\r").strip("\r").split("\r")
    )
    out = []
    for line in lines:
        if line.startswith("MSH"):
            fields = line.split(line[3:4] or "|")
            for at in (6, 9):  # fields[0] is "MSH", fields[1] MSH-2: fields[n] is MSH-(n + 1)
                if at < len(fields) and fields[at]:
                    fields[at] = MASK
            line = (line[3:4] or "|").join(fields)
        out.append(line)
    return "\n".join(out)


def sent_text(outcomes: Sequence[MessageOutcome]) -> str:
    """Every HL7 message a case sent, in order, masked, a blank line between them (an HL7 golden file)."""
    return "\n\n".join(masked(o.sent) for o in outcomes if o.sent is not None) + "\n"


def final_state(target: FhirTarget) -> dict[str, list[dict[str, Any]]]:
    """The target's resources by type (types sorted, resources in id order): what a golden file holds."""
    out: dict[str, list[dict[str, Any]]] = {}
    for rtype in sorted(target.resources):
        by_id = target.resources[rtype]
        out[rtype] = [by_id[k] for k in sorted(by_id, key=lambda i: (len(i), i))]
    return out


def evaluate(expression: str, resources: list[dict[str, Any]]) -> tuple[bool, Any]:
    """A FHIRPath expression over every resource the target holds: (it gave exactly ``true``, what it gave).

    The resources are the root collection, so ``Patient.count() = 1`` and
    ``Encounter.where(identifier.value = 'V100').status = 'finished'`` read naturally."""
    from fhirpathpy import evaluate as fp_evaluate
    from fhirpathpy.models import models

    try:
        # the R4 model: choice elements read as in the specification (Observation.value, not valueQuantity)
        got = fp_evaluate(resources, expression, {}, models["r4"])
    except Exception as exc:  # fhirpathpy raises plain exceptions for a syntax error or a bad function
        return False, f"the expression cannot be evaluated: {type(exc).__name__}: {exc}"
    return got == [True], got


# -- discovery -----------------------------------------------------------------------------------
def stray_test_files(config: Config) -> list[Path]:
    """``*_test.yaml`` files in the channels' folders that are no channel's test file: ``sluice test`` runs
    ``<channel file>_test.yaml`` only, so a test file named otherwise would never run without a word."""
    wanted = {test_file_of(ch).resolve() for ch in config.channels}
    folders = {Path(ch.file).resolve().parent for ch in config.channels}
    return sorted(f for d in folders for f in d.glob("*" + TEST_SUFFIX) if f.resolve() not in wanted)


def stray_reason(path: Path, config: Config) -> str:
    """What ``sluice test`` says about a stray test file, and what to do."""
    names = ", ".join(f"{Path(ch.file).stem}{TEST_SUFFIX}" for ch in config.channels)
    return (
        f"{path}: is no channel's test file, so its cases never run: a test file is named after the channel file it sits beside "
        f"(channels/allscripts.yaml → channels/allscripts_test.yaml); rename it, or move its cases into "
        f"the channel's test file ({names})"
    )


def discover(config: Config, names: Sequence[str]) -> list[tuple[ChannelConfig, Path]]:
    """The (channel, test file) pairs to run: every channel with a test file, or the named ones (which must
    have one)."""
    pairs: list[tuple[ChannelConfig, Path]] = []
    chans = [config.channel(n) for n in names] if names else list(config.channels)
    for ch in chans:
        tf = test_file_of(ch)
        if tf.exists():
            pairs.append((ch, tf))
        elif names:
            raise ConfigError(
                f"channel {ch.name!r} has no test file",
                file=str(tf),
                hint="write one: see docs/testing-channels.md",
            )
    return pairs
