"""``sluice reload`` and ``sluice config show``: live reload and environments from the command line.

``reload`` validates the files here first (an invalid config is reported and nothing is sent), then asks
the running engine to apply them: through the admin API (``POST /api/v1/reload``) when it has a token,
else with SIGHUP to the pid in ``pid_file``; the engine's answer to a signal is read back from the audit
trail, so either way the command says what changed or why nothing did, and exits 1 when nothing did.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import click
import yaml

from engine.clioptions import config_option
from engine.errors import ConfigError, SluiceError
from engine.redact import printable


def env_option() -> Any:
    return click.option(
        "--env",
        "env",
        envvar="SLUICE_ENV",
        help="Environment: merge routes.<ENV>.yaml over routes.yaml (default: SLUICE_ENV).",
    )


def load(config_path: str, env: str | None) -> Any:
    from engine import config as cfgmod

    try:
        return cfgmod.load(config_path, env=env or None)
    except ConfigError as exc:
        raise click.ClickException(f"config error: {exc}") from exc


def validate(cfg: Any) -> None:
    """What ``sluice check`` builds: destinations, every channel's pipeline, alert sinks, the key ring."""
    from engine import keyring, registry
    from engine.processing import ChannelRuntime
    from engine.server import build_destinations

    try:
        registry.load_plugins(cfg.plugin_paths, cfg.plugins, cfg.base_dir)
        build_destinations(cfg)
        for ch in cfg.channels:
            ChannelRuntime(cfg, ch, store=None)
        if cfg.alerts.active:
            from engine.alerts.sinks import build_sinks

            build_sinks(cfg.alerts)
        keyring.from_config(cfg)
    except ConfigError as exc:
        raise click.ClickException(f"config error: {exc}") from exc


# ---------------------------------------------------------------------------------------------- reload


@click.command()
@config_option
@env_option()
@click.option(
    "--token",
    envvar="SLUICE_TOKEN",
    help="Admin API token (role admin): reload through POST /api/v1/reload. Without one: SIGHUP.",
)
@click.option("--url", help="Admin API base URL (default: from admin.host and admin.port of the config).")
@click.option("--pid", type=int, help="Engine process id for SIGHUP (default: read from pid_file).")
@click.option("--timeout", default=20.0, show_default=True, help="Seconds to wait for the engine's answer.")
def reload(
    config_path: str, env: str | None, token: str | None, url: str | None, pid: int | None, timeout: float
) -> None:
    """Apply the changed config to the running engine without dropping connections.

    The files are validated first; an invalid config is reported and the engine is not asked.  Exit 0
    when the engine applied it, 1 when it refused (the running config is then unchanged).
    """
    cfg = load(config_path, env)
    validate(cfg)
    if token:
        _reload_by_api(cfg, url, token, timeout)
    else:
        _reload_by_signal(cfg, pid, timeout)


def _admin_url(cfg: Any) -> str:
    a = cfg.admin
    host = "127.0.0.1" if a.host in ("0.0.0.0", "::", "") else a.host
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if a.tls_cert else 'http'}://{host}:{a.port}"


