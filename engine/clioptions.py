"""What the command modules share: the ``--config`` option and the store it names.

``engine/cli.py`` adds the command groups of ``engine/admin/commands.py``, ``engine/keycommands.py``,
``engine/analystcommands.py`` and ``engine/opscommands.py``; those import this small module, never ``engine.cli`` at import time, so there
is no import cycle and one definition of the option every command takes.
"""

from __future__ import annotations

from typing import Any

import click

DEFAULT_CONFIG = "routes.yaml"

config_option = click.option(
    "--config",
    "-c",
    "config_path",
    default=DEFAULT_CONFIG,
    show_default=True,
    envvar="SLUICE_CONFIG",
    help="routes.yaml to use.",
)


def open_store(config_path: str) -> Any:
    """The store (and key ring) the config at ``config_path`` names; errors as ``engine.cli`` reports them."""
    from engine.cli import _load_config, _open_store

    return _open_store(_load_config(config_path))
