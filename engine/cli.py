"""The ``sluice`` command line (click)."""

from __future__ import annotations

import asyncio
import errno
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from engine import native, privacy
from engine.admin.commands import audit_group, token
from engine.analystcommands import register as analyst_commands
from engine.clioptions import config_option
from engine.errors import ConfigError, SluiceError
from engine.keycommands import keys as keys_group
from engine.opscommands import config_group, env_option, maps_group
from engine.opscommands import reload as reload_command
from engine.redact import printable
from engine.suggest import Choice

if TYPE_CHECKING:
    from engine.processing import ChannelRuntime


def _load_config(path: str, env: str | None = None, **overrides: Any) -> Any:
    from engine import config as cfgmod

    try:
        return cfgmod.load(
            path, {k: v for k, v in overrides.items() if v is not None and v != ""}, env=env or None
        )
    except ConfigError as exc:
        raise click.ClickException(f"config error: {exc}") from exc


def _open_store(cfg: Any) -> Any:
    from engine import keyring
    from engine.store import Store

    try:
        return Store(cfg.store_url, keys=keyring.from_config(cfg))
    except SluiceError as exc:
        raise click.ClickException(str(exc)) from exc


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<store url>"


def _row(*values: object) -> str:
    """One tab-separated table row, each value with its control characters escaped (engine.redact)."""
    return "\t".join(printable(v) for v in values)


MESSAGE_COLUMNS = ("id", "received", "channel", "type", "control_id", "status", "ack")


def message_type(mtype: str | None, trigger: str | None) -> str:
    """``ADT^A01``; ``ADT`` without a trigger; ``(unreadable)`` for a frame whose MSH-9 could not be read."""
    if not mtype and not trigger:
        return "(unreadable)"
    return f"{mtype or '?'}^{trigger}" if trigger else str(mtype)


