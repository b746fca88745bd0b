"""Declarative post-conversion edits: the ``fhir-edits`` transform step an analyst writes in the channel YAML.

After ``hl7-to-fhir``, a list of edits changes the Bundle without Python::

    transform:
      - hl7-to-fhir: {}
      - fhir-edits:
          edits:
            - select: DocumentReference.where(type.coding.code = '18842-5').content.attachment.data
              strip-html: true      # the discharge summary note: HTML tags out ...
              truncate: 2000        # ... and at most 2,000 characters
            - select: Patient.telecom.where(system = 'email')
              remove: true
            - select: Observation.code.coding
              map: lab-codes.csv    # a code table under transforms/maps/ or relative to the channel
            - select: Encounter.serviceProvider.display
              set: North Clinic

``select`` is a FHIRPath expression (parsed with ``fhirpathpy`` once, when the channel loads) applied to every
resource of the Bundle.  Its steps navigate: member names (``content.attachment``), the resource type first
(``DocumentReference.``), ``where(criteria)`` (any FHIRPath; evaluated by fhirpathpy on each candidate),
``ofType(Type)`` and ``first()``; the edit applies to the elements reached, in place.  Operations, applied in
the order written: ``strip-html`` (tags out, ``<br>`` becomes a line break, entities unescaped),
``truncate: N`` (at most N characters), ``map: table.csv`` (``local_code,system,code,display``: a string
becomes the mapped code; a Coding, or each coding of a CodeableConcept, gets system, code and display),
``set: value`` and ``remove``.  A text attachment's ``data`` (base64, ``contentType: text/...``) is edited as
its decoded text.  A bad expression, an unsupported step, an unknown operation or a missing table is a
``ConfigError`` at load naming the channel, the step and what is wrong.

Counted in the step's facts (``events``: ``edit_applied``), never values.  Runs where the pipeline runs (the
worker processes); cost measured by ``bench/edits_bench.py`` (bench/results/edits.json).
"""

from __future__ import annotations

import binascii
import html
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from engine import exactjson
from engine.errors import ConfigError
from engine.pipeline import StageContext, Step, Work
from engine.registry import transform
from transforms.settings import CodeMap, load_code_map

FHIR_JSON = "application/fhir+json"
OPERATIONS = ("strip-html", "truncate", "map", "set", "remove")
_TAG = re.compile(r"<[^>]{0,2000}>")
_BR = re.compile(r"(?i)<br\s*/?>")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CALL = re.compile(r"^(where|ofType|first)\((.*)\)$", re.S)

# A place in the Bundle: (the dict holding the member, the member name, the index in its list or None)
Place = tuple[dict[str, Any], str, int | None]


@dataclass(frozen=True)
class _Nav:
    """One navigation step of a selector."""

    kind: str  # member | where | ofType | first
    arg: str = ""
    criteria: Callable[..., Any] | None = None


@dataclass(frozen=True)
class Edit:
    """One compiled edit: where it applies and what it does."""

    select: str
    resource_type: str | None  # the selector's leading resource type, when it has one (a quick filter)
    steps: tuple[_Nav, ...]
    ops: tuple[tuple[str, Any], ...]  # (operation, argument) in the order written

    def apply(self, resource: dict[str, Any]) -> int:
        """Edit ``resource`` in place; how many elements were changed."""
        if self.resource_type is not None and resource.get("resourceType") != self.resource_type:
            return 0
        places = _walk(resource, self.steps)
        if not places:
            return 0
        changed = 0
        removals: list[Place] = []
        op0, arg0 = self.ops[0]
        for place in places:
            if op0 == "remove":  # (remove and set stand alone: compile_edit)
                removals.append(place)
                changed += 1
            elif op0 == "set":
                _put(place, arg0)
                changed += 1
            elif _edit_value(place, self.ops):
                changed += 1
        for holder, member, index in sorted(removals, key=lambda p: -(p[2] if p[2] is not None else -1)):
            if index is None:
                holder.pop(member, None)
            else:
                items = holder.get(member)
                if isinstance(items, list) and index < len(items):
                    del items[index]
                    if not items:
                        del holder[member]  # FHIR allows no empty array
        return changed


