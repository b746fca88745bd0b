"""Environments: ``routes.yaml`` plus an overlay ``routes.<env>.yaml``, deep-merged (pure).

``--env prod`` or ``SLUICE_ENV=prod`` selects ``routes.prod.yaml`` beside ``routes.yaml``.  Merge rules
(docs/configuration.md, "Environments"):

* a mapping in the overlay merges into the base mapping key by key, recursively;
* a list or a scalar in the overlay replaces the base value whole (lists are never concatenated, so a
  promotion states the complete list it wants);
* ``null`` in the overlay removes the key: the setting falls back to its default;
* ``channel_overrides: {CHANNEL: {...}}`` (overlay or base) is merged the same way into that channel's
  own file, so an environment changes a channel's host, port, TLS files or routes without a copy of it.

:func:`masked` prints a merged config without its secrets (``sluice config show``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
OVERRIDES_KEY = "channel_overrides"
MASK = "********"
# A key whose name holds one of these is a secret: its literal value is never printed.
_SECRET_WORDS = ("token", "password", "passwd", "secret", "key", "credential", "authorization", "cookie")
_REFERENCE_KEYS = ("env", "file")  # {env: VAR} / {file: PATH}: where a secret comes from


def overlay_path(base: Path, env: str) -> Path:
    """``routes.yaml`` + ``prod`` → ``routes.prod.yaml`` in the same folder."""
    return base.with_name(f"{base.stem}.{env}{base.suffix}")


def valid_env(env: str) -> bool:
    return bool(ENV_NAME.match(env))


def deep_merge(base: Any, overlay: Any) -> Any:
    """``overlay`` over ``base`` by the rules above; neither argument is changed."""
    if not isinstance(base, Mapping) or not isinstance(overlay, Mapping):
        return overlay
    out: dict[Any, Any] = dict(base)
    for k, v in overlay.items():
        if v is None:
            out.pop(k, None)
        elif k in out and isinstance(out[k], Mapping) and isinstance(v, Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def is_secret_key(key: str) -> bool:
    k = key.lower()
    return any(w in k for w in _SECRET_WORDS)


def _is_reference(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in _REFERENCE_KEYS


def masked(data: Any, *, secret: bool = False) -> Any:
    """``data`` with every secret replaced by ``********``.

    Secrets: literal values under a key named like a token, password, key, client secret, credential
    or authorization header (anywhere in the tree), passwords inside URLs (``scheme://user:pw@host``),
    and the values of ``{env: VAR}`` references (``{env: VAR}`` itself, the variable's name, is shown:
    it is where the secret comes from, not the secret).
    """
    if _is_reference(data):
        return {str(k): v for k, v in data.items()}
    if isinstance(data, Mapping):
        return {str(k): masked(v, secret=secret or is_secret_key(str(k))) for k, v in data.items()}
    if isinstance(data, list):
        return [masked(v, secret=secret) for v in data]
    if secret and data not in (None, "", True, False):
        return MASK
    if isinstance(data, str):
        return mask_url(data)
    return data


_URL_PASSWORD = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://[^/@:\s]*):([^/@\s]+)@")


def mask_url(value: str) -> str:
    """``postgresql://app:pw@db/x`` → ``postgresql://app:********@db/x``; other text unchanged."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{MASK}@", value)
