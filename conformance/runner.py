"""The conformance runner: convert every HL7 v2 file under a directory, validate, score.

``sluice conformance DIR [--report out.md] [--diffs]`` (or ``python -m conformance.runner DIR``).

Every message ends in exactly one outcome:

``valid``        converted, and every resource is valid FHIR R4 (fhir.resources R4B models plus
                 the Bundle rules checked in :func:`validate_bundle`);
``INVALID``      converted, but the Bundle is not valid FHIR: a failure;
``unsupported``  ``MessageRejected`` with HL7 error 200/201 (message type or trigger not converted):
                 counted, not a failure;
``error``        a ``SluiceError`` with a location (bad content, said where): acceptable, listed;
``UNLOCATED``    a ``SluiceError`` without a location: a failure (the target is "valid FHIR or a
                 *located* error");
``CRASH``        any other exception, including the converter's "internal conversion error"
                 (AR 207, InternalConversionError) wrapping one: a failure.

Where ``<dir>/expected/<stem>-expected.json`` sits next to a single-message file (the layout of
Microsoft FHIR-Converter's samples), the Bundle is scored field by field with
:mod:`conformance.score`.  ``main`` exits 1 on any failure, 2 on a usage error, else 0.

Messages are converted as a channel with the shipped defaults converts them: bytes that are UTF-8 under a
single-byte MSH-18 are decoded as UTF-8 (``source.utf8_fallback``), and a bad value in a field that is
not a key is dropped (``strictness: lenient``).  What that changed or dropped is the message's located
warnings (kind and text, never values): counted per message and per kind, listed in the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from conformance.score import CATEGORIES, RULES, Score, score_bundles
from engine.errors import SluiceError
from engine.hl7 import Message, decode_warning, parse_bytes

if TYPE_CHECKING:
    from transforms.bundle import Conversion
    from transforms.settings import ConvertSettings

ConvertFn = Callable[[Message, "ConvertSettings"], "dict[str, Any] | Conversion"]
"""A converter: the Bundle, or a :class:`transforms.bundle.Conversion` (the Bundle with its warnings)."""

HL7_EXTENSIONS = frozenset({".hl7", ".hl7v2", ".er7"})
"""Always treated as HL7 (a file that is not HL7 gives a located parse error)."""
SNIFFED_EXTENSIONS = frozenset({".txt"})
"""Treated as HL7 when the content starts with MSH/FHS/BHS (LICENSE.txt and notes are skipped)."""
HEADERS = (b"MSH", b"FHS", b"BHS")
BATCH_SEGMENTS = (b"FHS", b"BHS", b"BTS", b"FTS")
BOM = b"\xef\xbb\xbf"
UNSUPPORTED_CODES = frozenset({"200", "201"})
MAX_FILE_BYTES = 20 * 1024 * 1024

OUTCOMES = ("valid", "INVALID", "unsupported", "error", "UNLOCATED", "CRASH")
FAILURES = frozenset({"INVALID", "UNLOCATED", "CRASH"})


@dataclass
class MessageResult:
    file: str  # relative to the corpus directory
    index: int  # 1-based position of the message in its file
    count: int  # messages in the file
    message_type: str = ""
    outcome: str = ""
    detail: str = ""
    location: str = ""
    problems: list[str] = field(default_factory=list)  # validation problems / traceback lines
    score: Score | None = None
    expected: str = ""  # expected bundle used for scoring (relative path)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (kind, located text), never values

    @property
    def name(self) -> str:
        return self.file if self.count == 1 else f"{self.file}#{self.index}"


@dataclass
class Summary:
    corpus: str
    results: list[MessageResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    total: Score = field(default_factory=Score)

    @property
    def counts(self) -> Counter[str]:
        return Counter(r.outcome for r in self.results)

    @property
    def failures(self) -> list[MessageResult]:
        return [r for r in self.results if r.outcome in FAILURES]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def scored_files(self) -> int:
        return sum(1 for r in self.results if r.score is not None)

    @property
    def warning_kinds(self) -> Counter[str]:
        """Warnings of the converted messages, by kind."""
        return Counter(kind for r in self.results for kind, _text in r.warnings)


# ----------------------------------------------------------------------------- finding and splitting
def sniff_hl7(head: bytes) -> bool:
    """Does the content start (after an optional BOM, whitespace or MLLP start byte) with a header?"""
    if head.startswith(BOM):
        head = head[len(BOM) :]
    return head.lstrip(b" \t\r\n\x0b").startswith(HEADERS)


def find_files(corpus: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """HL7 files under ``corpus`` (sorted) and the candidates skipped with a reason."""
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    paths = [corpus] if corpus.is_file() else sorted(p for p in corpus.rglob("*") if p.is_file())
    for p in paths:
        suffix = p.suffix.lower()
        try:
            with p.open("rb") as fh:
                head = fh.read(64)
        except OSError as exc:
            if suffix in HL7_EXTENSIONS | SNIFFED_EXTENSIONS:
                skipped.append((p, f"cannot read: {exc.strerror or exc}"))
            continue
        if suffix in HL7_EXTENSIONS or sniff_hl7(head):
            files.append(p)
        elif suffix in SNIFFED_EXTENSIONS:
            skipped.append((p, "not HL7 (does not start with MSH/FHS/BHS)"))
    return files, skipped


def split_messages(raw: bytes) -> list[bytes]:
    """Split a file into messages: each MSH starts one; blank lines and FHS/BHS/BTS/FTS are dropped.

    Handles a UTF-8 BOM, MLLP framing bytes and CR, LF or CRLF segment terminators.  Content
    before the first MSH that is not a batch envelope becomes a message of its own, so that a
    garbage file yields a (located) parse error rather than nothing.
    """
    if raw.startswith(BOM):
        raw = raw[len(BOM) :]
    raw = raw.replace(b"\x0b", b"").replace(b"\x1c", b"")
    raw = raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    messages: list[list[bytes]] = []
    current: list[bytes] | None = None
    for line in raw.split(b"\r"):
        if not line.strip():
            continue
        if line.startswith(BOM):
            line = line[len(BOM) :]
        if line.startswith(b"MSH"):
            current = [line]
            messages.append(current)
        elif line[:3] in BATCH_SEGMENTS and len(line) > 3 and not line[3:4].isalnum():
            current = None
        elif current is not None:
            current.append(line)
        else:
            current = [line]
            messages.append(current)
    return [b"\r".join(m) + b"\r" for m in messages]


# ----------------------------------------------------------------------------- validation
def _empty_problems(obj: Any, path: str, out: list[str]) -> None:
    """FHIR JSON forbids null, empty strings, empty arrays and empty objects."""
    if obj is None:
        out.append(f"{path}: null value")
    elif isinstance(obj, str):
        if not obj.strip():
            out.append(f"{path}: empty or blank string")
    elif isinstance(obj, list):
        if not obj:
            out.append(f"{path}: empty array")
        for i, x in enumerate(obj):
            _empty_problems(x, f"{path}[{i}]", out)
    elif isinstance(obj, dict):
        if not obj:
            out.append(f"{path}: empty object")
        for k, v in obj.items():
            _empty_problems(v, f"{path}.{k}" if path else str(k), out)


def _model_errors(exc: Exception) -> list[str]:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            return [
                ".".join(str(p) for p in e.get("loc", ()))
                + ": "
                + str(e.get("msg", e.get("type", "invalid")))
                for e in errors()
            ]
        except Exception:  # pragma: no cover - defensive
            pass
    return [f"{type(exc).__name__}: {exc}"]


def _references(obj: Any, out: list[str]) -> None:
    if isinstance(obj, list):
        for x in obj:
            _references(x, out)
    elif isinstance(obj, dict):
        ref = obj.get("reference")
        if isinstance(ref, str):
            out.append(ref)
        for v in obj.values():
            if isinstance(v, dict | list):
                _references(v, out)


def _periods_backwards(obj: Any, path: str, out: list[str]) -> None:
    """FHIR invariant per-1 (the models do not check it): a Period's end is not before its start."""
    from transforms.datatypes import ends_before_start

    if isinstance(obj, dict):
        start, end = obj.get("start"), obj.get("end")
        if isinstance(start, str) and isinstance(end, str) and ends_before_start(start, end):
            out.append(f"{path}: period ends before it starts (per-1)")
        for k, v in obj.items():
            if isinstance(v, dict | list):
                _periods_backwards(v, f"{path}.{k}", out)
    elif isinstance(obj, list):
        for i, x in enumerate(obj):
            _periods_backwards(x, f"{path}[{i}]", out)