# ---------------------------------------------------------------------------------------------- selection
def _split_steps(expr: str) -> list[str]:
    """Top-level ``.``-separated steps (dots inside parentheses or quotes stay)."""
    steps: list[str] = []
    depth = 0
    quote = ""
    cur = ""
    for ch in expr:
        if quote:
            cur += ch
            if ch == quote:
                quote = ""
            continue
        if ch in "'`":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "." and depth == 0:
            steps.append(cur.strip())
            cur = ""
            continue
        cur += ch
    steps.append(cur.strip())
    return steps


def _walk(resource: dict[str, Any], steps: tuple[_Nav, ...]) -> list[Place]:
    # nodes: (value, its place); the resource itself has no place
    nodes: list[tuple[Any, Place | None]] = [(resource, None)]
    for nav in steps:
        if nav.kind == "member":
            nxt: list[tuple[Any, Place | None]] = []
            for value, _ in nodes:
                if not isinstance(value, dict) or nav.arg not in value:
                    continue
                v = value[nav.arg]
                if isinstance(v, list):
                    nxt.extend((item, (value, nav.arg, i)) for i, item in enumerate(v))
                else:
                    nxt.append((v, (value, nav.arg, None)))
            nodes = nxt
        elif nav.kind == "where":
            assert nav.criteria is not None
            nodes = [(v, p) for v, p in nodes if _true(nav.criteria, v)]
        elif nav.kind == "ofType":
            nodes = [(v, p) for v, p in nodes if isinstance(v, dict) and v.get("resourceType") == nav.arg]
        else:  # first
            nodes = nodes[:1]
        if not nodes:
            return []
    return [p for _, p in nodes if p is not None]


_SIMPLE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\s*(=|!=)\s*'([^'\\]*)'\s*$")


def _fast(criteria: str, general: Callable[..., Any]) -> Callable[..., Any]:
    """``path = 'text'`` / ``path != 'text'`` (the usual criteria) without the FHIRPath engine: when the path
    reaches exactly one string the comparison is that string's; anything else is left to fhirpathpy, so the
    result is always FHIRPath's (about 100x cheaper than a fhirpathpy evaluation: bench/edits_bench.py)."""
    m = _SIMPLE.match(criteria)
    if m is None:
        return general
    path = m.group(1).split(".")
    equal = m.group(2) == "="
    literal = m.group(3)

    def check(value: Any) -> list[bool]:
        items = [value]
        for name in path:
            nxt: list[Any] = []
            for item in items:
                if isinstance(item, dict) and name in item:
                    v = item[name]
                    nxt.extend(v if isinstance(v, list) else (v,))
            items = nxt
        if len(items) == 1 and isinstance(items[0], str):
            return [(items[0] == literal) is equal]
        result: list[bool] = general(value)
        return result

    return check


def _true(criteria: Callable[..., Any], value: Any) -> bool:
    try:
        got = criteria(value)
    except Exception:  # a criteria that cannot be evaluated on this element selects nothing there
        return False
    return bool(got) and all(x is True for x in got)


# ---------------------------------------------------------------------------------------------- operations
def _get(place: Place) -> Any:
    holder, member, index = place
    v = holder[member]
    return v[index] if index is not None else v


def _put(place: Place, value: Any) -> None:
    holder, member, index = place
    if index is None:
        holder[member] = value
    else:
        holder[member][index] = value


def strip_html(text: str) -> str:
    """HTML tags out (``<br>`` becomes a line break), entities unescaped (as ``strip_html`` does in the
    converter)."""
    if "<" not in text and "&" not in text:
        return text
    return html.unescape(_TAG.sub("", _BR.sub("\n", text)))


def _text_ops(text: str, ops: tuple[tuple[str, Any], ...]) -> str:
    for op, arg in ops:
        if op == "strip-html":
            text = strip_html(text)
        elif op == "truncate":
            n: int = arg
            text = text[:n]
        else:  # map
            cmap: CodeMap = arg
            hit = cmap.get(text) or cmap.get(text.strip())
            if hit is not None:
                text = hit[1]
    return text


