"""The channel file's schema, read from the loader itself: ``sluice config schema``.

The loader (engine/config/) is the only definition of a channel file.  To describe it, this module
loads example channels covering every section with ``engine.config.reader.RECORDER`` set, which notes
each key the loader reads with its kind (text, integer, number, boolean, list, mapping), its default and its allowed
values.  From that come a JSON Schema (for editors) and docs/channel-reference.md, whose "meaning"
column is taken from the Channel files table of docs/configuration.md; tests/test_channel_reference.py
fails when a key has no meaning there or when the reference on disk is not what this generates.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROUTES = """
store: sqlite:///{tmp}/schema.db
destinations:
  out: {kind: file, directory: out}
"""

MLLP_CHANNEL = """
name: lab
enabled: true
source:
  kind: mllp
  host: 127.0.0.1
  port: 2599
  max_connections: 1000
  max_connections_per_peer: 0
  idle_timeout: 300
  frame_timeout: 30
  handshake_timeout: 10
  max_frame: 16MiB
  max_junk: 1MiB
  lenient_end: false
  fallback_charset: latin-1
  utf8_fallback: true
  keepalive: true
  tls: {cert: server.crt, key: server.key, ca: ca.crt, require_client_cert: true}
accept: {types: {ORU: [R01]}, versions: ["2.5.1"], processing_ids: [P]}
site_tz: America/Los_Angeles
ack: on-commit
require: [PID-3]
filter: {field: MSH-11, equals: P}
dedupe: {enabled: true, window_days: 7, on_conflict: reject}
retention: {bodies_days: 30, rows_days: 365}
order_by: PID-3
batch: accept
validate: "off"
strictness: lenient
transform: [passthrough]
routes:
  - destination: out
    filter: {field: OBX-11, equals: F}
"""

ALIAS_CHANNEL = """
name: alias
source: {port: 2598, max_frame_bytes: 1MiB}
"""

POLL_CHANNEL = """
name: portal
source:
  kind: fhir-poll
  base_url: http://127.0.0.1:8089/fhir
  resources: [Appointment]
  params: {status: booked}
  interval: 30
  overlap: 60
  page_size: 100
  timeout: 30
  auth: {type: bearer, token: {env: SLUICE_SCHEMA_UNUSED}}
  tls: {verify: true}
routes:
  - destination: out
"""

HTTP_CHANNEL = """
name: web
source:
  kind: http
  host: 127.0.0.1
  port: 8443
  path: /fhir
  resources: [Appointment]
  max_body: 16MiB
  max_backlog: 5000
  fetch:
    base_url: http://127.0.0.1:8089/fhir
    resources: [Appointment]
    params: {status: booked}
    overlap: 60
    page_size: 100
    timeout: 30
    auth: {type: bearer, token: {env: SLUICE_SCHEMA_UNUSED}}
    tls: {verify: true}
routes:
  - destination: out
