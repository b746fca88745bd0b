"""The docs match the code: every command, option, config key and environment variable is documented,
and nothing is documented that the code does not have.

* docs/cli.md: walks the click command tree of ``engine.cli`` (every command, subcommand, option,
  argument and choice) and looks for each in that command's own section.
* docs/configuration.md: loads a config that opens every section while recording each key path the loader
  reads (``engine.config._Section.get``, which every typed accessor goes through), plus a static scan of
  the key names in engine/config/ for sections the test config does not open; the ``hl7-to-fhir``
  options (``ConvertSettings`` fields) and the ``SLUICE_*`` environment variables the code reads.
* docs/destinations.md and docs/channels.md: every registered destination kind's options, transform step
  and filter.

Each failure names what is missing and the file (and section) to document it in.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from engine import config as config_mod
from engine import registry
from engine.cli import main
from transforms.settings import ConvertSettings

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CLI_DOC = DOCS / "cli.md"
CONFIG_DOC = DOCS / "configuration.md"
ENGINE = ROOT / "engine"

_HEADING = re.compile(r"^(#{1,6}) ", re.M)
_CMD_HEADING = re.compile(r"^#{1,6} `(sluice(?: [a-z0-9][a-z0-9-]*)*)`", re.M)
_ROW_KEY = re.compile(r"^\| `([^`]+)`", re.M)


def _mentions(text: str, word: str) -> bool:
    """``word`` appears as a whole token (``--limit`` is not found in ``--limit-rate``)."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def _sections(text: str, pattern: re.Pattern[str]) -> dict[str, str]:
    """Heading match → the text under it, up to the next heading of the same or a higher level."""
    out: dict[str, str] = {}
    for m in pattern.finditer(text):
        level = len(text[m.start() : text.index(" ", m.start())])
        end = len(text)
        for h in _HEADING.finditer(text, m.end()):
            if len(h.group(1)) <= level:
                end = h.start()
                break
        out[m.group(1)] = text[m.start() : end]
    return out


def _section(text: str, title: str) -> str:
    """The text under the heading whose title is exactly ``title`` (any level)."""
    found = _sections(text, re.compile(rf"^#{{1,6}} ({re.escape(title)})\s*$", re.M))
    assert title in found, f"heading {title!r} is gone from the doc this test reads"
    return found[title]


def _table_keys(section: str) -> list[str]:
    """First-column keys of the section's own tables (up to its first sub-heading)."""
    sub = _HEADING.search(section, 1)
    own = section[: sub.start()] if sub else section
    return _ROW_KEY.findall(own)


def _report(problems: list[str]) -> str:
    return "\n".join(["", *problems])


# ---------------------------------------------------------------------------------------------- CLI


