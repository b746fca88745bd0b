"""``sluice keys jwks``: the public JWKS of SMART backend signing keys (fhir destination ``auth: {type:
smart-backend}``, engine/destinations/smart.py), to register with the EHR.  Registered on the ``sluice keys``
group in engine/keycommands.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from engine.suggest import Choice

if TYPE_CHECKING:
    from engine.destinations.smart import SigningKey


@click.command("jwks")
@click.argument("private_key", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--kid",
    help="Key id to publish (one PRIVATE_KEY only); the same as auth.kid. Default: the key's RFC 7638 "
    "thumbprint, which is also what the destination uses when auth.kid is not set.",
)
@click.option(
    "--alg",
    type=Choice(["RS384", "ES384"]),
    help="Signing algorithm to publish (one PRIVATE_KEY only); default: RS384 for an RSA key, ES384 for EC P-384.",
)
def jwks(private_key: tuple[str, ...], kid: str | None, alg: str | None) -> None:
    """Print the public JWKS of SMART backend private key file(s) (PEM, RSA or EC P-384), to register with the EHR.

    Give the old and the new key while rotating: the set then holds both.  Only the public halves are printed.
    """
    from engine.destinations import smart  # jwt and cryptography: only for this command

    if (kid or alg) and len(private_key) > 1:
        raise click.UsageError("--kid and --alg go with a single PRIVATE_KEY")
    entries: list[tuple[SigningKey, str | None, str | None]] = []
    for name in private_key:
        try:
            key = smart.load_private_key(Path(name).read_bytes())
            smart.alg_for(key, alg)
        except OSError as exc:
            raise click.ClickException(f"cannot read {name}: {exc.strerror or exc}") from exc
        except smart.SmartKeyError as exc:
            raise click.ClickException(f"{name}: {exc}") from exc
        entries.append((key, kid, alg))
    click.echo(json.dumps(smart.jwks(entries), indent=2))