"""

# What the recorder cannot see: keys read as raw values, and defaults decided elsewhere.
_KIND = {
    "source.max_frame": "size",
    "source.max_frame_bytes": "size",
    "source.max_junk": "size",
    "source.max_body": "size",
    "accept.types": "mapping or list",
    "filter": "filter",
    "routes[].filter": "filter",
    "routes[].destination": "text",
    "source.params": "mapping",
    "source.auth": "mapping",
    "source.tls": "mapping",
    "source.fetch.params": "mapping",
    "source.fetch.auth": "mapping",
    "source.fetch.tls": "mapping",
    "transform": "list of steps",
}
_DEFAULT = {
    "name": "the file name without `.yaml`",
    "source.port": "`2575` (`http`: `8443`)",
    "source.max_frame": "`16MiB`",
    "source.max_frame_bytes": "`16MiB`",
    "source.max_junk": "`1MiB`",
    "source.max_body": "`16MiB`",
    "source.fetch.resources": "the source's `resources`",
    "accept.types": "the types and triggers the converter handles ([configuration.md](configuration.md#channel-files))",
    "accept.versions": "`2.1` … `2.8.2`",
    "accept.processing_ids": "`[P, T, D]`",
}


@dataclass(frozen=True)
class Key:
    path: str
    kind: str
    default: Any
    choices: tuple[str, ...] | None


def _normalise(path: str) -> str:
    return re.sub(r"\[\d+\]", "[]", path)


def channel_keys() -> list[Key]:
    """Every key the loader reads in a channel file, in the order it reads them."""
    from engine import config
    from engine.config import reader

    found: dict[str, Key] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "channels").mkdir()
        (base / "routes.yaml").write_text(ROUTES.replace("{tmp}", tmp), encoding="utf-8")
        for name, text in (
            ("lab", MLLP_CHANNEL),
            ("alias", ALIAS_CHANNEL),
            ("portal", POLL_CHANNEL),
            ("web", HTTP_CHANNEL),
        ):
            (base / "channels" / f"{name}.yaml").write_text(text, encoding="utf-8")
        recorded: dict[tuple[str, str], dict[str, Any]] = {}
        reader.RECORDER = recorded
        try:
            config.load(base / "routes.yaml")
        finally:
            reader.RECORDER = None
        routes_file = str(base / "routes.yaml")
        for (file, path), entry in recorded.items():
            if file == routes_file:
                continue
            p = _normalise(path)
            if p in found and found[p].kind != "any":
                continue
            kind = _KIND.get(p, entry["kind"])
            found[p] = Key(p, kind, entry["default"], entry["choices"])
    # children right after their parent: by the top-level key's first appearance, then as read
    keys = list(found.values())
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k.path.split(".")[0].removesuffix("[]"), i)
    return sorted(keys, key=lambda k: (first[k.path.split(".")[0].removesuffix("[]")], keys.index(k)))


def json_schema() -> dict[str, Any]:
    """A JSON Schema (2020-12) of a channel file, for editors (yaml-language-server)."""
    types = {
        "text": "string",
        "integer": "integer",
        "number": "number",
        "boolean": "boolean",
        "list": "array",
        "mapping": "object",
        "size": ["integer", "string"],
    }
    root: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Sluice channel file",
        "type": "object",
        "additionalProperties": False,
        "properties": {},
    }
    for key in channel_keys():
        node = root
        parts = key.path.split(".")
        for part in parts[:-1]:
            is_list = part.endswith("[]")
            part = part.removesuffix("[]")
            child = node["properties"].setdefault(part, {"type": "object", "properties": {}})
            if is_list:
                child.pop("properties", None)
                child["type"] = "array"
                child.setdefault("items", {"type": "object", "properties": {}})
                node = child["items"]
            else:
                node = child
            node.setdefault("properties", {})
        leaf = parts[-1].removesuffix("[]")
        spec: dict[str, Any] = node["properties"].setdefault(leaf, {})
        t = types.get(key.kind)
        if t is not None and "properties" not in spec:
            spec["type"] = t
        if key.choices:
            spec["enum"] = list(key.choices)
        if key.default not in (None, [], "") and isinstance(key.default, str | int | float | bool):
            spec["default"] = key.default
    return root


_ROW = re.compile(r"^\| `([^`]+)` \| (.*)$", re.M)


def meanings(configuration_md: str) -> dict[str, str]:
    """Key → meaning, from the "Channel files" table of docs/configuration.md."""
    start = configuration_md.index("## Channel files")
    end = configuration_md.find("\n## ", start + 1)
    section = configuration_md[start : end if end != -1 else None]
    sub = section.find("\n### ")
    own = section[: sub if sub != -1 else None]
    out: dict[str, str] = {}
    for m in _ROW.finditer(own):
        cells = m.group(2).rstrip().removesuffix("|")
        _default, _, meaning = cells.partition("|")
        out[m.group(1)] = meaning.strip()
    return out


class Undocumented(Exception):
    """Keys the loader reads that have no meaning in docs/configuration.md."""


def _fmt_default(key: Key) -> str:
    if key.path in _DEFAULT:
        return _DEFAULT[key.path]  # said in words (it is decided elsewhere)
    d = key.default
    if d is None or d == []:
        return ""
    if isinstance(d, bool):
        return f"`{str(d).lower()}`"
    if isinstance(d, float) and d.is_integer():
        return f"`{int(d)}`"
    return f"`{d}`"


def markdown(meaning: Mapping[str, str]) -> str:
    """docs/channel-reference.md."""
    from engine import registry

    keys = channel_keys()
    missing = [k.path for k in keys if k.path not in meaning]
    if missing:
        raise Undocumented(
            "channel keys without a meaning: "
            + ", ".join(missing)
            + " (add a row for each to the Channel files table of docs/configuration.md)"
        )
    registry.load_builtins()
    lines = [
        "# Channel file reference",
        "",
        "<!-- generated by `sluice config schema --markdown docs/channel-reference.md`: do not edit by hand -->",
        "",
        "Every key of a channel file (`channels/<name>.yaml`), as the loader (`engine/config/`) reads it:",
        "its type, its default and its allowed values come from the loader itself, its meaning from",
        "[configuration.md](configuration.md#channel-files). `tests/test_channel_reference.py` fails when a",
        "key the loader reads has no meaning there or when this file is stale; regenerate it with",
        "`sluice config schema --markdown docs/channel-reference.md`. `sluice config schema` prints the same",
        "as a JSON Schema for editors. Writing a channel: [channels.md](channels.md).",
        "",
        "| key | type | default | allowed | meaning |",
        "|---|---|---|---|---|",
    ]
    for k in keys:
        allowed = ", ".join(f"`{c}`" for c in k.choices) if k.choices else ""
        lines.append(f"| `{k.path}` | {k.kind} | {_fmt_default(k)} | {allowed} | {meaning[k.path]} |")
    lines += [
        "",
        "## Transform steps and filters",
        "",
        "The names a channel's `transform` and `filter` (and a route's `filter`) can use: the built-ins, as "
        "registered (`engine/registry.py`); a plugin adds its own. Their options: "
        "[channels.md](channels.md).",
        "",
        "| transform step | | filter |",
        "|---|---|---|",
    ]
    # the built-ins only: a plugin registered in this process (a test's, a site's) is not Sluice's reference
    steps = sorted(n for n, f in registry.TRANSFORMS.items() if _builtin(f))
    filters = sorted(n for n, f in registry.FILTERS.items() if _builtin(f))
    for i in range(max(len(steps), len(filters))):
        s = f"`{steps[i]}`" if i < len(steps) else ""
        f = f"`{filters[i]}`" if i < len(filters) else ""
        lines.append(f"| {s} | | {f} |")
    return "\n".join(lines) + "\n"


def _builtin(factory: Any) -> bool:
    """A step or filter Sluice itself registers (defined under engine/ or transforms/)."""
    module = getattr(factory, "__module__", "") or ""
    return module.split(".", 1)[0] in ("engine", "transforms")