def _edit_value(place: Place, ops: tuple[tuple[str, Any], ...]) -> bool:
    """Apply the text operations (and ``map``) to one element, in order; True when it changed."""
    value = _get(place)
    holder, member, _ = place
    if isinstance(value, str):
        if member == "data" and str(holder.get("contentType", "")).startswith("text/"):
            # a text attachment: edited as its decoded text, decoded and encoded once for all the operations
            try:
                text = binascii.a2b_base64(value.encode("ascii"), strict_mode=True).decode("utf-8")
            except (binascii.Error, UnicodeError):
                return False
            new = _text_ops(text, ops)
            if new == text:
                return False
            data = new.encode("utf-8")
            _put(place, binascii.b2a_base64(data, newline=False).decode("ascii"))
            if "size" in holder:
                holder["size"] = len(data)
            holder.pop("hash", None)  # no longer the hash of this data
            return True
        new = _text_ops(value, ops)
        if new == value:
            return False
        _put(place, new)
        return True
    changed = False
    for op, arg in ops:
        if op == "map" and isinstance(value, dict):
            changed = _map_coding(value, arg) or changed
    return changed


def _map_coding(value: dict[str, Any], cmap: CodeMap) -> bool:
    """A Coding, or each coding of a CodeableConcept, whose code the table maps: system, code and display."""
    codings = value.get("coding") if "coding" in value else [value]
    changed = False
    for c in codings if isinstance(codings, list) else ():
        if isinstance(c, dict) and isinstance(c.get("code"), str):
            hit = cmap.get(c["code"])
            if hit is not None:
                c["system"], c["code"] = hit[0], hit[1]
                if hit[2]:
                    c["display"] = hit[2]
                changed = True
    return changed


# ---------------------------------------------------------------------------------------------- compiling
def check_fhirpath(expr: str) -> None:
    """``ValueError`` saying where ``expr`` is not FHIRPath (fhirpathpy's own parser recovers from syntax
    errors silently; this runs the same grammar with errors raised, and wants the whole text consumed)."""
    from antlr4 import CommonTokenStream, InputStream, Token
    from antlr4.error.ErrorListener import ErrorListener
    from fhirpathpy.parser import FHIRPathLexer, FHIRPathParser

    class _Raise(ErrorListener):
        def syntaxError(
            self, recognizer: Any, offending: Any, line: int, column: int, msg: str, e: Any
        ) -> None:
            raise ValueError(f"at character {column + 1}: {msg}")

    lexer = FHIRPathLexer(InputStream(expr))
    lexer.removeErrorListeners()
    lexer.addErrorListener(_Raise())
    stream = CommonTokenStream(lexer)
    parser = FHIRPathParser(stream)
    parser.removeErrorListeners()
    parser.addErrorListener(_Raise())
    parser.expression()
    nxt = stream.LT(1)
    if nxt.type != Token.EOF:
        raise ValueError(f"at character {nxt.start + 1}: unexpected {nxt.text!r}")