def validate_bundle(bundle: Any) -> list[str]:
    """Every problem that makes ``bundle`` invalid FHIR R4 (an empty list means valid).

    fhir.resources R4B models for the Bundle and each resource (7.x: pydantic-v1 ``parse_obj``;
    ``model_validate`` on newer versions), plus rules the models do not check: no empty values,
    transaction/batch entries carry ``request.method``/``request.url``, unique ``fullUrl``\\ s,
    every ``urn:uuid:`` reference resolving to an entry of the Bundle and no period ending before it starts
    (per-1).
    """
    from fhir.resources.R4B import get_fhir_model_class

    problems: list[str] = []
    if not isinstance(bundle, dict):
        return [f"converter returned {type(bundle).__name__}, not a Bundle object"]
    if bundle.get("resourceType") != "Bundle":
        return [f"resourceType is {bundle.get('resourceType')!r}, not 'Bundle'"]
    _empty_problems(bundle, "", problems)

    def check(model: Any, data: dict[str, Any], where: str) -> None:
        validate = getattr(model, "model_validate", None) or model.parse_obj
        try:
            validate(data)
        except Exception as exc:
            problems.extend(f"{where}: {e}" for e in _model_errors(exc))

    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        return [*problems, "Bundle.entry is not an array"]
    shell = {
        **bundle,
        "entry": [{k: v for k, v in e.items() if k != "resource"} for e in entries if isinstance(e, dict)],
    }
    check(get_fhir_model_class("Bundle"), shell, "Bundle")
    full_urls: Counter[str] = Counter()
    for n, entry in enumerate(entries):
        where = f"entry[{n}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: not an object")
            continue
        if isinstance(entry.get("fullUrl"), str):
            full_urls[entry["fullUrl"]] += 1
        if bundle.get("type") in ("transaction", "batch"):
            req = entry.get("request")
            if not isinstance(req, dict) or not req.get("method") or not req.get("url"):
                problems.append(f"{where}: {bundle.get('type')} entry without request.method/url (bdl-3)")
        res = entry.get("resource")
        if res is None:
            if not (isinstance(entry.get("request"), dict) and entry["request"].get("method") == "DELETE"):
                problems.append(f"{where}: no resource")
            continue
        if not isinstance(res, dict):
            problems.append(f"{where}.resource: not an object")
            continue
        rtype = str(res.get("resourceType", ""))
        try:
            model = get_fhir_model_class(rtype)
        except KeyError:
            problems.append(f"{where}: unknown resourceType {rtype!r}")
            continue
        check(model, res, f"{where} {rtype}")
        _periods_backwards(res, f"{where} {rtype}", problems)
    for url, k in full_urls.items():
        if k > 1:
            problems.append(f"fullUrl {url} used by {k} entries (bdl-7)")
    refs: list[str] = []
    for entry in entries:
        if isinstance(entry, dict):
            _references(entry.get("resource"), refs)
    for ref in sorted(set(refs)):
        if ref.startswith("urn:uuid:") and ref not in full_urls:
            problems.append(f"reference {ref} does not resolve to an entry of the Bundle")
    return problems


