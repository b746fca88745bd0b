"""``sluice keys ...``: the store encryption key ring (engine/keyring.py, engine/rekey.py).

create  a key file (mode 0600), or a new current key added to one (--add)
rotate  re-seal every stored body, ACK and payload with the current key, in small batches,
        while the engine runs
status  which key seals how many values (a key can be retired once it seals none)
retire  take a key that seals nothing out of the key file
jwks    the public JWKS of a SMART backend private key (fhir destination auth type smart-backend), to
        register with the EHR
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from engine import keyring
from engine.clioptions import config_option, open_store
from engine.errors import ConfigError, SluiceError
from engine.redact import printable
from engine.smartkeys import jwks


@click.group("keys")
def keys() -> None:
    """Store encryption keys: create a key ring, rotate to a new key, see which key seals what.

    Also the public JWKS of a SMART backend signing key (jwks).
    """


@keys.command("create")
@click.option(
    "--out",
    required=True,
    help="Key file to write (mode 0600, refused if it exists); '-' prints the key ring instead "
    "(for store_encryption.env).",
)
@click.option(
    "--add",
    is_flag=True,
    help="Add a new key to the existing key file OUT and make it current (the older keys stay to open older rows).",
)
@click.option(
    "--standby",
    is_flag=True,
    help="With --add: add the key without making it current (several nodes: copy the file to every node, "
    "then `sluice keys use`).",
)
def create(out: str, add: bool, standby: bool) -> None:
    """Make a key file with one new AES-256 key, or add a new key to one (--add)."""
    try:
        if out == "-":
            if add:
                raise click.UsageError("--add needs a key file, not '-'")
            click.echo(keyring.format_ring([keyring.new_key()]), nl=False)
            return
        path = Path(out)
        if standby and not add:
            raise click.UsageError("--standby goes with --add")
        if add:
            ring = keyring.KeyRing(file=path)
            key = keyring.new_key(k.id for k in ring.keys)
            if standby:
                # the last key is the current one: a standby key goes just before it
                keyring.write_ring(path, [*ring.keys[:-1], key, ring.keys[-1]], replace=True)
                click.echo(f"added key {key.id} to {path} (standby; {ring.current.id} stays current)")
                click.echo(f"copy {path} to every node, then make it current: sluice keys use {key.id}")
                return
            keyring.write_ring(path, [*ring.keys, key], replace=True)
            click.echo(f"added key {key.id} to {path}; it is now the current key")
            click.echo(
                "a running engine seals new values with it within seconds; "
                "then run `sluice keys rotate` to re-seal older rows"
            )
            return
        key = keyring.new_key()
        keyring.write_ring(path, [key], replace=False)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {path} (mode 0600) with key {key.id}")
    click.echo(f"turn encryption on in routes.yaml:  store_encryption: {{key_file: {path}}}")
    click.echo("keep a copy of this file somewhere safe: without it the stored messages cannot be read")


@keys.command("status")
@config_option
def status(config_path: str) -> None:
    """How many stored values each key seals, per column ('plain': not encrypted)."""
    from engine import rekey

    store = open_store(config_path)
    ring = store.keys
    current = ring.current.id if ring is not None else None
    click.echo(f"current key: {current or '(store_encryption is off)'}")
    if ring is not None:
        click.echo(f"keys in the ring: {', '.join(k.id for k in ring.keys)}")
    try:
        counts = rekey.status(store)
    except SluiceError as exc:
        raise click.ClickException(str(exc)) from exc
    for column, by_key in counts.items():
        if not by_key:
            click.echo(f"{column}\t(empty)")
        for kid, n in sorted(by_key.items()):
            label = printable(kid) if kid else "plain"
            mark = " (current)" if kid == current else ""
            click.echo(f"{column}\t{label}{mark}\t{n}")


@keys.command("rotate")
@config_option
@click.option("--batch", default=200, show_default=True, help="Rows re-sealed per transaction.")
@click.option(
    "--pause",
    default=0.02,
    show_default=True,
    help="Seconds between batches (leaves the store to the engine).",
)
def rotate(config_path: str, batch: int, pause: float) -> None:
    """Re-seal every body, ACK and payload not sealed with the current key (plain ones too).

    Runs beside the engine: each batch is one short transaction.  Safe to stop and run again.
    """
    from engine import rekey

    if batch < 1:
        raise click.BadParameter("must be 1 or more", param_hint="--batch")
    store = open_store(config_path)
    if store.keys is None:
        raise click.ClickException(
            "store_encryption is off in the config: there is no key to rotate to "
            "(add store_encryption: {key_file: PATH} to routes.yaml first)"
        )
    click.echo(f"re-sealing with key {store.keys.current.id}")

    def progress(r: rekey.Rotated) -> None:
        if sys.stderr.isatty():
            click.echo(f"\r{r.table}: {r.rows} rows", nl=False, err=True)

    try:
        results = rekey.rotate(store, batch=batch, pause=pause, progress=progress)
    except SluiceError as exc:
        raise click.ClickException(str(exc)) from exc
    if sys.stderr.isatty():
        click.echo("", err=True)
    for r in results:
        click.echo(f"{r.table}: {r.values} value(s) re-sealed in {r.rows} row(s)")


@keys.command("use")
@config_option
@click.argument("key_id")
def use(config_path: str, key_id: str) -> None:
    """Make KEY_ID (already in the key file) the current key: new values are sealed with it."""
    ring = _key_file_ring(config_path)
    assert ring.file is not None
    chosen = [k for k in ring.keys if k.id == key_id]
    if not chosen:
        raise click.ClickException(
            f"no key {printable(key_id)!r} in {ring.file} (keys: {', '.join(k.id for k in ring.keys)})"
        )
    keyring.write_ring(ring.file, [*(k for k in ring.keys if k.id != key_id), chosen[0]], replace=True)
    click.echo(
        f"{key_id} is now the current key in {ring.file}; run `sluice keys rotate` to re-seal older rows"
    )


def _key_file_ring(config_path: str) -> keyring.KeyRing:
    from engine.cli import _load_config

    try:
        ring = keyring.from_config(_load_config(config_path))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    if ring is None or ring.file is None:
        raise click.ClickException("this edits a key file: store_encryption.key_file is not configured")
    return ring


@keys.command("retire")
@config_option
@click.argument("key_id")
def retire(config_path: str, key_id: str) -> None:
    """Remove KEY_ID from the key file once no stored value is sealed with it (never the current key)."""
    from engine import rekey

    ring = _key_file_ring(config_path)
    assert ring.file is not None
    cfg_store = open_store(config_path)
    ids = [k.id for k in ring.keys]
    if key_id not in ids:
        raise click.ClickException(f"no key {printable(key_id)!r} in {ring.file} (keys: {', '.join(ids)})")
    if key_id == ring.current.id:
        raise click.ClickException(
            f"{key_id} is the current key: add a new one first (sluice keys create --add)"
        )
    used = sum(c.get(key_id, 0) for c in rekey.status(cfg_store).values())
    if used:
        raise click.ClickException(
            f"{used} stored value(s) are still sealed with {key_id}: run `sluice keys rotate` first"
        )
    keyring.write_ring(ring.file, [k for k in ring.keys if k.id != key_id], replace=True)
    click.echo(f"removed key {key_id} from {ring.file}")


# SMART backend signing keys (engine/smartkeys.py): the public JWKS to register with the EHR.
keys.add_command(jwks)
