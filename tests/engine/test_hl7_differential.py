"""Differential test: Sluice's parser (engine/hl7.py) against python-hl7 on every message we have.

Every message of the shared corpus (``SLUICE_CORPUS``, else ``../shared/corpus`` next to the repository,
as CI and ``sluice conformance`` use it; split into messages as the conformance runner splits them) and
the repository's own test messages is parsed by both.  For every segment and every field (a superset of
what the converter reads) the test compares, against python-hl7's tree:

* the raw field, its repetitions, components and subcomponents (the structure);
* each value through every accessor the mappings use: ``Segment.reps/rep/get/value/cs/rep_comps``,
  ``Rep.c/cs/hd/subs/text/__len__/__bool__`` and ``Message[path]``, unescaped, which also covers the
  parser's fast paths (plain segments, per-field caches) against its general path.

Intentional divergences (each a documented choice, listed in :data:`DIVERGENCES` with its reason) are
compared as raw text only; everything else must be identical.  python-hl7 is given the text Sluice
decoded: decoding (MSH-18 charsets, fallback) and segment-terminator normalisation are Sluice's alone.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hl7 as pyhl7
import pytest

from conformance.runner import find_files, split_messages
from engine import hl7
from engine.errors import SluiceError
from tests.support.ci import service_unavailable

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(os.environ.get("SLUICE_CORPUS") or ROOT.parent / "shared" / "corpus")

# Escapes whose result differs only by a rendering choice: python-hl7's unescape takes an application
# map, so these are aligned to Sluice's choice and the values compared in full.
ALIGNED = {
    # highlighting: python-hl7 renders both as "_"; Sluice drops them (a FHIR string has no highlighting)
    "H": "",
    "N": "",
    # line breaks: python-hl7 gives "\r", Sluice "\n" (FHIR's line break; "\r" is HL7's segment end)
    ".br": "\n",
    ".sp": "\n",
    # indent / temporary indent / skip / centre: python-hl7 renders spaces or "\r", Sluice drops them
    ".in": "",
    ".ti": "",
    ".sk": "",
    ".ce": "",
}

# Values holding one of these are compared as raw text only (the structure still is); why each differs.
DIVERGENCES = {
    "counted formatting command": "`\\.sp2\\`, `\\.in+4\\`: python-hl7 repeats the rendering n times (and raises "
    "on a suffix that is not a number); Sluice renders one line break or nothing",
    "hex escape of UTF-8 bytes": "`\\XC3A9\\`: Sluice decodes the bytes as UTF-8 when they are UTF-8 (else "
    "Latin-1); python-hl7 makes one code point of each byte",
    "malformed hex escape": "`\\X4\\`, `\\XZZ\\`: Sluice keeps it as sent; python-hl7 logs and decodes what it can",
    "truncation escape": "`\\P\\` (v2.7 truncation character): Sluice resolves it; python-hl7 does not know it",
    "unknown escape": "an escape neither defines (`\\Q\\`, charset switches `\\C..\\`/`\\M..\\`, `\\Zxx\\`): "
    "Sluice keeps it as sent so nothing is lost; python-hl7 logs and drops it",
    "unpaired escape character": "an escape character without its closing one: Sluice keeps it as sent; "
    "python-hl7 drops what follows it",
    "empty escape sequence": "two escape characters in a row: Sluice keeps them; python-hl7 drops them",
    "segment name": "a segment name that is not three letters or digits: Sluice strips blanks and keeps three "
    "characters, upper-cased (a name that can never match a real segment); python-hl7 keeps it as sent",
}

_FORMATTING = ("br", "sp", "in", "ti", "sk", "ce", "fi", "nf")
_PLAIN_ESCAPES = frozenset({"F", "S", "T", "R", "E", ".fi", ".nf", *ALIGNED})
_HEX = re.compile(r"^[0-9A-Fa-f]+$")


def divergence(value: str, d: hl7.Delimiters) -> str | None:
    """The :data:`DIVERGENCES` key that applies to one raw value (a subcomponent or a repetition)."""
    esc = d.escape
    if not esc or esc not in value:
        return None
    parts = value.split(esc)
    if len(parts) % 2 == 0:
        return "unpaired escape character"
    for seq in parts[1::2]:
        if seq in _PLAIN_ESCAPES:
            continue
        if not seq:
            return "empty escape sequence"
        if seq.startswith(".") and seq[1:3] in _FORMATTING:
            return "counted formatting command"
        if seq == "P" and d.truncation:
            return "truncation escape"
        if seq.startswith("X"):
            digits = seq[1:]
            if not digits or len(digits) % 2 or not _HEX.match(digits):
                return "malformed hex escape"
            data = bytes.fromhex(digits)
            if max(data) >= 0x80:
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:
                    continue  # both give one Latin-1 character per byte
                return "hex escape of UTF-8 bytes"
            continue
        return "unknown escape"
    return None


# ----------------------------------------------------------------------------- python-hl7's tree
Tree = list[list[list[str]]]  # repetitions → components → subcomponents, raw


def tree(fld: Any) -> Tree:
    """python-hl7's field as raw repetitions/components/subcomponents; a collapsed level (no separator
    below it) is one item holding the text."""
    if str(fld) == "":
        return []
    out: Tree = []
    for rep in fld:
        if isinstance(rep, str):
            out.append([[rep]])
        else:
            out.append([[c] if isinstance(c, str) else [str(s) for s in c] for c in rep])
    return out


@dataclass
class Report:
    """What one comparison saw: values compared in full, raw-only values by divergence, mismatches."""

    compared: int = 0
    raw_only: Counter[str] = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)

    def add(self, other: Report) -> None:
        self.compared += other.compared
        self.raw_only.update(other.raw_only)
        self.mismatches.extend(other.mismatches)


def compare(text: str, name: str, reference_text: str | None = None) -> Report:
    """Parse ``text`` with Sluice and ``reference_text`` (default: the text Sluice decoded) with python-hl7
    and compare every field.  Returns the report; mismatches name the message, path and both values."""
    report = Report()
    msg = hl7.parse(text)
    fresh_msg = hl7.parse(text)  # read only through value/rep_comps/get (see _compare_field)
    ref = pyhl7.parse(reference_text if reference_text is not None else msg.text)
    d = msg.delimiters

    def check(what: str, ours: Any, theirs: Any) -> None:
        report.compared += 1
        if ours != theirs:
            report.mismatches.append(f"{name} {what}: sluice {ours!r} != python-hl7 {theirs!r}")

    def unescaped(raw: str) -> str | None:
        """python-hl7's unescape with the aligned renderings; None (and counted) for a divergence."""
        why = divergence(raw, d)
        if why is not None:
            report.raw_only[why] += 1
            return None
        return str(ref.unescape(raw, ALIGNED))

    ref_segments = [s for s in ref if str(s)]  # python-hl7 keeps blank lines as empty segments
    check("segment count", len(msg.segments), len(ref_segments))
    occurrences: Counter[str] = Counter()
    for seg, fresh, rseg in zip(msg.segments, fresh_msg.segments, ref_segments, strict=False):
        rname = str(rseg[0])
        occurrences[seg.name] += 1
        occ = occurrences[seg.name]
        where = f"{seg.name}({occ})"
        if len(rname) == 3 and rname.isalnum():
            check(f"{where} name", seg.name, rname)
        else:
            report.raw_only["segment name"] += 1
        check(f"{where} field count", len(seg), len(rseg))
        header = seg.name in hl7.HEADER_SEGMENTS
        for n in range(1, max(len(seg), len(rseg))):
            rfield = rseg[n] if n < len(rseg) else ""
            path = f"{where}-{n}"
            check(f"{path} raw", seg[n], str(rfield))
            if header and n in (1, 2):  # the separator and the encoding characters: literal text
                reps = seg.reps(n)
                check(f"{path} literal", [r.text for r in reps], [str(rfield)] if str(rfield) else [])
                continue
            _compare_field(msg, seg, fresh, occ, n, tree(rfield), path, check, unescaped)
    return report