def _commands(cmd: click.Command, path: str) -> Iterator[tuple[str, click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _commands(sub, f"{path} {name}")


def test_every_command_option_and_choice_is_in_cli_md() -> None:
    sections = _sections(CLI_DOC.read_text(), _CMD_HEADING)
    problems: list[str] = []
    for path, cmd in _commands(main, "sluice"):
        section = sections.get(path)
        if section is None:
            problems.append(f"command `{path}` has no section: add a heading '## `{path}`' to docs/cli.md")
            continue
        where = f"docs/cli.md, section `{path}`"
        for p in cmd.params:
            if isinstance(p, click.Argument):
                name = p.human_readable_name
                if not _mentions(section, name):
                    problems.append(f"argument {name} of `{path}` is not documented: add it to {where}")
                continue
            for opt in (*p.opts, *p.secondary_opts):
                if not _mentions(section, opt):
                    problems.append(f"option {opt} of `{path}` is not documented: add it to {where}")
            if isinstance(p.type, click.Choice):
                for choice in p.type.choices:
                    if not _mentions(section, f"`{choice}`") and not _mentions(section, str(choice)):
                        problems.append(
                            f"value {choice!r} of `{path} {p.opts[0]}` is not documented: add it to {where}"
                        )
    documented = set(sections)
    real = {path for path, _ in _commands(main, "sluice")}
    for gone in sorted(documented - real):
        problems.append(f"docs/cli.md documents `{gone}`, which is no command: remove or rename its section")
    assert not problems, _report(problems)


# ------------------------------------------------------------------------------------- config keys

ROUTES_YAML = """
store: sqlite:///{tmp}/sluice.db
store_encryption: {{key_file: store.keys}}
node_id: node-a
channels: channels/*.yaml
logging: {{format: json, level: info, flood: {{per_peer: 10, per_kind: 100, window: 10}}}}
limits: {{inflight_bytes: 128MiB, connection_inflight_bytes: 32MiB, connection_frames: 32, unsent_ack_bytes: 64KiB,
          batch_bytes: 16MiB}}
processing: {{workers: 0}}
plugin_paths: []
plugins: []
admin:
  metrics_auth: false
  tls: {{cert: admin.crt, key: admin.key}}
  oidc: {{issuer: "https://idp.test", audience: sluice, jwks_url: "http://127.0.0.1/jwks", roles_claim: roles,
          role_map: {{ops: operator}}, leeway: 30}}
destinations:
  out:
    kind: file
    directory: out
    retry: {{max_attempts: 3, backoff: 1, max_backoff: 10, jitter: 0.1}}
    on_failure: block
    lanes: 2
"""

CHANNEL_YAML = """
name: lab
source:
  port: 2599
  max_connections_per_peer: 10
  handshake_timeout: 5
  max_frame_bytes: 1MiB
  tls: {cert: server.crt, key: server.key, ca: ca.crt, require_client_cert: true}
accept: {types: {ORU: [R01]}}
require: [PID-3]
dedupe: {window_days: 1}
retention: {bodies_days: 30, rows_days: 365}
order_by: PID-3
transform: [hl7-to-fhir]
routes:
  - destination: out
    filter: {field: OBX-11, equals: F}
"""

# A second channel: the fhir-poll source's keys (docs/writeback.md)
POLL_CHANNEL_YAML = """
name: portal
source:
  kind: fhir-poll
  base_url: http://127.0.0.1:8089/fhir
  resources: [Appointment]
  params: {status: booked}
  interval: 2
  overlap: 30
  page_size: 50
  timeout: 10
  auth: {type: bearer, token: t}
  tls: {verify: false}
transform:
  - fhir-to-hl7: {sending_application: SLUICE, sending_facility: PORTAL, placer_system: "urn:portal:appointment"}
routes:
  - destination: out
"""

# A third: the http source's keys
HTTP_CHANNEL_YAML = """
name: push
source:
  kind: http
  host: 127.0.0.1
  port: 8443
  path: /fhir
  resources: [Appointment]
  auth: {type: bearer, token: {env: PUSH_TOKEN}}
  max_body: 1MiB
  max_backlog: 100
  fetch:
    base_url: http://127.0.0.1:8089/fhir
    resources: [Appointment]
    params: {status: booked}
    overlap: 60
    page_size: 50
    timeout: 10
    auth: {type: bearer, token: {env: PUSH_FETCH_TOKEN}}
    tls: {verify: true}
transform: [fhir-to-hl7]
routes:
  - destination: out
"""


def _normalise(key: str) -> str:
    key = re.sub(r"\[\d+\]", "[]", key)
    return re.sub(r"^destinations\.[^.]+", "destinations.<name>", key)


@pytest.fixture
def keys_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    """Key paths the loader reads, by file kind: ``routes`` (routes.yaml) and ``channel``."""
    (tmp_path / "channels").mkdir()
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES_YAML.format(tmp=tmp_path))
    (tmp_path / "channels" / "lab.yaml").write_text(CHANNEL_YAML)
    (tmp_path / "channels" / "portal.yaml").write_text(POLL_CHANNEL_YAML)
    (tmp_path / "channels" / "push.yaml").write_text(HTTP_CHANNEL_YAML)
    for pem in (
        "server.crt",
        "server.key",
        "ca.crt",
    ):  # the listener's TLS files must exist (relative: the cwd)
        (tmp_path / pem).write_text("pem")
    monkeypatch.chdir(tmp_path)
    seen: dict[str, set[str]] = {"routes": set(), "channel": set()}
    real_get = config_mod._Section.get

    def recording_get(self: config_mod._Section, k: str, default: object = None) -> object:
        seen["routes" if self.file == str(routes) else "channel"].add(_normalise(self.key(k)))
        return real_get(self, k, default)

    monkeypatch.setattr(config_mod._Section, "get", recording_get)
    config_mod.load(routes)
    return seen


def _static_key_names() -> set[str]:
    """Every literal key name engine/config/ reads from a section: ``sec.text("host")``, ``t.flag(...)``,
    ``sec.data.get("tls")``, where ``sec`` is a ``_Section`` (a parameter annotated so, or a variable bound to
    ``_Section(...)`` or ``<section>.sub(...)``)."""
    tree = ast.Module(
        body=[
            stmt for f in sorted((ENGINE / "config").glob("*.py")) for stmt in ast.parse(f.read_text()).body
        ],
        type_ignores=[],
    )
    sections: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.arg)
            and isinstance(node.annotation, ast.Name)
            and node.annotation.id == "_Section"
        ):
            sections.add(node.arg)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            f = node.value.func
            if (isinstance(f, ast.Name) and f.id == "_Section") or (
                isinstance(f, ast.Attribute) and f.attr == "sub"
            ):
                sections.update(t.id for t in node.targets if isinstance(t, ast.Name))

    def is_section(expr: ast.expr) -> bool:
        if isinstance(expr, ast.Attribute) and expr.attr == "data":
            expr = expr.value
        return isinstance(expr, ast.Name) and expr.id in sections

    names: set[str] = set()
    readers = {"get", "has", "text", "integer", "number", "flag", "items", "sub"}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in readers
            and is_section(node.func.value)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    assert {"host", "port", "window_days"} <= names, "the scan no longer finds the loader's keys"
    return names


