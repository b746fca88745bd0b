"""``sluice token ...`` and ``sluice audit ...``: the admin functions from the command line.

They act on the store named by the config, as the OS user running them (recorded in the
audit trail), and call the same functions as the admin API.
"""

from __future__ import annotations

import getpass
import json
from datetime import UTC, datetime

import click

from engine.admin import audit, operations, tokens
from engine.admin.roles import ROLES, Principal
from engine.clioptions import config_option, open_store
from engine.redact import printable
from engine.suggest import Choice


def os_user() -> Principal:
    """The person at the terminal: the CLI trusts whoever can read the store's config."""
    try:
        name = getpass.getuser()
    except Exception:
        name = "unknown"
    return Principal(name, "os", "admin", phi=True)


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


@click.group()
def token() -> None:
    """Admin API tokens: create (shown once), list, revoke."""


@token.command("create")
@config_option
@click.option("--name", required=True, help="A name for the token (who or what uses it).")
@click.option("--role", required=True, type=Choice(ROLES), help="viewer, operator or admin.")
@click.option("--phi", is_flag=True, help="Also allow reading message content (PHI).")
@click.option("--expires", help="Lifetime, e.g. 90d or 12h (default: never).")
def token_create(config_path: str, name: str, role: str, phi: bool, expires: str | None) -> None:
    """Create a token and print it once; only its hash is stored."""
    store = open_store(config_path)
    try:
        ttl = tokens.parse_duration(expires) if expires else None
        secret = tokens.create(store, name, role, phi=phi, expires_in=ttl, by=os_user(), source="cli")
    except tokens.TokenError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(secret)
    click.echo(
        f"token {name!r} ({role}{' + phi' if phi else ''}) created; it is shown only now. "
        "Send it as 'Authorization: Bearer <token>'.",
        err=True,
    )


@token.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def token_list(config_path: str, as_json: bool) -> None:
    """Every token: name, role, phi, created, expires, last used, state (never the secret)."""
    for t in tokens.listing(open_store(config_path)):
        state = "revoked" if t.revoked_at else ("active" if t.active else "expired")
        item = {
            "name": t.name,
            "role": t.role,
            "phi": t.phi,
            "created": _when(t.created_at),
            "expires": _when(t.expires_at),
            "last_used": _when(t.last_used_at),
            "state": state,
        }
        click.echo(json.dumps(item) if as_json else "\t".join(printable(v) for v in item.values()))


@token.command("revoke")
@config_option
@click.argument("name")
def token_revoke(config_path: str, name: str) -> None:
    """Revoke a token now (a running engine stops accepting it within 5 seconds)."""
    try:
        tokens.revoke(open_store(config_path), name, by=os_user(), source="cli")
    except tokens.TokenError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"token {printable(name)!r} revoked")


@click.group("audit")
def audit_group() -> None:
    """The audit trail: PHI views, replays, pauses, token changes."""


@audit_group.command("list")
@config_option
@click.option("--since", help="Since (2h, 3d, or an ISO time).")
@click.option("--action", type=Choice(audit.ACTIONS), help="Only this action.")
@click.option("--actor", help="Only this token name, OIDC user or OS user.")
@click.option("--limit", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def audit_list(
    config_path: str, since: str | None, action: str | None, actor: str | None, limit: int, as_json: bool
) -> None:
    """Audit rows, newest first."""
    try:
        when = operations.parse_when(since)
    except operations.OperationError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    for e in audit.entries(open_store(config_path), since=when, action=action, actor=actor, limit=limit):
        if as_json:
            click.echo(json.dumps(e.as_dict()))
        else:
            # an operator's reason, an OIDC subject: printed with control characters escaped
            values = [e.id, _when(e.at), f"{e.actor_kind}:{e.actor}", e.action, e.target, e.source, e.reason]
            click.echo("\t".join(printable(v) for v in values))
