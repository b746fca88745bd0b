"""Files the engine keeps are private to the account running it.

The engine and every ``sluice`` command set the umask to :data:`PRIVATE_UMASK`, so what they create
(the SQLite store and its -wal/-shm files, key files, output directories and files) is 0600/0700;
:class:`engine.store.Store` also creates a new SQLite file 0600 itself (SQLite gives the -wal and
-shm files the database's mode).  Existing files keep their mode: :func:`warnings` lists those that
group or others can read, and ``sluice check`` prints them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

PRIVATE_UMASK = 0o077  # new files 0600, new directories 0700


def loose_mode(path: Path) -> int | None:
    """The mode of ``path`` when group or others may read, write or enter it; None when private or absent."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    return mode if mode & 0o077 else None


def sqlite_path(store_url: str) -> Path | None:
    if not store_url.startswith("sqlite") or ":memory:" in store_url:
        return None
    return Path(store_url.split("///", 1)[-1])


def warnings(cfg: Any) -> list[str]:
    """What of the store (SQLite file, -wal, -shm, their directory) and the key file others can read."""
    out: list[str] = []
    paths: list[tuple[str, Path]] = []
    db = sqlite_path(cfg.store_url)
    if db is not None:
        paths.append(("store directory", db.parent))
        paths += [("store", db), ("store WAL", Path(f"{db}-wal")), ("store SHM", Path(f"{db}-shm"))]
    enc = getattr(cfg, "store_encryption", None)
    if enc is not None and enc.key_file:
        paths.append(("key file", Path(enc.key_file)))
    for what, path in paths:
        mode = loose_mode(path)
        if mode is None:
            continue
        fix = "chmod 700" if path.is_dir() else "chmod 600"
        who = (
            "group and others" if mode & 0o007 and mode & 0o070 else "others" if mode & 0o007 else "its group"
        )
        out.append(f"{what} {path} is open to {who} (mode {mode:04o}): {fix} {path}")
    return out