def compile_edit(spec: Any, index: int, ctx: StageContext) -> Edit:
    """One edit from YAML; ``ConfigError`` naming the channel, the step and what is wrong."""
    key = f"{ctx.key}.fhir-edits.edits[{index}]"

    def bad(what: str, hint: str, sub: str = "") -> ConfigError:
        return ConfigError(
            f"channel {ctx.channel!r}, step fhir-edits ({ctx.key}), edit {index + 1}: {what}",
            file=ctx.config_file,
            key=key + sub,
            hint=hint,
        )

    if not isinstance(spec, Mapping):
        raise bad("an edit must be a mapping", "write {select: <FHIRPath>, <operation>: ...}")
    select = spec.get("select")
    if not isinstance(select, str) or not select.strip():
        raise bad(
            "'select' is missing", "give a FHIRPath expression, e.g. DocumentReference.content", ".select"
        )
    import fhirpathpy

    try:
        check_fhirpath(select)
        fhirpathpy.compile(select)
    except Exception as exc:
        raise bad(
            f"select {select!r} is not a valid FHIRPath expression ({exc})",
            "check the expression, e.g. Patient.telecom.where(system = 'email')",
            ".select",
        ) from None
    steps: list[_Nav] = []
    resource_type: str | None = None
    for n, raw in enumerate(_split_steps(select.strip())):
        call = _CALL.match(raw)
        if _IDENT.match(raw):
            if n == 0 and raw[:1].isupper():
                resource_type = None if raw in ("Resource", "DomainResource") else raw
                continue
            steps.append(_Nav("member", raw))
        elif call is not None and call.group(1) == "where" and call.group(2).strip():
            crit = call.group(2)
            try:
                check_fhirpath(crit)
                steps.append(_Nav("where", crit, _fast(crit, fhirpathpy.compile(crit))))
            except Exception as exc:
                raise bad(
                    f"where({crit}) is not a valid FHIRPath expression: {exc}",
                    "check the criteria",
                    ".select",
                ) from None
        elif call is not None and call.group(1) == "ofType" and _IDENT.match(call.group(2).strip()):
            steps.append(_Nav("ofType", call.group(2).strip()))
        elif call is not None and call.group(1) == "first" and not call.group(2).strip():
            steps.append(_Nav("first"))
        else:
            raise bad(
                f"select step {raw!r} is not supported in an edit",
                "a selector navigates: member names, the resource type first, where(...), ofType(Type), first()",
                ".select",
            )
    if not steps:
        raise bad(
            f"select {select!r} selects whole resources",
            "select elements inside them, e.g. Patient.telecom",
            ".select",
        )
    ops: list[tuple[str, Any]] = []
    for name, arg in spec.items():
        if name == "select":
            continue
        if name not in OPERATIONS:
            raise bad(f"unknown operation {name!r}", "operations: " + ", ".join(OPERATIONS), f".{name}")
        if name in ("strip-html", "remove"):
            if arg is not True:
                raise bad(f"{name} takes true", f"write {name}: true", f".{name}")
        elif name == "truncate":
            if not isinstance(arg, int) or isinstance(arg, bool) or arg < 1:
                raise bad(
                    f"truncate {arg!r} is not a length",
                    "write a whole number of characters, e.g. 2000",
                    ".truncate",
                )
        elif name == "map":
            if not isinstance(arg, str):
                raise bad(
                    "map takes a code table file", "write map: table.csv (under transforms/maps/)", ".map"
                )
            try:
                arg = load_code_map(arg, ctx.base_dir, ctx.config_file, key + ".map")
            except ConfigError as exc:
                raise bad(exc.message, exc.hint or "check the code table", ".map") from None
        ops.append((name, arg))
    if not ops:
        raise bad("no operation", "add one of: " + ", ".join(OPERATIONS))
    if any(op in ("remove", "set") for op, _ in ops) and len(ops) > 1:
        raise bad("remove and set stand alone", "write them as edits of their own")
    return Edit(select.strip(), resource_type, tuple(steps), tuple(ops))


@transform("fhir-edits")
def make(options: Mapping[str, Any], ctx: StageContext) -> Step:
    """Step factory: every edit compiled once per channel; then, per message, the Bundle edited in place."""
    extra = set(options) - {"edits"}
    if extra:
        raise ConfigError(
            f"channel {ctx.channel!r}, step fhir-edits ({ctx.key}): unknown option {sorted(extra)[0]!r}",
            file=ctx.config_file,
            key=f"{ctx.key}.fhir-edits",
            hint="the step takes edits: [{select: ..., <operation>: ...}, ...]",
        )
    specs = options.get("edits")
    if not isinstance(specs, list) or not specs:
        raise ConfigError(
            f"channel {ctx.channel!r}, step fhir-edits ({ctx.key}): 'edits' must be a non-empty list",
            file=ctx.config_file,
            key=f"{ctx.key}.fhir-edits.edits",
            hint="write edits: [{select: <FHIRPath>, strip-html: true}, ...]",
        )
    edits = tuple(compile_edit(s, i, ctx) for i, s in enumerate(specs))

    def step(work: Work) -> Work:
        if work.content_type != FHIR_JSON:
            raise ConfigError(
                "fhir-edits needs a FHIR Bundle: put it after hl7-to-fhir",
                file=ctx.config_file,
                key=f"{ctx.key}.fhir-edits",
            )
        bundle = exactjson.loads(work.payload)  # long decimals keep their digits (engine/exactjson.py)
        changed = 0
        for entry in bundle.get("entry", ()):
            res = entry.get("resource")
            if isinstance(res, dict):
                for e in edits:
                    changed += e.apply(res)
        if not changed:
            return work
        facts = dict(work.facts)
        events = dict(facts.get("events", {}))
        events["edit_applied"] = events.get("edit_applied", 0) + changed
        facts["events"] = events
        return replace(work, payload=exactjson.dumps(bundle), facts=facts)

    return step
