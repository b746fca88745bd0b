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
from engine.errors import ConfigError, SluiceError
from engine.fhirtarget import FhirTarget, TargetError
from engine.intake import Committer, Intake, render_ack
from engine.processing import ChannelRuntime
from engine.store import ERROR, PROCESSED, RECEIVED

TEST_SUFFIX = "_test.yaml"
STATUSES = ("processed", "filtered", "error", "review", "rejected", "quarantined", "ignored", "duplicate")
_CASE_KEYS = {"name", "input", "hl7", "expect"}
_EXPECT_KEYS = {"ack", "status", "fhir", "golden"}


# -- the test file -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Expect:
    ack: tuple[str, ...] | str | None = None  # one code for every message, or one per message
    status: tuple[str, ...] | str | None = None
    fhir: tuple[str, ...] = ()
    golden: Path | None = None


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
            for i, raw in enumerate(split_messages(f.read_bytes()), 1):
                messages.append((f"{item}#{i}", raw))
        if rc.get("hl7") is not None:
            messages.extend(_inline(str(rc["hl7"]), "inline", split_messages))
        if not messages:
            raise _err(
                path, f"{key}.input", "the case sends no message", "give `input:` files or inline `hl7:`"
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
            raise _err(path, f"{key}.expect.golden", "a file name (JSON)")
        expect = Expect(
            ack=_codes(ex.get("ack"), path, f"{key}.expect.ack"),
            status=_codes(ex.get("status"), path, f"{key}.expect.status", STATUSES),
            fhir=tuple(fhir),
            golden=(path.parent / golden) if golden else None,
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
        for n, (label, raw) in enumerate(case.messages, 1):
            result.outcomes.extend(self._one(intake, n, label, raw, target, ranks, seen, result))
        self._check(result, target, update)
        return result

    def _one(
        self,
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
            prepared = self.runtime.run_raw(n, row.raw)
            recorded = self.runtime.record(None, prepared, view=ranks)
            ack = row.ack_code
            if self.channel.ack == "after-processing":
                err = recorded.error
                outcome = ackmod.ACCEPTED if err is None else ackmod.Outcome(err.ack_code, err)
                ack = render_ack(job.message, outcome)[1]
            if row.dedupe_key:
                seen[row.dedupe_key] = (row.content_hash, ack)
            if recorded.status == PROCESSED:
                ranks.set(recorded.ranks)
                out = prepared.output
                if out is not None and (recorded.deliveries or not self.runtime.routes):
                    self._apply(out.payload, out.content_type, where, target, result)
            reason = recorded.reason
            if recorded.status == ERROR and isinstance(recorded.error, SluiceError):
                reason = f"{recorded.error.hl7_error}: {reason}"
            yield MessageOutcome(where, recorded.status, ack, reason)

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
        resources = list(target.all())
        for expr in ex.fhir:
            ok, got = evaluate(expr, resources)
            if not ok:
                result.failures.append(f"fhir: {expr}\n    expected: true\n    got:      {got}")
        if ex.golden is not None:
            self._golden(result, ex.golden, update)

    @staticmethod
    def _golden(result: CaseResult, golden: Path, update: bool) -> None:
        text = json.dumps(result.state, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
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
                "golden: the final state differs (`sluice test --update` accepts it)\n    "
                + "\n    ".join(shown)
            )


def _shown(path: Path) -> str:
    """A path as the analyst typed it: relative to the current folder when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


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