# ----------------------------------------------------------------------------- converting
def _default_convert() -> ConvertFn:
    from transforms.convert import convert_report

    return convert_report


def _default_settings() -> ConvertSettings:
    from transforms.settings import DEMO_SETTINGS

    return DEMO_SETTINGS


def _internal_cause(exc: SluiceError) -> BaseException | None:
    """The non-Sluice exception a SluiceError wraps (the converter's AR 207 safety net), if any."""
    cause = exc.__cause__
    if cause is not None and not isinstance(cause, SluiceError):
        return cause
    return None


def _tb_lines(exc: BaseException, limit: int = 6) -> list[str]:
    frames = traceback.format_exception(type(exc), exc, exc.__traceback__)
    lines = "".join(frames).rstrip().splitlines()
    return lines[-2 * limit :]


def _message_type(msg: Message | None, raw: bytes) -> str:
    if msg is not None:
        mt = msg.message_type + (f"^{msg.trigger}" if msg.trigger else "")
        return mt or "?"
    head = raw.split(b"\r", 1)[0]
    if head.startswith(b"MSH") and len(head) > 3:
        fields = head.split(head[3:4])
        if len(fields) > 8:
            return fields[8].decode("latin-1", "replace").replace(fields[1][:1].decode("latin-1"), "^")[:20]
    return "?"