def _reload_by_api(cfg: Any, url: str | None, token: str, timeout: float) -> None:
    import httpx

    base = (url or _admin_url(cfg)).rstrip("/")
    try:
        resp = httpx.post(
            f"{base}/api/v1/reload",
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        raise click.ClickException(
            f"no answer from the admin API at {base}: {type(exc).__name__} "
            "(is the engine running? pass --url, or leave out --token to signal it by its pid)"
        ) from None
    try:
        body = resp.json()
    except ValueError:
        body = {}
    if resp.status_code == 200:
        click.echo(f"reloaded: {printable(body.get('summary', ''))}")
        return
    message = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else None
    raise click.ClickException(
        f"the engine did not reload (HTTP {resp.status_code}): {printable(message or resp.text[:300])}"
    )


def _reload_by_signal(cfg: Any, pid: int | None, timeout: float) -> None:
    from engine import reload as reload_mod
    from engine.admin import audit
    from engine.cli import _open_store

    pid = pid or reload_mod.read_pid(cfg.pid_file)
    if pid is None:
        raise click.ClickException(
            f"no running engine found: {cfg.pid_file or 'pid_file'} is missing "
            "(start it with sluice run, pass --pid, or use the admin API with --token)"
        )
    store = _open_store(cfg)
    before = audit.entries(store, action=audit.CONFIG_RELOAD, limit=1)
    last = before[0].id if before else 0
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise click.ClickException(
            f"no process {pid} (from {cfg.pid_file}): the engine is not running; start it with sluice run"
        ) from None
    except PermissionError:
        raise click.ClickException(
            f"not allowed to signal process {pid}: run as the engine's user, or use --token"
        ) from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [r for r in audit.entries(store, action=audit.CONFIG_RELOAD, limit=5) if r.id > last]
        if rows:
            detail = dict(rows[-1].detail)
            if detail.pop("ok", False):
                from engine.reload import Plan

                plan = Plan(**{k: tuple(v) for k, v in detail.items() if k in Plan.__dataclass_fields__})
                click.echo(f"reloaded: {plan.describe()}")
                return
            raise click.ClickException(
                f"the engine did not reload: {printable(detail.get('error', 'no reason recorded'))}"
            )
        time.sleep(0.1)
    raise click.ClickException(
        f"sent SIGHUP to {pid} but saw no reload in the audit trail within {timeout:g}s; "
        "look at the engine's log (event config_reload_failed) or sluice audit list --action config.reload"
    )


# ---------------------------------------------------------------------------------------------- config


@click.group("config")
def config_group() -> None:
    """The merged configuration (environments) and its reference."""


@config_group.command("show")
@config_option
@env_option()
def config_show(config_path: str, env: str | None) -> None:
    """Print the merged config (routes.yaml + routes.<ENV>.yaml, channels with their overrides) as YAML,
    secrets masked. Validates it first (exit 1 with the error when invalid)."""
    from pathlib import Path

    from engine import overlays
    from engine.config import _with_overlay

    cfg = load(config_path, env)
    try:
        routes = _with_overlay(Path(config_path), cfg.env) or {}
        overrides = routes.pop("channel_overrides", None) or {}
        channels: dict[str, Any] = {}
        for ch in cfg.channels:
            data = yaml.safe_load(Path(ch.file).read_text(encoding="utf-8")) or {}
            name = str(data.get("name") or ch.name)
            if name in overrides:
                data = overlays.deep_merge(data, overrides[name])
            channels[name] = data
    except (OSError, SluiceError, yaml.YAMLError) as exc:
        raise click.ClickException(f"config error: {exc}") from exc
    if "store" in routes or os.environ.get("SLUICE_STORE"):
        routes["store"] = cfg.store_url  # what the engine would open (SLUICE_STORE wins)
    out = {
        "environment": cfg.env or "(none)",
        "files": [cfg.file] + ([str(overlays.overlay_path(Path(cfg.file), cfg.env))] if cfg.env else []),
        "routes": overlays.masked(routes),
        "channels": overlays.masked(channels),
    }
    click.echo(printable(yaml.safe_dump(out, sort_keys=False, allow_unicode=True), keep="\n"))


# ---------------------------------------------------------------------------------------------- maps


@click.group("maps")
def maps_group() -> None:
    """Code, location and provider maps: coverage of what the senders actually send."""


@maps_group.command("check")
@config_option
@env_option()
@click.option(
    "--channel", help="Only this channel (default: every enabled channel with an hl7-to-fhir step)."
)
@click.option(
    "--since",
    default="30d",
    show_default=True,
    help="Messages received after this (30d, 12h, or an ISO time).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--no-header", is_flag=True, help="Leave out the header row (for scripts).")
def maps_check(
    config_path: str, env: str | None, channel: str | None, since: str, as_json: bool, no_header: bool
) -> None:
    """List the values seen in stored messages that no code, location or provider map covers.

    Per channel and sending facility (MSH-4): PV1-3 locations, PV1-7/PV1-17 providers, OBX-3 local codes
    and every field the channel's code_maps name, with counts and first/last seen.  Exit 0 either way;
    prints codes and ids only, never patient data.
    """
    import json as jsonmod

    from engine import mapcoverage
    from engine.cli import _fmt_time, _open_store, _parse_time, _row

    cfg = load(config_path, env)
    try:
        chosen = [cfg.channel(channel)] if channel else [c for c in cfg.channels if c.enabled]
        maps = {ch.name: mapcoverage.channel_maps(cfg, ch) for ch in chosen}
        systems = {ch.name: mapcoverage.channel_systems(cfg, ch) for ch in chosen}
    except ConfigError as exc:
        raise click.ClickException(f"config error: {exc}") from exc
    after = _parse_time(since)
    store = _open_store(cfg)
    total = 0
    header = ("channel", "facility", "field", "kind", "value", "system", "count", "first_seen", "last_seen")
    if not as_json and not no_header:
        click.echo(_row(*header))
    for ch in chosen:
        cov = mapcoverage.check(
            mapcoverage.scan(store, ch.name, after),
            maps[ch.name],
            ch.source.fallback_charset,
            systems[ch.name],
        )
        for g in cov.gaps():
            total += 1
            if as_json:
                click.echo(jsonmod.dumps({"channel": ch.name, **g.as_dict()}))
            else:
                click.echo(
                    _row(ch.name, g.facility or "-", g.field, g.kind, g.value, g.system or "-", g.count,
                         _fmt_time(g.first_seen), _fmt_time(g.last_seen))
                )  # fmt: skip
        known = ", ".join(sorted(maps[ch.name])) or "none"
        click.echo(
            f"{ch.name}: {cov.messages} message(s) since {_fmt_time(after)}; maps: {printable(known)}; "
            f"{len(cov.gaps())} value(s) not covered",
            err=True,
        )
    if total == 0:
        click.echo("every value seen is covered by a map (or uses a standard code system)", err=True)


@config_group.command("schema")
@click.option(
    "--markdown",
    "markdown_out",
    type=click.Path(dir_okay=False),
    help="Write the channel reference (Markdown) to this file instead, e.g. docs/channel-reference.md.",
)
@click.option(
    "--docs",
    default="docs/configuration.md",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="With --markdown: where the meaning of each key is read from.",
)
def config_schema(markdown_out: str | None, docs: str) -> None:
    """Print the channel file's JSON Schema, read from the loader itself (or write the reference)."""
    import json as jsonmod
    from pathlib import Path

    from engine import schema

    if markdown_out is None:
        click.echo(jsonmod.dumps(schema.json_schema(), indent=2))
        return
    try:
        text = schema.markdown(schema.meanings(Path(docs).read_text(encoding="utf-8")))
    except OSError as exc:
        raise click.ClickException(f"cannot read {docs}: {exc.strerror} (run from the repository)") from None
    except schema.Undocumented as exc:
        raise click.ClickException(str(exc)) from None
    Path(markdown_out).write_text(text, encoding="utf-8")
    click.echo(f"wrote {markdown_out}")