def _compare_field(
    msg: hl7.Message,
    seg: hl7.Segment,
    fresh: hl7.Segment,
    occ: int,
    n: int,
    t: Tree,
    path: str,
    check: Any,
    unescaped: Any,
) -> None:
    """One field: ``seg`` (of ``msg``) through reps/Rep accessors and ``msg[path]``; ``fresh`` (the same
    segment from a second parse, nothing read yet) through value/rep_comps/get first, as a mapping reads
    it, so the parser's fast paths and caches are compared too."""
    d = msg.delimiters
    reps = seg.reps(n)
    check(
        f"{path} repetitions",
        [r.raw for r in reps],
        [d.component.join(d.subcomponent.join(c) for c in r) for r in t],
    )
    texts: list[str | None] = []
    values: list[list[list[str | None]]] = []  # repetition → component → subcomponent, unescaped
    for ri, (rep, comps) in enumerate(zip(reps, t, strict=False), 1):
        rpath = f"{path}({ri})"
        check(f"{rpath} component count", len(rep), len(comps))
        check(f"{rpath} is empty", not rep, not "".join(s for c in comps for s in c).strip(" "))
        text = unescaped(rep.raw)
        texts.append(text)
        if text is not None:
            check(f"{rpath} text", rep.text, text)
        rep_values = [[unescaped(s) for s in subs] for subs in comps]
        values.append(rep_values)
        for ci, subs_values in enumerate(rep_values, 1):
            cpath = f"{rpath}.{ci}"
            if all(v is not None for v in subs_values):
                check(f"{cpath} subs()", rep.subs(ci), subs_values)
            for si, value in enumerate(subs_values, 1):
                if value is not None:
                    check(f"{cpath}.{si} c()", rep.c(ci, si), value)
                    check(f"{cpath}.{si} msg[path]", msg[f"{seg.name}({occ})-{n}({ri}).{ci}.{si}"], value)
            if subs_values[0] is not None:
                check(f"{cpath} msg[path]", msg[f"{seg.name}({occ})-{n}({ri}).{ci}"], subs_values[0])
            if all(v is not None for v in subs_values[:3]):
                check(f"{cpath} hd()", rep.hd(ci), tuple([*subs_values[:3], "", ""][:3]))
        firsts = [c[0] for c in rep_values]
        if all(v is not None for v in firsts):
            check(f"{rpath} cs()", rep.cs(len(comps) + 2)[: len(comps) + 2], [*firsts, "", ""])
    check(f"{path} rep() past the end", seg.rep(n, len(reps) + 1).raw, "")

    # the fresh segment, read the way the mappings read a field first
    if texts and texts[0] is not None:
        check(f"{path} value()", fresh.value(n), texts[0])
    elif not texts:
        check(f"{path} value()", fresh.value(n), "")
    k = max((len(c) for c in t), default=1)
    firsts_all = [[c[0] for c in rv] for rv, rep in zip(values, reps, strict=False) if rep]
    if all(v is not None for f in firsts_all for v in f):
        expected = [[*f, *[""] * (k - len(f))] for f in firsts_all]
        check(f"{path} rep_comps()", [c[:k] for c in fresh.rep_comps(n, k)], expected)
    for ri, rep_values in enumerate(values, 1):
        for ci, subs_values in enumerate(rep_values, 1):
            for si, value in enumerate(subs_values, 1):
                if value is not None:
                    check(f"{path}({ri}).{ci}.{si} get()", fresh.get(n, ci, si, ri), value)