def test_every_config_key_is_in_configuration_md(keys_read: dict[str, set[str]]) -> None:
    doc = CONFIG_DOC.read_text()
    documented = {
        "routes": set(_table_keys(_section(doc, "routes.yaml"))),
        "channel": set(_table_keys(_section(doc, "Channel files"))),
    }
    title = {"routes": "routes.yaml", "channel": "Channel files"}
    problems: list[str] = []
    for kind in ("routes", "channel"):
        for key in sorted(keys_read[kind] - documented[kind]):
            problems.append(
                f"{title[kind]} key `{key}` is read by engine/config/ but not documented: add a row "
                f"'| `{key}` | default | meaning |' to docs/configuration.md, section '{title[kind]}'"
            )
        for key in sorted(documented[kind] - keys_read[kind]):
            problems.append(
                f"docs/configuration.md ('{title[kind]}') documents `{key}`, which the loader does not read: "
                "remove it, or if it is a key of a section this test's config leaves out, open that section "
                "in ROUTES_YAML/CHANNEL_YAML of tests/test_docs.py"
            )
    leaves = {k.rsplit(".", 1)[-1].removesuffix("[]") for kind in documented.values() for k in kind}
    for name in sorted(_static_key_names() - leaves):
        problems.append(
            f"engine/config/ reads a key {name!r} that no row of docs/configuration.md ends with: document "
            "its full path there (and open its section in ROUTES_YAML/CHANNEL_YAML of tests/test_docs.py)"
        )
    assert not problems, _report(problems)


def test_every_hl7_to_fhir_option_is_in_configuration_md() -> None:
    section = _section(CONFIG_DOC.read_text(), "`hl7-to-fhir` step options")
    documented = set(_table_keys(section))
    options = {f.name for f in dataclasses.fields(ConvertSettings)}
    problems = [
        f"hl7-to-fhir option `{o}` (transforms/settings.py ConvertSettings) is not documented: add a row to "
        "docs/configuration.md, section '`hl7-to-fhir` step options'"
        for o in sorted(options - documented)
    ] + [
        f"docs/configuration.md documents hl7-to-fhir option `{o}`, which ConvertSettings does not have"
        for o in sorted(documented - options)
    ]
    assert not problems, _report(problems)