def convert_one(
    raw: bytes, result: MessageResult, convert_fn: ConvertFn, settings: ConvertSettings
) -> dict[str, Any] | None:
    """Parse, convert and validate one message into ``result``; the Bundle when it converted.

    As a channel with the shipped defaults: UTF-8 bytes under a single-byte MSH-18 decoded as UTF-8 (a
    ``charset_fallback`` warning), ASCII bytes under an MSH-18 Sluice does not know as ASCII (``charset_unknown``),
    then the conversion's own warnings (``settings.strictness``)."""
    msg: Message | None = None
    try:
        msg = parse_bytes(raw, utf8_fallback=True)
        result.message_type = _message_type(msg, raw)
        converted = convert_fn(msg, settings)
    except SluiceError as exc:
        result.message_type = _message_type(msg, raw)
        cause = _internal_cause(exc)
        if cause is not None:
            result.outcome = "CRASH"
            result.detail = f"{exc.message}: {type(cause).__name__}: {cause}"
            result.problems = _tb_lines(cause)
        elif exc.hl7_error in UNSUPPORTED_CODES and exc.ack_code == "AR":
            result.outcome = "unsupported"
            result.detail = f"{exc.hl7_error}: {exc.message}"
        else:
            result.outcome = "error" if exc.location is not None else "UNLOCATED"
            result.detail = f"{type(exc).__name__} {exc.ack_code} {exc.hl7_error}: {exc.message}"
            result.location = str(exc.location) if exc.location is not None else ""
        return None
    except Exception as exc:
        result.message_type = _message_type(msg, raw)
        result.outcome = "CRASH"
        result.detail = f"{type(exc).__name__}: {exc}"
        result.problems = _tb_lines(exc)
        return None
    if (charset := decode_warning(raw, True)) is not None:
        result.warnings.append(charset)
    if isinstance(converted, dict):
        bundle = converted
    else:
        bundle = converted.bundle
        result.warnings.extend(zip(converted.warning_kinds, converted.warnings, strict=True))
    try:
        problems = validate_bundle(bundle)
    except Exception as exc:  # the validator itself failed: report, do not hide
        problems = [f"validation failed: {type(exc).__name__}: {exc}"]
    if problems:
        result.outcome = "INVALID"
        result.detail = f"{len(problems)} FHIR problem(s): {problems[0]}"
        result.problems = problems
    else:
        result.outcome = "valid"
    return bundle


def expected_for(path: Path) -> Path | None:
    """``<dir>/expected/<stem>-expected.json`` (Microsoft FHIR-Converter layout), if present."""
    cand = path.parent / "expected" / f"{path.stem}-expected.json"
    return cand if cand.is_file() else None