# ----------------------------------------------------------------------------- the messages
def _messages(path: Path) -> Iterator[tuple[str, bytes]]:
    for i, raw in enumerate(split_messages(path.read_bytes()), 1):
        yield f"{path.name}#{i}", raw


def repo_messages() -> list[tuple[str, str]]:
    """The repository's own test messages: golden conversions, engine samples and the fuzz corpora."""
    from tests.fuzz import test_convert_fuzz as convert_fuzz
    from tests.fuzz import test_parser_fuzz as parser_fuzz

    out: list[tuple[str, str]] = []
    for folder in (ROOT / "tests" / "transforms" / "messages", ROOT / "tests" / "engine" / "samples"):
        for p in sorted(folder.glob("*.hl7")):
            out.extend((name, hl7.decode(raw)) for name, raw in _messages(p))
    out.extend((f"convert_fuzz.CORPUS[{i}]", t) for i, t in enumerate(convert_fuzz.CORPUS))
    out.extend((f"convert_fuzz.REGRESSIONS[{i}]", t) for i, t in enumerate(convert_fuzz.REGRESSIONS))
    for i, raw in enumerate(parser_fuzz.CORPUS):
        for j, part in enumerate(hl7.split_batch(hl7.normalise_newlines(raw.decode("latin-1")))):
            if part.startswith("MSH"):
                out.append((f"parser_fuzz.CORPUS[{i}]#{j + 1}", part))
    return out