def test_every_fhir_to_hl7_option_is_in_configuration_md() -> None:
    from transforms.fhir_to_v2.settings import WritebackSettings

    section = _section(CONFIG_DOC.read_text(), "`fhir-to-hl7` step options")
    documented = set(_table_keys(section))
    options = {f.name for f in dataclasses.fields(WritebackSettings)}
    problems = [
        f"fhir-to-hl7 option `{o}` (transforms/fhir_to_v2/settings.py) is not documented: add a row to "
        "docs/configuration.md, section '`fhir-to-hl7` step options'"
        for o in sorted(options - documented)
    ] + [
        f"docs/configuration.md documents fhir-to-hl7 option `{o}`, which WritebackSettings does not have"
        for o in sorted(documented - options)
    ]
    assert not problems, _report(problems)


def _env_vars_read() -> set[str]:
    """``SLUICE_*`` names the code reads: whole string literals, ``ENV_PREFIX + "NAME"`` and click envvars."""
    names: set[str] = set()
    whole = re.compile(r"SLUICE_[A-Z0-9_]*[A-Z0-9]")
    for path in ENGINE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and whole.fullmatch(node.value):
                names.add(node.value)
            if (
                isinstance(node, ast.BinOp)
                and isinstance(node.left, ast.Name)
                and node.left.id == "ENV_PREFIX"
                and isinstance(node.right, ast.Constant)
                and isinstance(node.right.value, str)
            ):
                names.add(f"{config_mod.ENV_PREFIX}{node.right.value}")
    for _, cmd in _commands(main, "sluice"):
        for p in cmd.params:
            envvar = getattr(p, "envvar", None)
            if isinstance(envvar, str):
                names.add(envvar)
    return names


def test_every_environment_variable_is_in_configuration_md() -> None:
    section = _section(CONFIG_DOC.read_text(), "Environment variables")
    documented = set(_table_keys(section))
    read = _env_vars_read()
    problems = [
        f"environment variable {v} is read by the code but not documented: add a row to "
        "docs/configuration.md, section 'Environment variables'"
        for v in sorted(read - documented)
    ] + [
        f"docs/configuration.md documents {v}, which no code reads: remove it"
        for v in sorted(documented - read)
    ]
    assert not problems, _report(problems)


# ----------------------------------------------------------------- destination kinds, steps, filters


def test_every_destination_option_step_and_filter_is_documented() -> None:
    registry.load_builtins()
    dest_doc = (DOCS / "destinations.md").read_text()
    kinds = _sections(dest_doc, re.compile(r"^#{1,6} `kind: ([a-z0-9_-]+)`", re.M))
    problems: list[str] = []
    for kind, cls in sorted(registry.DESTINATIONS.items()):
        if cls.__module__.split(".")[0] not in ("engine", "transforms"):
            continue  # a test's plugin, not a built-in
        section = kinds.get(kind)
        if section is None:
            problems.append(
                f"destination kind {kind!r} has no section: add '## `kind: {kind}`' to docs/destinations.md"
            )
            continue
        for option in sorted(cls.options):
            if not _mentions(section, f"`{option}`"):
                problems.append(
                    f"option {option!r} of the {kind} destination is not documented: add it to "
                    f"docs/destinations.md, section '`kind: {kind}`'"
                )
    channels_doc = (DOCS / "channels.md").read_text()
    for what, names in (("transform step", registry.TRANSFORMS), ("filter", registry.FILTERS)):
        for name in sorted(names):
            if names[name].__module__.split(".")[0] not in ("engine", "transforms"):
                continue
            if not _mentions(channels_doc, name):
                problems.append(f"built-in {what} {name!r} is not documented: add it to docs/channels.md")
    assert not problems, _report(problems)