def _fmt_time(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


_REL = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def _parse_time(value: str | None) -> float | None:
    """``2h``, ``3d``, ``30m`` ago, or an ISO date/time (UTC if no offset)."""
    if not value:
        return None
    m = _REL.match(value.strip())
    if m:
        n, unit = float(m.group(1)), m.group(2)
        secs = {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit] * n
        return (datetime.now(UTC) - timedelta(seconds=secs)).timestamp()
    try:
        dt = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: use e.g. 2h, 3d or 2026-11-23T08:00") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


class _Commands(click.Group):
    """Every command: an engine error (a store that cannot be read, a key ring missing...) exits 1 with its
    message, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SluiceError as exc:
            raise click.ClickException(str(exc)) from exc
        except click.NoSuchOption as exc:
            raise _suggest_option(exc) from None


def _suggest_option(exc: click.NoSuchOption) -> click.NoSuchOption:
    """The same error with one suggestion, the closest option by difflib (or none), for every command."""
    from engine.suggest import closest

    command = exc.ctx.command if exc.ctx is not None else None
    known = [o for p in (command.params if command else []) for o in (*p.opts, *p.secondary_opts)]
    best = closest(exc.option_name, [o for o in known if o.startswith("--")] or known)
    return click.NoSuchOption(exc.option_name, possibilities=[best] if best else None, ctx=exc.ctx)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    package_name="sluice",
    message="%(prog)s %(version)s (hot modules: " + native.REASON + ")",
)
def main() -> None:
    """Sluice: a fast, durable HL7 v2 interface engine with HL7→FHIR built in."""


@main.command()
@config_option
@env_option()
@click.option("--host", help="Listen address for the first channel (overrides its source.host).")
@click.option("--port", type=int, help="Listen port for the first channel (overrides its source.port).")
@click.option("--store", help="Store URL, e.g. sqlite:///var/sluice.db or postgresql+psycopg://host/db.")
@click.option("--log-format", type=Choice(["auto", "json", "console"]), help="Log output format.")
@click.option("--log-level", help="Log level (debug, info, warning, error).")
@click.option(
    "--admin-port",
    type=int,
    help="Port of the admin API (overrides admin.port and SLUICE_ADMIN_PORT; 0 = any free).",
)
def run(
    config_path: str,
    env: str | None,
    host: str | None,
    port: int | None,
    store: str | None,
    log_format: str | None,
    log_level: str | None,
    admin_port: int | None,
) -> None:
    """Run the engine: listen, store, process and deliver; serve the admin API."""
    from engine import logs
    from engine.server import Server

    cfg = _load_config(config_path, env, host=host, port=port, store=store, admin_port=admin_port)
    logs.configure(log_format or cfg.logging.format, log_level or cfg.logging.level)
    try:
        Server(cfg).run()
    except ConfigError as exc:
        raise click.ClickException(f"config error: {exc}") from exc
    except SluiceError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(start_failure(exc)) from exc


def start_failure(exc: OSError) -> str:
    """What ``sluice run`` says when the operating system refuses something at start: the file it names,
    and the port hint only for an address in use."""
    what = exc.strerror or str(exc)
    if exc.filename is not None:
        return (
            f"cannot start: {what}: {exc.filename!r} (check the path and the engine account's access to it)"
        )
    if exc.errno == errno.EADDRINUSE:
        return f"cannot start: {what} (another process uses the port: stop it or choose a free port)"
    return f"cannot start: {what}"


def split_messages(data: bytes) -> list[bytes]:
    """Messages in a file: a UTF-8 BOM is dropped, LF/CRLF become CR, each MSH starts a message."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    data = data.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    out: list[bytes] = []
    current: list[bytes] = []
    for line in data.split(b"\r"):
        if not line.strip():
            continue
        if (
            line.startswith((b"MSH", b"FHS", b"BHS"))
            and current
            and not current[0].startswith((b"FHS", b"BHS"))
        ):
            out.append(b"\r".join(current) + b"\r")
            current = []
        current.append(line)
    if current:
        out.append(b"\r".join(current) + b"\r")
    return out


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--to", "target", required=True, help="HOST:PORT of the MLLP receiver.")
@click.option("--tls", is_flag=True, help="Use TLS.")
@click.option("--ca", type=click.Path(exists=True), help="CA file to verify the receiver.")
@click.option("--cert", type=click.Path(exists=True), help="Client certificate (mutual TLS).")
@click.option("--key", type=click.Path(exists=True), help="Client key (mutual TLS).")
@click.option("--insecure", is_flag=True, help="Do not verify the receiver's certificate.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for each ACK.")
def send(
    files: tuple[str, ...],
    target: str,
    tls: bool,
    ca: str | None,
    cert: str | None,
    key: str | None,
    insecure: bool,
    timeout: float,
) -> None:
    """Send HL7 files over MLLP; print each ACK code and MSA-2 (exit 1 on AE/AR/timeout)."""
    import ssl as ssl_mod

    host, _, port_s = target.rpartition(":")
    if not host or not port_s.isdigit():
        raise click.BadParameter("use HOST:PORT, e.g. 127.0.0.1:2575", param_hint="--to")
    ctx = None
    if tls or ca or cert:
        ctx = ssl_mod.create_default_context(cafile=ca)
        if cert:
            ctx.load_cert_chain(cert, key)
        if insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl_mod.CERT_NONE
    messages: list[tuple[str, bytes]] = []
    for f in files:
        for i, m in enumerate(split_messages(Path(f).read_bytes()), 1):
            messages.append((f"{f}#{i}", m))
    failures = asyncio.run(_send_all(host, int(port_s), ctx, timeout, messages))
    sys.exit(1 if failures else 0)


async def _send_all(host: str, port: int, ctx: Any, timeout: float, messages: list[tuple[str, bytes]]) -> int:
    from engine.client import MLLPClient, parse_ack
    from engine.errors import DeliveryError

    failures = 0
    client = MLLPClient(host, port, ssl=ctx, ack_timeout=timeout)
    try:
        for label, payload in messages:
            try:
                ack = await client.send(payload)
            except DeliveryError as exc:
                click.echo(_row(label, "ERROR", "-", exc))
                failures += 1
                continue
            info = parse_ack(ack)
            # the receiver's answer is its text: escaped, so it cannot drive the terminal or add columns
            extra = f"{info.error_code} {info.text}".rstrip() if info.code not in ("AA", "CA") else ""
            click.echo(_row(label, info.code, info.control_id, *([extra] if extra else [])))
            if info.code not in ("AA", "CA"):
                failures += 1
    finally:
        await client.close()
    return failures


@main.command()
@config_option
@env_option()
def check(config_path: str, env: str | None) -> None:
    """Validate routes.yaml, every channel and every destination; exit 1 on errors.

    Every error is reported, not only the first (one line each: file, key, what is wrong, what to do; then
    "N errors in M files"); warnings (e.g. an accept.types trigger HL7 does not know) do not fail the check.
    With --env, validates the promotion: routes.yaml with routes.<ENV>.yaml merged over it.

    \b
    Example:
      sluice check --config routes.yaml --env prod"""
    from engine import config as cfgmod
    from engine import keyring, registry
    from engine.config.problems import Problems
    from engine.processing import ChannelRuntime
    from engine.server import build_destinations

    problems = Problems()
    try:
        cfg = cfgmod.load(config_path, env=env or None, problems=problems)
    except ConfigError as exc:  # routes.yaml itself cannot be read: nothing else can be checked
        problems.add(exc)
        _config_errors(problems, config_path)
    dests: dict[str, Any] = {}
    try:
        registry.load_plugins(cfg.plugin_paths, cfg.plugins, cfg.base_dir)  # as `run` does
    except ConfigError as exc:  # the steps and destination kinds of a plugin that did not load are unknown
        problems.add(exc)
        _config_errors(problems, cfg.file)
    built: dict[str, Any] = {}
    for name in cfg.destinations:
        dests.update(problems.attempt(partial(build_destinations, cfg, [name]), built))
    for ch in cfg.channels:
        problems.attempt(partial(ChannelRuntime, cfg, ch, None, problems), None)
    if cfg.alerts.active:
        from engine.alerts.sinks import build_sinks

        problems.attempt(partial(build_sinks, cfg.alerts), None)  # the secrets the sinks need are there
    ring = problems.attempt(partial(keyring.from_config, cfg), None)  # the key file or variable holds keys
    if problems.errors:
        for warning in _check_warnings(cfg):
            click.echo(f"warning: {warning}", err=True)
        _config_errors(problems, cfg.file, [cfg.file, *(ch.file for ch in cfg.channels)])
    click.echo(f"ok: {cfg.file}" + (f" (environment {cfg.env})" if cfg.env else ""))
    click.echo(f"  store: {_safe_url(cfg.store_url)}")
    if ring is not None:
        source = f"key file {ring.file}" if ring.file is not None else f"variable {ring.env}"
        click.echo(
            f"  store encryption: on, current key {ring.current.id} ({len(ring.keys)} in the {source})"
        )
    else:
        click.echo("  store encryption: off (message bodies are stored plain; see docs/security.md)")
    for warning in _check_warnings(cfg):
        click.echo(f"warning: {warning}", err=True)
    for ch in cfg.channels:
        routes = ", ".join(r.destination for r in ch.routes) or "(no routes)"
        where = f"{ch.source.host}:{ch.source.port} ack={ch.ack}"
        if ch.source.poll is not None:
            where = f"fhir-poll {ch.source.poll.base_url} {','.join(ch.source.poll.resources)}"
        elif ch.source.http is not None and ch.source.http.fetch is not None:
            where += f" fetch {ch.source.http.fetch.base_url}"
        off = "" if ch.enabled else " (disabled)"
        click.echo(f"  channel {ch.name}{off}: {where} → {routes}")
    for name, d in dests.items():
        click.echo(f"  destination {name}: {d.kind}")
    for rule in cfg.alerts.rules if cfg.alerts.enabled else ():
        click.echo(f"  alert {rule.name}: {rule.kind} → {', '.join(rule.sinks)}")


def _check_warnings(cfg: Any) -> list[str]:
    """What ``sluice check`` warns about (the exit status stays 0): files others can read, an http source
    without fetch:, accept.types codes HL7 or the converter does not know."""
    from engine.config import accept_warnings

    out = list(privacy.warnings(cfg))
    for ch in cfg.channels:
        if ch.source.http is not None and ch.source.http.fetch is None:
            out.append(
                f"channel {ch.name}: the http source has no fetch: section, so id-only and empty "
                "Subscription notifications cannot be resolved (they are answered 200, stored nothing and "
                "counted in sluice_http_notifications_unresolved_total); add source.fetch with the FHIR "
                "server's base_url and auth (docs/writeback.md), or subscribe with payload full-resource"
            )
    for ch in cfg.channels:
        out.extend(accept_warnings(ch))
    return out


def _config_errors(problems: Any, routes_file: str, order: list[str] | None = None) -> NoReturn:
    """Every error ``sluice check`` found, one line each (file: key: what (what to do)), grouped by file
    (routes.yaml, then the channel files in ``order``), then exit 1 with the count: ``3 errors in 2 files``."""
    for errors in problems.by_file(routes_file, order or [routes_file]).values():
        for exc in errors:
            click.echo(f"config error: {exc}", err=True)
    raise click.ClickException(problems.summary(routes_file))


main.add_command(keys_group)


@main.group()
def messages() -> None:
    """Look at stored messages (no PHI unless asked)."""


@messages.command("list")
@config_option
@click.option("--channel")
@click.option("--status", help="received, processed, filtered, error, review, rejected, quarantined, ignored")
@click.option("--control-id", help="Only this MSH-10 control id.")
@click.option("--type", "type_", help="Message type (MSH-9.1), e.g. ADT.")
@click.option("--trigger", help="Trigger event (MSH-9.2), e.g. A08.")
@click.option("--destination", help="Only messages with a delivery to this destination.")
@click.option(
    "--patient", help="A patient identifier (PID-3.1); matched by its keyed hash, never stored plain."
)
@click.option("--since", help="Received after (2h, 3d, or ISO time).")
@click.option("--until", help="Received before (2h, 3d, or ISO time).")
@click.option("--limit", default=50, show_default=True)
@click.option("--cursor", type=int, help="Continue below this message id (the previous page's last id).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--no-header", is_flag=True, help="Leave out the header row (for scripts).")
def messages_list(config_path: str, channel: str | None, status: str | None, control_id: str | None,
                  type_: str | None, trigger: str | None, destination: str | None, patient: str | None,
                  since: str | None, until: str | None, limit: int, cursor: int | None,
                  as_json: bool, no_header: bool) -> None:  # fmt: skip
    """List messages (newest first): id, received time, channel, type, control id, status, ACK code.

    A header row names the columns (tab-separated); --no-header leaves it out."""
    from engine.admin import search

    store = _open_store(_load_config(config_path))
    query = search.MessageQuery(
        control_id=control_id,
        type=type_,
        trigger=trigger,
        status=status,
        channel=channel,
        destination=destination,
        since=_parse_time(since),
        until=_parse_time(until),
        patient_hash=search.patient_hash(search.installation_key(store), patient) if patient else None,
        limit=limit,
        cursor=cursor,
    )
    rows, _next = search.search(store, query)
    if not rows and not as_json:
        click.echo("no messages match", err=True)
        return
    if not as_json and not no_header:
        click.echo(_row(*MESSAGE_COLUMNS))
    for r in rows:
        item = {
            "id": r.id,
            "received": _fmt_time(r.received_at),
            "channel": r.channel,
            "type": message_type(r.message_type, r.trigger),
            "control_id": r.control_id,
            "status": r.status,
            "ack": r.ack_code,
        }
        if as_json:
            click.echo(json.dumps(item))  # JSON escapes control characters itself
        else:
            click.echo(_row(*item.values()))


@messages.command("show")
@config_option
@click.argument("message_id", type=int)
@click.option("--show-phi", is_flag=True, help="Print the message content (contains PHI; audited).")
@click.option(
    "--reason", default="", help="Why you are looking (recorded in the audit trail with --show-phi)."
)
def messages_show(config_path: str, message_id: int, show_phi: bool, reason: str) -> None:
    """Show one message's metadata, deliveries and (with --show-phi, audited) its content."""
    store = _open_store(_load_config(config_path))
    r = store.get_message(message_id)
    if r is None:
        raise click.ClickException(f"no message {message_id}")
    # Stored values are printed with their control characters escaped (engine.redact.printable).
    p = printable
    click.echo(f"id:          {r.id}")
    click.echo(f"channel:     {p(r.channel)}")
    click.echo(f"received:    {_fmt_time(r.received_at)} from {p(r.peer)}")
    click.echo(f"type:        {p(message_type(r.message_type, r.trigger))} v{p(r.version or '-')}")
    click.echo(f"control id:  {p(r.control_id)}")
    click.echo(f"status:      {p(r.status)}")
    if r.reason:
        click.echo(f"reason:      {p(r.reason)}")
    step = next_step(str(r.status), r.id)
    if step:
        click.echo(f"next:        {step}")
    click.echo(f"ack:         {p(r.ack_code or '-')}")
    click.echo(f"size:        {r.size} bytes, hash {p(r.content_hash)}")
    for d in store.deliveries_of(message_id):
        line = f"delivery {d.id} → {p(d.destination)}: {p(d.status)}, {d.attempts} attempt(s)"
        if d.last_error and d.status != "delivered":
            line += f", last error: {p(d.last_error)}"
        click.echo(line)
    for kind, text in store.warnings_of(
        message_id
    ):  # located, PHI-free: what the conversion dropped or changed
        click.echo(f"warning:     {p(text)}  [{p(kind)}]")
    if r.raw is None:
        click.echo("content:     (dropped by retention)")
    elif show_phi:
        from engine.admin import operations
        from engine.admin.commands import os_user

        raw, _outputs = operations.view_content(store, os_user(), message_id, reason=reason, source="cli")
        click.echo("content:")
        # one segment a line; any other control character (an ESC sequence in a field) escaped
        click.echo(p((raw or b"").decode("latin-1").replace("\r", "\n"), keep="\n"))
    else:
        segs = [line[:3] for line in r.raw.decode("latin-1").replace("\n", "\r").split("\r") if line.strip()]
        click.echo(f"segments:    {p(' '.join(segs))}  (content hidden; --show-phi to print it)")


def next_step(status: str, message_id: int) -> str:
    """What an operator does about a message in this status (docs/operations.md "Where messages are")."""
    replay = f"sluice replay --id {message_id}"
    return {
        "error": f"fix the cause the reason names (the sender's message, or the channel: a map, require:, "
        f"the transform), sluice reload, then {replay}",
        "review": f"held on purpose (a lower result status after a higher one); {replay} applies it anyway",
        "filtered": f"the channel's filter or routes did not want it; after changing them, {replay}",
        "quarantined": "unreadable, a charset problem or a control id resent with other content: look at it "
        f"(--show-phi --reason ...), ask the sender to resend it corrected, or {replay}",
        "rejected": "a type, trigger, version or processing id the channel does not accept: change accept: "
        f"(sluice reload) and {replay}, or ask the sender",
    }.get(status, "")


@main.group("dead-letter")
def dead_letter() -> None:
    """The dead-letter queue: failed deliveries and failed processing."""


@dead_letter.command("list")
@config_option
@click.option("--channel")
@click.option("--destination")
@click.option("--limit", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def dead_letter_list(
    config_path: str, channel: str | None, destination: str | None, limit: int, as_json: bool
) -> None:
    """List dead letters with their reasons."""
    store = _open_store(_load_config(config_path))
    rows = store.dead_letters(channel=channel, destination=destination, limit=limit)
    if not rows and not as_json:
        which = " and ".join(f"{k} {v}" for k, v in (("channel", channel), ("destination", destination)) if v)
        click.echo(
            f"no dead letters{' for ' + printable(which) if which else ''}: the queue is empty", err=True
        )
        return
    for r in rows:
        m = r._mapping
        item = {
            "message_id": m["message_id"],
            "received": _fmt_time(m["received_at"]),
            "channel": m["channel"],
            "where": m.get("destination") or m.get("status"),
            "type": message_type(m["message_type"], m["trigger"]),
            "control_id": m["control_id"],
            "reason": m["reason"],
        }
        if as_json:
            click.echo(json.dumps(item))
        else:
            click.echo(_row(*item.values()))


@main.command()
@config_option
@click.option("--id", "ids", multiple=True, type=int, help="Message id (repeatable).")
@click.option("--channel", help="Replay messages of this channel (with --status).")
@click.option(
    "--status",
    type=Choice(["dead", "error", "filtered", "review", "quarantined", "rejected", "processed"]),
    help="With --channel: dead (redo dead deliveries), or messages in this status: error, filtered, review, "
    "quarantined, rejected, processed.",
)
@click.option("--destination", help="Only redo deliveries to this destination.")
@click.option("--since", help="Received after (2h, 3d, or ISO time).")
@click.option("--until", help="Received before (2h, 3d, or ISO time).")
@click.option("--dry-run", is_flag=True, help="Show what would be replayed; change nothing.")
@click.option("--who", default=None, help="Who is replaying (default: the OS user).")
@click.option("--why", default="", help="Why (recorded with the replay).")
def replay(config_path: str, ids: tuple[int, ...], channel: str | None, status: str | None, destination: str | None,
           since: str | None, until: str | None, dry_run: bool, who: str | None, why: str) -> None:  # fmt: skip
    """Run messages through the current config again (dead letters, errors, filtered...)."""
    from dataclasses import replace as dc_replace

    from engine.admin import operations
    from engine.admin.commands import os_user

    if not ids and not (channel and status):
        raise click.UsageError("give --id ID, or --channel NAME with --status")
    cfg = _load_config(config_path)
    store = _open_store(cfg)
    req = operations.ReplayRequest(
        ids=ids,
        channel=channel,
        status=status,
        destination=destination,
        since=_parse_time(since),
        until=_parse_time(until),
    )
    actor = os_user() if not who else dc_replace(os_user(), name=who)
    try:
        res = operations.replay(store, actor, req, dry_run=dry_run, why=why, source="cli")
    except operations.OperationError as exc:
        raise click.UsageError(str(exc)) from None
    chosen = {mid for mid, _ in res.selection}
    skipped = [_not_replayed(store, i) for i in dict.fromkeys(ids) if i not in chosen]
    for line in skipped:  # an --id that selects nothing is said, never passed over (a typo in an id)
        click.echo(line, err=True)
    if not res.selection:
        click.echo("nothing to replay")
        if skipped:
            sys.exit(1)
        return
    for mid, dests in res.selection:
        click.echo(
            f"{'would replay' if dry_run else 'replaying'} message {mid}"
            + (f" → {printable(', '.join(dests))}" if dests else "")
        )
    if dry_run:
        click.echo(f"{len(res.selection)} message(s) would be replayed (dry run, nothing changed)")
        sys.exit(1 if skipped else 0)
    click.echo(f"{res.replayed} message(s) queued for replay; a running engine picks them up within a second")
    if skipped:
        sys.exit(1)


def _not_replayed(store: Any, message_id: int) -> str:
    """Why ``sluice replay --id N`` did not select message N, and what to do."""
    row = store.get_message(message_id)
    if row is None:
        return (
            f"message {message_id}: no such message "
            "(`sluice messages list` or `sluice dead-letter list` show the ids)"
        )
    return (
        f"message {message_id}: not replayed: it does not match --status/--destination (status "
        f"{printable(str(row.status))}), or retention dropped its body (`sluice messages show {message_id}`)"
    )


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@config_option
@click.option(
    "--channel",
    help="Run this channel's pipeline (default: the first enabled channel of the config; "
    "without a config file, the plain HL7 to FHIR converter).",
)
@click.option("--pretty", is_flag=True, help="Indent JSON output; print HL7 output one segment a line.")
def convert(files: tuple[str, ...], config_path: str, channel: str | None, pretty: bool) -> None:
    """Run HL7 v2 files through a channel and print what it would deliver (one output a line).

    The channel's intake checks, filter, transform steps and route filters run exactly as in the engine
    (the same compiled pipeline a processing worker runs); a message the channel would reject, filter or
    fail is reported on stderr.  Exit 1 when any message is rejected or fails.
    """
    from engine import logs

    # a message's failure is its own stderr line, not an engine log line too
    logs.configure("console", "warning")
    runtime = _convert_runtime(config_path, channel, explicit_config=_option_given("config_path"))
    # A channel splits an FHS/BHS batch at its intake, as the engine does; the plain converter splits it the
    # way `sluice conformance` does (each MSH a message, envelope segments dropped).
    from conformance.runner import split_messages as split_batch_file

    split = split_messages if runtime is not None else split_batch_file
    failed = 0
    for f in files:
        for i, raw in enumerate(split(Path(f).read_bytes()), 1):
            label = f"{f}#{i}"
            outputs = _convert_plain(label, raw) if runtime is None else _convert_channel(runtime, label, raw)
            if outputs is None:
                failed += 1
                continue
            for payload, content_type in outputs:
                _print_output(payload, content_type, pretty)
    sys.exit(1 if failed else 0)


def _option_given(name: str) -> bool:
    ctx = click.get_current_context()
    return ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)


def _convert_runtime(
    config_path: str, channel: str | None, *, explicit_config: bool
) -> ChannelRuntime | None:
    """The channel's compiled pipeline, built as a processing worker builds it (plugins first).

    ``None``: no config file (the default ``routes.yaml`` is absent and no channel asked for), so
    messages go through the plain converter.
    """
    from engine import registry
    from engine.processing import ChannelRuntime

    if not Path(config_path).exists() and not explicit_config and channel is None:
        return None
    cfg = _load_config(config_path)
    try:
        if channel is not None:
            ch = cfg.channel(channel)
        else:
            enabled = [c for c in cfg.channels if c.enabled]
            if not enabled:
                raise ConfigError("every channel is disabled", file=cfg.file, hint="name one with --channel")
            ch = enabled[0]
        registry.load_plugins(cfg.plugin_paths, cfg.plugins, cfg.base_dir)
        return ChannelRuntime(cfg, ch, store=None)
    except ConfigError as exc:
        raise click.ClickException(f"config error: {exc}") from exc


def _convert_plain(label: str, raw: bytes) -> list[tuple[bytes, str]] | None:
    """No config: the hl7-to-fhir conversion with default settings (unknown authorities derived)."""
    from engine import exactjson
    from engine.hl7 import decode_warning, parse_bytes
    from transforms.convert import convert_report
    from transforms.fhir_step import FHIR_JSON
    from transforms.settings import ConvertSettings

    try:
        result = convert_report(parse_bytes(raw), ConvertSettings(derive_unknown_systems=True))
    except SluiceError as exc:
        click.echo(f"{label}: error {exc.hl7_error}: {exc}", err=True)
        return None
    # bytes read other than as MSH-18 declares (charset_unknown): said first, as a channel says it
    charset = decode_warning(raw, False)
    warnings = ([charset] if charset else []) + list(zip(result.warning_kinds, result.warnings, strict=True))
    for kind, text in warnings:
        click.echo(f"{label}: warning: {printable(text)} [{kind}]", err=True)  # located, never a value
    return [(exactjson.dumps(result.bundle), FHIR_JSON)]


def _convert_channel(runtime: ChannelRuntime, label: str, raw: bytes) -> list[tuple[bytes, str]] | None:
    """What the engine would deliver for ``raw`` on this channel; ``None`` when it would not process it.

    The intake decision (charset, batch, accepted types, versions, processing ids, ``require``) is the
    listener's own pure part; the pipeline runs through ``ChannelRuntime.run_raw``, as in a worker.
    """
    from typing import cast

    from engine.intake import Committer, Intake
    from engine.store import ERROR, FILTERED, IGNORED, PROCESSED, RECEIVED

    # decide() is the intake's pure part: it never touches the committer.
    intake = Intake(runtime.channel, cast(Committer, None))
    jobs, immediate = intake.decide(raw, "sluice convert")
    if not jobs:
        click.echo(f"{label}: the channel answers {_ack_summary(immediate)}; nothing is stored", err=True)
        return None
    outputs: list[tuple[bytes, str]] = []
    ok = True
    for n, job in enumerate(jobs, 1):
        where = label if len(jobs) == 1 else f"{label} (batch message {n})"
        row = job.row
        if row.status == IGNORED:
            click.echo(f"{where}: not processed: {row.reason}", err=True)
            continue
        if row.status != RECEIVED:
            click.echo(
                f"{where}: {row.status}: the channel answers {_ack_summary(row.ack)}: {row.reason}", err=True
            )
            ok = False
            continue
        result = runtime.run_raw(n, row.raw)
        if result.status == ERROR:
            code = f" {result.error.hl7_error}" if isinstance(result.error, SluiceError) else ""
            click.echo(f"{where}: error{code}: {result.reason}", err=True)
            ok = False
            continue
        if result.status == FILTERED or result.output is None:
            click.echo(f"{where}: filtered: {result.reason}; nothing is delivered", err=True)
            continue
        assert result.status == PROCESSED
        out = result.output
        if runtime.routes and not out.routes:
            click.echo(f"{where}: filtered: no route accepted the message; nothing is delivered", err=True)
            continue
        for kind, text in out.facts.get("warnings", ()):  # what the engine stores with the message
            click.echo(f"{where}: warning: {printable(str(text))} [{kind}]", err=True)
        outputs.append((out.payload, out.content_type))
    return outputs if ok else None


def _ack_summary(ack: bytes | None) -> str:
    from engine.client import parse_ack
    from engine.intake import split_acks

    parts = []
    for a in split_acks(ack):
        info = parse_ack(a)
        parts.append(f"{info.code} {info.error_code}".strip())
    return ", ".join(parts) or "nothing"


def _print_output(payload: bytes, content_type: str, pretty: bool) -> None:
    """The payload as a destination receives it (bytes unchanged), then a newline."""
    import orjson

    from engine import exactjson

    if pretty and "json" in content_type:
        payload = exactjson.dumps(exactjson.loads(payload), option=orjson.OPT_INDENT_2)
    elif pretty and "hl7" in content_type:
        payload = payload.replace(b"\r\n", b"\r").replace(b"\r", b"\n").rstrip(b"\n")
    click.echo(payload)  # bytes go to the binary stream as they are


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--report", type=click.Path(dir_okay=False), help="Write a Markdown report here.")
@click.option(
    "--diffs",
    is_flag=True,
    help="Also print every differing field: message, path, Sluice value, expected value, explanation.",
)
def conformance(directory: str, report: str | None, diffs: bool) -> None:
    """Convert every HL7 file under DIRECTORY, validate, and score against expected bundles."""
    from conformance.runner import main as run_conformance

    args = [directory] + (["--report", report] if report else []) + (["--diffs"] if diffs else [])
    sys.exit(run_conformance(args))


@main.command()
@config_option
@click.option("--channel", help="Only this channel.")
def prune(config_path: str, channel: str | None) -> None:
    """Apply each channel's retention now (drop old bodies, then old rows)."""
    import time

    cfg = _load_config(config_path)
    store = _open_store(cfg)
    for ch in cfg.channels:
        if channel and ch.name != channel:
            continue
        r = ch.retention
        now = time.time()
        done = store.prune(
            ch.name,
            bodies_before=now - r.bodies_days * 86400 if r.bodies_days is not None else None,
            rows_before=now - r.rows_days * 86400 if r.rows_days is not None else None,
        )
        click.echo(f"{ch.name}: dropped {done['bodies']} bodies, {done['rows']} rows")


main.add_command(token)
main.add_command(audit_group)
analyst_commands(main)
main.add_command(reload_command)
main.add_command(config_group)
main.add_command(maps_group)

if __name__ == "__main__":
    main()
