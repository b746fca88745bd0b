"""Encryption at rest: AES-256-GCM for message bodies, ACKs and destination payloads.

``store_encryption`` in routes.yaml names a *key ring*: a key file (``key_file``) or an environment
variable (``env``) holding one or more 256-bit keys, each with a short id; the last one is current.
New values are sealed with the current key; any key in the ring opens a value, so a new key can
become current while older rows are still being re-encrypted (``sluice keys rotate``).

The stored form tells itself apart, like :mod:`engine.payloads` does for zstd: a value that starts
with :data:`ENCRYPTED` is a frame ::

    b"\\xc1SLE" | key id length (1 byte) | key id (ASCII) | nonce (12 bytes) | ciphertext and GCM tag

whose additional authenticated data is the header plus the column it belongs to
(``messages.raw``...), so a value cannot be moved to another column unnoticed.  ``0xC1`` never
starts UTF-8 text (nor HL7, JSON or a zstd frame), so a plain value starting with the 4-byte prefix
is rare; when one is stored without encryption it is wrapped in :data:`PLAIN` so it is never
mistaken for a frame.  Anything else is a plain value, stored as it is.

Key ring text (a key file, or the variable's value): ``<id>:<base64 key>`` entries separated by
newlines or blanks, ``#`` comments; the last entry is the current key.  A bare base64 key (no id)
is accepted too; its id is derived from the key.  ``sluice keys create`` writes one (mode 0600).

A ring re-reads its key file when the file changes (checked at most once a second when sealing)
and when it meets a key id it does not know, so every process of a running engine (and its worker
processes) picks up a new current key within seconds.  A variable is read once per process: after
adding a key there, restart the engine before ``sluice keys rotate``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.errors import ConfigError, StoreError

PREFIX = b"\xc1SL"
ENCRYPTED = PREFIX + b"E"
PLAIN = PREFIX + b"P"
NONCE = 12
KEY_BYTES = 32
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
RELOAD_EVERY = 1.0  # seconds between checks of the key file when sealing

# What each sealed column is (the additional authenticated data of its frames).
RAW = b"messages.raw"
ACK = b"messages.ack"
PAYLOAD = b"deliveries.payload"


@dataclass(frozen=True)
class Key:
    id: str
    secret: bytes

    def __repr__(self) -> str:  # never print key material
        return f"Key({self.id!r})"


def new_key(taken: Iterable[str] = ()) -> Key:
    """A fresh random key with a random 8-hex-digit id not in ``taken``."""
    used = set(taken)
    while True:
        kid = secrets.token_hex(4)
        if kid not in used:
            return Key(kid, secrets.token_bytes(KEY_BYTES))


def derived_id(secret: bytes) -> str:
    """The id of a key given without one: a fingerprint of the key (not the key)."""
    return hashlib.sha256(b"sluice key id\x00" + secret).hexdigest()[:8]


def parse_ring(text: str, where: str) -> list[Key]:
    """Keys of a ring text, in order (the last is current).  ConfigError naming ``where`` when malformed."""
    keys: list[Key] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0]
        for token in line.split():
            kid, sep, b64 = token.rpartition(":")
            if not sep:
                kid, b64 = "", token
            try:
                secret = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(
                    f"{where}, line {n}: a key is not base64",
                    hint="each entry is <id>:<base64 of 32 random bytes>; make one with: sluice keys create",
                ) from None
            if len(secret) != KEY_BYTES:
                raise ConfigError(
                    f"{where}, line {n}: a key is {len(secret)} bytes, AES-256 needs {KEY_BYTES}",
                    hint="make one with: sluice keys create",
                )
            kid = kid or derived_id(secret)
            if not _ID.match(kid):
                raise ConfigError(
                    f"{where}, line {n}: key id {kid!r} is not 1 to 32 letters, digits, '.', '_' or '-'"
                )
            if any(k.id == kid for k in keys):
                raise ConfigError(f"{where}: key id {kid!r} appears twice", hint="give each key its own id")
            keys.append(Key(kid, secret))
    if not keys:
        raise ConfigError(f"{where} holds no key", hint="make a key file with: sluice keys create --out PATH")
    return keys


def format_ring(keys: Iterable[Key]) -> str:
    lines = [
        "# Sluice store encryption keys (AES-256-GCM): <id>:<base64 key>, the last one is current.",
        "# Keep every key that still opens stored rows (sluice keys status); never share this file.",
    ]
    lines += [f"{k.id}:{base64.b64encode(k.secret).decode('ascii')}" for k in keys]
    return "\n".join(lines) + "\n"


def write_ring(path: Path, keys: Iterable[Key], *, replace: bool) -> None:
    """Write a key file with mode 0600, atomically (a temporary file renamed over it)."""
    path = Path(path)
    if not replace and path.exists():
        raise ConfigError(f"{path} exists", hint="choose another path, or add a key to it with --add")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(format_ring(keys))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # whatever the umask
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if someone created it meanwhile
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _State:
    """One consistent view of the ring (replaced as a whole on reload; never changed in place)."""

    def __init__(self, keys: list[Key], stamp: object):
        self.keys = keys
        self.current = keys[-1]
        self.by_id = {k.id: AESGCM(k.secret) for k in keys}
        self.stamp = stamp
        self.header = ENCRYPTED + bytes([len(self.current.id)]) + self.current.id.encode("ascii")


class KeyRing:
    """The keys that seal and open stored values, from a key file, a variable or given directly."""

    def __init__(self, keys: list[Key] | None = None, *, file: Path | None = None, env: str | None = None):
        self.file = Path(file) if file is not None else None
        self.env = env
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        if keys is not None:
            self._state = _State(list(keys), None)
        else:
            self._state = self._read()

    # -- loading --------------------------------------------------------
    def _where(self) -> str:
        if self.file is not None:
            return f"key file {self.file}"
        return f"environment variable {self.env}"

    def _stamp(self) -> object:
        if self.file is None:
            return None
        st = os.stat(self.file)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _read(self) -> _State:
        if self.file is not None:
            try:
                stamp = self._stamp()
                text = self.file.read_text(encoding="ascii")
            except FileNotFoundError:
                raise ConfigError(
                    f"key file {self.file} not found",
                    key="store_encryption.key_file",
                    hint="make one with: sluice keys create --out PATH",
                ) from None
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    f"cannot read key file {self.file}: {exc}", key="store_encryption.key_file"
                ) from None
            return _State(parse_ring(text, self._where()), stamp)
        if self.env is not None:
            text = os.environ.get(self.env, "")
            if not text.strip():
                raise ConfigError(
                    f"environment variable {self.env} is not set or empty",
                    key="store_encryption.env",
                    hint="set it to a key ring: sluice keys create --out - prints one",
                )
            return _State(parse_ring(text, self._where()), None)
        raise ConfigError("a key ring needs keys, a key file or an environment variable")

    def reload(self) -> bool:
        """Read the key file again if it changed; True when the keys changed.  A broken file keeps the old keys."""
        if self.file is None:
            return False
        with self._lock:
            self._checked = time.monotonic()
            try:
                if self._stamp() == self._state.stamp:
                    return False
                state = self._read()
            except (OSError, ConfigError):
                return False  # mid-edit or removed: go on with the keys we have
            changed = [k.id for k in state.keys] != [k.id for k in self._state.keys]
            self._state = state
            return changed

    def _maybe_reload(self) -> None:
        if self.file is not None and time.monotonic() - self._checked >= RELOAD_EVERY:
            self.reload()

    # -- use --------------------------------------------------------------
    @property
    def current(self) -> Key:
        return self._state.current

    @property
    def keys(self) -> list[Key]:
        return list(self._state.keys)

    def current_header(self) -> bytes:
        """The first bytes of every value sealed with the current key (what ``keys rotate`` looks for)."""
        self._maybe_reload()
        return self._state.header

    def seal(self, data: bytes, purpose: bytes) -> bytes:
        self._maybe_reload()
        s = self._state
        nonce = os.urandom(NONCE)
        return s.header + nonce + s.by_id[s.current.id].encrypt(nonce, data, s.header + purpose)

    def open(self, stored: bytes, purpose: bytes) -> bytes:
        """The plain value of a sealed frame (``stored`` starts with :data:`ENCRYPTED`)."""
        n = stored[4] if len(stored) > 4 else 0
        end = 5 + n
        kid = stored[5:end].decode("ascii", "replace")
        aead = self._state.by_id.get(kid)
        if aead is None:
            self.reload()
            aead = self._state.by_id.get(kid)
            if aead is None:
                raise StoreError(
                    f"a stored value is encrypted with key {kid!r}, which is not in the {self._where()}; "
                    "add that key back to the ring (keys are only removed once no row uses them: "
                    "sluice keys status)"
                )
        try:
            return aead.decrypt(stored[end : end + NONCE], stored[end + NONCE :], stored[:end] + purpose)
        except InvalidTag:
            raise StoreError(
                f"a stored value ({purpose.decode()}) does not decrypt with key {kid!r}: "
                "the key in the ring is not the one it was sealed with, or the value was altered"
            ) from None


def key_id_of(stored: bytes | None) -> str | None:
    """The key id of a sealed value; ``""`` for a plain value, None for no value."""
    if stored is None:
        return None
    if stored[:4] != ENCRYPTED:
        return ""
    n = stored[4] if len(stored) > 4 else 0
    return bytes(stored[5 : 5 + n]).decode("ascii", "replace")


def seal(ring: KeyRing | None, data: bytes, purpose: bytes) -> bytes:
    """The stored form of ``data``: sealed with the current key, or plain when there is no ring."""
    if ring is not None:
        return ring.seal(data, purpose)
    if data[:3] == PREFIX:
        return PLAIN + data  # never mistaken for a frame
    return data


def unseal(ring: KeyRing | None, stored: bytes, purpose: bytes) -> bytes:
    """The value a stored form stands for (see the module docstring)."""
    if stored[:3] != PREFIX:
        return stored if isinstance(stored, bytes) else bytes(stored)
    head = stored[:4]
    if head == ENCRYPTED:
        if ring is None:
            raise StoreError(
                f"the store holds encrypted values (key {key_id_of(bytes(stored))!r}) but no key ring is "
                "configured: add store_encryption to routes.yaml (the key file or variable the engine uses)"
            )
        return ring.open(bytes(stored), purpose)
    if head == PLAIN:
        return bytes(stored[4:])
    return stored if isinstance(stored, bytes) else bytes(stored)


def from_config(cfg: object) -> KeyRing | None:
    """The key ring ``store_encryption`` in a :class:`engine.config.Config` names, or None when it is off."""
    enc = getattr(cfg, "store_encryption", None)
    if enc is None:
        return None
    if enc.key_file is not None:
        return KeyRing(file=Path(enc.key_file))
    return KeyRing(env=enc.env)