REPO_MESSAGES = repo_messages()


@pytest.mark.parametrize(("name", "text"), REPO_MESSAGES, ids=[n for n, _ in REPO_MESSAGES])
def test_repository_messages_parse_alike(name: str, text: str) -> None:
    report = compare(text, name)
    assert not report.mismatches, "\n".join(report.mismatches[:30])
    assert report.compared > 10


def test_shared_corpus_parses_alike() -> None:
    if not CORPUS.is_dir():
        service_unavailable(f"the shared corpus is not at {CORPUS} (set SLUICE_CORPUS to its folder)")
    files, _ = find_files(CORPUS)
    total = Report()
    messages = 0
    unparsed: list[str] = []
    for path in files:
        for name, raw in _messages(path):
            where = str(path.relative_to(CORPUS)) + name[len(path.name) :]
            try:
                text = hl7.parse_bytes(raw).text
            except SluiceError:
                # Decoding refused (e.g. non-ASCII bytes under MSH-18 "ASCII": AE 102 in the engine). The
                # parsers are still compared on the text, decoded as UTF-8 or else Latin-1.
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = raw.decode("latin-1")
            try:
                report = compare(text, where)
            except (SluiceError, pyhl7.ParseException) as exc:
                unparsed.append(f"{where}: {type(exc).__name__}: {exc}")
                continue
            messages += 1
            total.add(report)
    assert messages > 150, f"only {messages} messages under {CORPUS}"
    assert not unparsed, "messages a parser refused:\n" + "\n".join(unparsed)
    assert not total.mismatches, f"{len(total.mismatches)} differences:\n" + "\n".join(total.mismatches[:40])
    assert set(total.raw_only) <= set(DIVERGENCES), total.raw_only
    assert total.compared > 100_000


def test_the_comparison_sees_a_difference() -> None:
    """The comparison can fail: python-hl7 given a message with one subcomponent changed."""
    text = (
        "MSH|^~\\&|EHR|NORTH|SL|HOSP|20250314083000||ADT^A01|C1|P|2.5.1\r"
        "PID|1||MRN1^^^NORTH&1.2.3&ISO^MR~X9||Doe\\T\\Roe^Alex\\.br\\\r"
    )
    assert not compare(text, "same").mismatches
    changed = compare(text, "changed", text.replace("1.2.3", "1.2.4"))
    assert any("PID(1)-3(1).4.2 c()" in m for m in changed.mismatches), changed.mismatches
    assert any("PID(1)-3 raw" in m for m in changed.mismatches)


def test_divergences_are_recognised() -> None:
    d = hl7.DEFAULT_DELIMITERS
    assert divergence("plain", d) is None
    assert divergence("a\\T\\b\\.br\\c\\H\\d\\N\\", d) is None  # compared in full (aligned)
    assert divergence("\\X41\\", d) is None and divergence("\\XE9\\", d) is None  # ASCII / Latin-1 alike
    assert divergence("\\XC3A9\\", d) == "hex escape of UTF-8 bytes"
    assert divergence("\\.sp2\\", d) == "counted formatting command"
    assert divergence("\\Q\\", d) == "unknown escape"
    assert divergence("a\\b", d) == "unpaired escape character"
    assert divergence("\\\\", d) == "empty escape sequence"
    assert divergence("\\X4\\", d) == "malformed hex escape"
    assert set(DIVERGENCES) >= {
        "counted formatting command",
        "hex escape of UTF-8 bytes",
        "malformed hex escape",
        "unknown escape",
        "unpaired escape character",
        "empty escape sequence",
        "segment name",
        "truncation escape",
    }
