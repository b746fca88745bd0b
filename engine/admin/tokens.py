"""Admin API tokens: created once, shown once, stored only as a hash.

A token is ``slc_`` plus 32 random bytes (URL-safe base64).  With that much entropy a
plain SHA-256 is the right hash: no salt or slow KDF is needed, and a lookup is one
indexed equality.  ``last_used_at`` is written at most once a minute per token.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from engine.admin import audit
from engine.admin.roles import Principal, check_role
from engine.store import TOKENS, Store

PREFIX = "slc_"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")
TOUCH_EVERY = 60.0


class TokenError(ValueError):
    """A token command that cannot be done; the message says what to do instead."""


class TokenExists(TokenError):
    pass


@dataclass(frozen=True)
class TokenInfo:
    name: str
    role: str
    phi: bool
    created_at: float
    created_by: str
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > time.time())


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def parse_duration(text: str) -> float:
    """``90d``, ``12h``, ``30m``, ``45s`` or a number of seconds → seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text or "")
    if not m:
        raise TokenError(f"cannot read the duration {text!r}: use e.g. 90d, 12h or 30m")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    return float(m.group(1)) * unit


def create(
    store: Store,
    name: str,
    role: str,
    *,
    phi: bool = False,
    expires_in: float | None = None,
    by: Principal,
    source: str = "",
) -> str:
    """Create a token and return its secret (the only time it is visible)."""
    if not NAME_RE.match(name):
        raise TokenError(
            f"token name {name!r} is not allowed: use letters, digits and _.@- (at most 100 characters)"
        )
    try:
        check_role(role)
    except ValueError as exc:
        raise TokenError(str(exc)) from None
    secret = PREFIX + secrets.token_urlsafe(32)
    now = time.time()
    try:
        with store.write() as conn:
            conn.execute(
                TOKENS.insert().values(
                    name=name,
                    role=role,
                    phi=phi,
                    secret_hash=hash_secret(secret),
                    created_at=now,
                    created_by=by.name,
                    expires_at=now + expires_in if expires_in else None,
                )
            )
            audit.record(
                conn,
                by,
                audit.TOKEN_CREATE,
                target=f"token:{name}",
                detail={"role": role, "phi": phi, "expires_at": now + expires_in if expires_in else None},
                source=source,
            )
    except IntegrityError:
        raise TokenExists(
            f"a token named {name!r} already exists: revoke it first (sluice token revoke {name}) "
            "or choose another name"
        ) from None
    return secret


def revoke(store: Store, name: str, *, by: Principal, source: str = "") -> None:
    with store.write() as conn:
        res = conn.execute(
            update(TOKENS)
            .where(TOKENS.c.name == name, TOKENS.c.revoked_at.is_(None))
            .values(revoked_at=time.time())
        )
        if not res.rowcount:
            raise TokenError(f"no active token named {name!r} (sluice token list shows them)")
        audit.record(conn, by, audit.TOKEN_REVOKE, target=f"token:{name}", source=source)


def listing(store: Store) -> list[TokenInfo]:
    with store.engine.connect() as conn:
        rows = conn.execute(select(TOKENS).order_by(TOKENS.c.name)).all()
    return [
        TokenInfo(
            r.name,
            r.role,
            bool(r.phi),
            r.created_at,
            r.created_by,
            r.expires_at,
            r.revoked_at,
            r.last_used_at,
        )
        for r in rows
    ]


class TokenVerifier:
    """Looks a presented secret up by its hash; remembers recent answers for a few seconds."""

    def __init__(self, store: Store, *, cache_s: float = 5.0):
        self.store = store
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._touched: dict[str, float] = {}

    def verify(self, secret: str, now: float | None = None) -> Principal | None:
        """The token's principal, or None for an unknown, revoked or expired token (blocking: run in a thread)."""
        now = time.time() if now is None else now
        if not secret.startswith(PREFIX):
            return None
        digest = hash_secret(secret)
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        with self.store.engine.connect() as conn:
            row = conn.execute(select(TOKENS).where(TOKENS.c.secret_hash == digest)).first()
        who: Principal | None = None
        if (
            row is not None
            and hmac.compare_digest(row.secret_hash, digest)
            and row.revoked_at is None
            and (row.expires_at is None or row.expires_at > now)
        ):
            who = Principal(row.name, "token", row.role, bool(row.phi))
            if (row.last_used_at or 0) < now - TOUCH_EVERY and self._touched.get(
                row.name, 0
            ) < now - TOUCH_EVERY:
                self._touched[row.name] = now
                with self.store.write(durable=False) as conn:
                    conn.execute(update(TOKENS).where(TOKENS.c.id == row.id).values(last_used_at=now))
        if len(self._cache) > 10_000:
            self._cache.clear()
        # A cached answer may outlive a revocation by at most cache_s (and never an expiry).
        until = now + self.cache_s
        if who is not None and row is not None and row.expires_at is not None:
            until = min(until, row.expires_at)
        self._cache[digest] = (until, who)
        return who