def run(
    corpus_dir: Path,
    settings: ConvertSettings | None = None,
    report: Path | None = None,
    *,
    convert_fn: ConvertFn | None = None,
) -> Summary:
    """Convert, validate and score every HL7 file under ``corpus_dir``; write a Markdown report."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.exists():
        raise FileNotFoundError(f"corpus directory {corpus_dir} does not exist")
    if settings is None:
        settings = _default_settings()
    if getattr(settings, "validate", False):
        # we validate ourselves and want every problem, not the converter's first one as an error
        settings = dataclasses.replace(settings, validate=False)
    fn = convert_fn or _default_convert()
    root = corpus_dir if corpus_dir.is_dir() else corpus_dir.parent
    summary = Summary(corpus=str(corpus_dir))
    files, skipped = find_files(corpus_dir)
    summary.skipped = [(_rel(p, root), why) for p, why in skipped]
    for path in files:
        rel = _rel(path, root)
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                summary.skipped.append((rel, f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MB"))
                continue
            raw = path.read_bytes()
        except OSError as exc:
            summary.skipped.append((rel, f"cannot read: {exc.strerror or exc}"))
            continue
        chunks = split_messages(raw) or [b""]
        expected = expected_for(path)
        for i, chunk in enumerate(chunks, start=1):
            result = MessageResult(file=rel, index=i, count=len(chunks))
            bundle = convert_one(chunk, result, fn, settings)
            if bundle is not None and expected is not None and len(chunks) == 1:
                _score(result, bundle, expected, root, chunk)
            summary.results.append(result)
    if report is not None:
        Path(report).write_text(render_markdown(summary), encoding="utf-8")
    return summary


def _score(
    result: MessageResult, bundle: dict[str, Any], expected: Path, root: Path, source: bytes = b""
) -> None:
    try:
        reference = json.loads(expected.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        result.detail = (result.detail + "; " if result.detail else "") + f"expected bundle unreadable: {exc}"
        return
    result.expected = _rel(expected, root)
    result.score = score_bundles(
        bundle, reference, source=source.decode("utf-8", "replace") if source else None
    )


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def totals(summary: Summary) -> Score:
    total = Score()
    for r in summary.results:
        if r.score is not None:
            total.add(r.score, r.name)
    return total


# ----------------------------------------------------------------------------- output
def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}%"


def _row(r: MessageResult) -> list[str]:
    s = r.score
    return [
        r.name,
        r.message_type,
        r.outcome,
        str(len(r.warnings)) if r.warnings else "",
        str(s.compared) if s else "",
        str(s.agreeing) if s else "",
        str(s.explained) if s else "",
        _pct(s.raw_percent) if s else "",
        _pct(s.percent) if s else "",
    ]


HEAD = [
    "file",
    "type",
    "outcome",
    "warnings",
    "compared",
    "agreeing",
    "explained",
    "raw",
    "explained agreement",
]


def print_table(summary: Summary, out: TextIO | None = None, show_diffs: bool = False) -> None:
    out = out if out is not None else sys.stdout
    rows = [HEAD, *(_row(r) for r in summary.results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEAD))]
    widths[0] = min(widths[0], 72)
    for n, row in enumerate(rows):
        if len(row[0]) > widths[0]:  # keep the distinctive end of long paths
            row = ["…" + row[0][-(widths[0] - 1) :], *row[1:]]
        cells = [c[: widths[i]].ljust(widths[i]) if i < 3 else c.rjust(widths[i]) for i, c in enumerate(row)]
        print("  ".join(cells).rstrip(), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)
    total = totals(summary)
    counts = summary.counts
    print(file=out)
    print(
        f"{len(summary.results)} messages in {len({r.file for r in summary.results})} files: "
        + ", ".join(f"{counts.get(o, 0)} {o}" for o in OUTCOMES),
        file=out,
    )
    if summary.warning_kinds:
        print(warnings_line(summary), file=out)
    print(agreement_line(total, summary.scored_files), file=out)
    if total.compared:
        excused = total.explained_by
        print(
            "explained differences left out, by rule: "
            + ", ".join(f"{k} {excused.get(k, 0)}" for k in RULES),
            file=out,
        )
    if summary.skipped:
        print(f"{len(summary.skipped)} file(s) skipped (see the report)", file=out)
    for r in summary.failures:
        print(f"{r.outcome}: {r.name} ({r.message_type}): {r.detail}", file=out)
        for line in r.problems[:12]:
            print(f"    {line}", file=out)
    if show_diffs:
        print_diffs(total, out)


def warnings_line(summary: Summary) -> str:
    """How many converted messages carry warnings (what a lenient channel dropped or changed), by kind."""
    kinds = summary.warning_kinds
    messages = sum(1 for r in summary.results if r.warnings)
    return f"{sum(kinds.values())} warning(s) on {messages} converted message(s), by kind: " + ", ".join(
        f"{k} {n}" for k, n in sorted(kinds.items())
    )


def agreement_line(total: Score, files: int) -> str:
    """The two agreement figures: raw (every compared field) and with the explained differences left out."""
    return (
        f"agreement with expected bundles ({files} scored): raw {total.agreeing}/{total.compared} = "
        f"{_pct(total.raw_percent)} of every compared field; explained {total.agreeing}/{total.scored} = "
        f"{_pct(total.percent)} ({total.explained} explained differences left out)"
    )


def print_diffs(total: Score, out: TextIO) -> None:
    """Every differing field: message, path, Sluice's value, the expected value and the explanation, if any."""
    for d in total.diffs:
        why = f"explained ({d.rule}): {d.explanation}" if d.rule else "unexplained"
        print(f"DIFF {d.file}  {d.path}  sluice={d.ours!r}  expected={d.expected!r}  {why}", file=out)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(summary: Summary) -> str:
    total = totals(summary)
    counts = summary.counts
    out: list[str] = []
    add = out.append
    add("# Sluice conformance report\n")
    add(f"Corpus: `{summary.corpus}`\n")
    add("## Totals\n")
    add("| outcome | messages |")
    add("|---|---:|")
    for o in OUTCOMES:
        add(f"| {o} | {counts.get(o, 0)} |")
    add(f"| **total** | **{len(summary.results)}** |\n")
    add(f"Agreement with the expected bundles ({summary.scored_files} files scored):\n")
    add(
        f"* **raw: {total.agreeing} / {total.compared} = {_pct(total.raw_percent)}** of every compared field "
        "(every field of every reference resource of a scored type, nothing left out);"
    )
    add(
        f"* **explained: {total.agreeing} / {total.scored} = {_pct(total.percent)}**, leaving out the "
        f"{total.explained} differences excused by an explanation whose evidence the HL7 message holds.\n"
    )
    excused = total.explained_by
    add("| explanation | fields excused | what |")
    add("|---|---:|---|")
    for rule, what in RULES.items():
        add(f"| {rule} | {excused.get(rule, 0)} | {_md(what)} |")
    add(f"| **total** | **{total.explained}** | |\n")
    add("| category | compared | agreeing | explained | raw | explained agreement |")
    add("|---|---:|---:|---:|---:|---:|")
    for cat in CATEGORIES:
        c, a, e = total.by_category.get(cat, [0, 0, 0])
        if c:
            add(
                f"| {cat} | {c} | {a} | {e} | {_pct(100.0 * a / c)} | {_pct(100.0 * a / (c - e) if c - e else None)} |"
            )
    add("")
    add("## Per file\n")
    add("| " + " | ".join(HEAD) + " | detail |")
    add("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in summary.results:
        detail = r.detail if r.outcome != "valid" else ""
        if r.location:
            detail = f"at {r.location}: {detail}"
        add("| " + " | ".join(_md(c) for c in _row(r)) + f" | {_md(detail)} |")
    add("")
    failures = summary.failures
    add("## Failures (crashes, invalid FHIR, unlocated errors)\n")
    if not failures:
        add("None.\n")
    for r in failures:
        add(f"### {r.outcome}: {r.name} ({r.message_type})\n")
        add(f"{_md(r.detail)}\n")
        if r.problems:
            add("```")
            add("\n".join(r.problems[:40]))
            add("```\n")
    warned = [r for r in summary.results if r.warnings]
    add("## Warnings (converted, as a lenient channel with the shipped defaults converts)\n")
    if not warned:
        add("None.\n")
    else:
        add(warnings_line(summary) + "\n")
        add("| file | type | kind | warning |")
        add("|---|---|---|---|")
        for r in warned:
            for kind, text in r.warnings:
                add(f"| {_md(r.name)} | {_md(r.message_type)} | {kind} | {_md(text)} |")
        add("")
    located = [r for r in summary.results if r.outcome == "error"]
    add("## Located errors\n")
    if not located:
        add("None.\n")
    else:
        add("| file | type | location | error |")
        add("|---|---|---|---|")
        for r in located:
            add(f"| {_md(r.name)} | {_md(r.message_type)} | {_md(r.location)} | {_md(r.detail)} |")
        add("")
    unsupported = Counter(r.message_type.split("^")[0] for r in summary.results if r.outcome == "unsupported")
    if unsupported:
        add("## Unsupported message types\n")
        add(", ".join(f"{t or '?'} × {n}" for t, n in sorted(unsupported.items())) + "\n")
    unexplained = [d for d in total.diffs if not d.explanation]
    explained = [d for d in total.diffs if d.explanation]
    add(f"## Disagreeing fields ({sum(d.fields for d in unexplained)} fields, {len(unexplained)} lines)\n")
    add("A reference resource Sluice did not produce is one line standing for all of its fields.\n")
    if unexplained:
        add("| file | path | category | ours | expected |")
        add("|---|---|---|---|---|")
        for d in unexplained:
            add(f"| {_md(d.file)} | {_md(d.path)} | {d.category} | {_md(d.ours)} | {_md(d.expected)} |")
        add("")
    add(f"## Explained differences ({sum(d.fields for d in explained)} fields, {len(explained)} lines)\n")
    if explained:
        add("| file | path | ours | expected | rule | evidence |")
        add("|---|---|---|---|---|---|")
        for d in explained:
            add(
                f"| {_md(d.file)} | {_md(d.path)} | {_md(d.ours)} | {_md(d.expected)} | {d.rule} "
                f"| {_md(d.explanation)} |"
            )
        add("")
    add("## Resources per type (scored files)\n")
    add("| resourceType | expected | ours |")
    add("|---|---:|---:|")
    for rtype in sorted(set(total.expected_resources) | set(total.our_resources)):
        add(f"| {rtype} | {total.expected_resources.get(rtype, 0)} | {total.our_resources.get(rtype, 0)} |")
    add("")
    if summary.skipped:
        add("## Skipped files\n")
        for f, why in summary.skipped:
            add(f"- `{f}`: {why}")
        add("")
    return "\n".join(out)


def validator_missing() -> str | None:
    """Why the FHIR validator (the ``validate`` extra: fhir.resources) cannot be imported, or None.
    Without it every bundle would look INVALID, so the runner stops before converting anything."""
    try:
        import fhir.resources.R4B  # noqa: F401
    except ImportError as exc:
        return str(exc) or type(exc).__name__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sluice conformance",
        description="Convert every HL7 v2 file under DIR to FHIR, validate it and score it against "
        "expected bundles (expected/<name>-expected.json).",
    )
    parser.add_argument("dir", type=Path, help="corpus directory (or a single file)")
    parser.add_argument("--report", type=Path, default=None, help="write a Markdown report to this file")
    parser.add_argument(
        "--diffs",
        action="store_true",
        help="also print every differing field: message, path, Sluice value, expected value, explanation",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not args.dir.exists():
        print(
            f"error: {args.dir} does not exist; give the corpus directory, e.g. ../shared/corpus",
            file=sys.stderr,
        )
        return 2
    missing = validator_missing()
    if missing is not None:
        print(
            f"error: sluice conformance validates every bundle with fhir.resources, which is not installed "
            f"({missing}): install sluice[validate] (pip install 'sluice[validate]') and run it again",
            file=sys.stderr,
        )
        return 2
    try:
        summary = run(args.dir, report=args.report)
    except ImportError as exc:
        print(f"error: the converter is not importable ({exc}); is transforms/ installed?", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_table(summary, show_diffs=args.diffs)
    if args.report is not None:
        print(f"report written to {args.report}")
    if not summary.results:
        print(f"error: no HL7 files found under {args.dir}", file=sys.stderr)
        return 2
    return 0 if summary.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
