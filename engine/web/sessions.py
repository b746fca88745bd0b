"""Console sessions and CSRF tokens (pure: an injectable clock, no I/O).

The browser holds only an opaque session id in an HttpOnly, SameSite=Strict cookie.  The
server keeps, per session, who logged in (a :class:`Principal`, never the token), a CSRF
token and two deadlines: an idle one, moved on by every request, and an absolute one (never
later than the token's or the OIDC token's own expiry).  The map is keyed by a hash of the
session id, so even a dump of the process memory holds no usable cookie.  Sessions live in
the engine process: a restart logs everyone out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.admin.roles import Principal

IDLE_SECONDS = 30 * 60.0
MAX_SECONDS = 12 * 3600.0
RECHECK_SECONDS = 5.0  # how often a session's API token is checked again (revoked or expired ends it)
MAX_SESSIONS = 10_000


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "surrogateescape")).hexdigest()


def same_secret(a: str, b: str) -> bool:
    """Constant-time comparison of two secrets (False when either is empty)."""
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())


@dataclass
class Session:
    who: Principal
    csrf: str
    created_at: float
    expires_at: float  # absolute
    idle_until: float
    token_created_at: float | None = None  # a Sluice token's creation time: tells it from a later namesake
    checked_at: float = 0.0
    flash: str = ""  # a one-time notice for the next page ("Channel adt paused.")


class SessionStore:
    def __init__(
        self,
        *,
        idle: float = IDLE_SECONDS,
        max_age: float = MAX_SECONDS,
        clock: Callable[[], float] = time.time,
    ):
        self.idle = idle
        self.max_age = max_age
        self.clock = clock
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(
        self,
        who: Principal,
        *,
        expires_at: float | None = None,
        token_created_at: float | None = None,
    ) -> tuple[str, Session]:
        """A new session for ``who``; returns (session id for the cookie, session)."""
        now = self.clock()
        self.prune(now)
        if len(self._sessions) >= MAX_SESSIONS:  # the oldest go first
            for key, _ in sorted(self._sessions.items(), key=lambda kv: kv[1].created_at)[
                : MAX_SESSIONS // 10
            ]:
                del self._sessions[key]
        hard = now + self.max_age if expires_at is None else min(now + self.max_age, expires_at)
        sid = secrets.token_urlsafe(32)
        s = Session(
            who=who,
            csrf=secrets.token_urlsafe(32),
            created_at=now,
            expires_at=hard,
            idle_until=min(hard, now + self.idle),
            token_created_at=token_created_at,
            checked_at=now,
        )
        self._sessions[_key(sid)] = s
        return sid, s

    def get(self, session_id: str | None) -> Session | None:
        """The live session for a cookie value (its idle deadline moves on), or None."""
        if not session_id or len(session_id) > 200:
            return None
        key = _key(session_id)
        s = self._sessions.get(key)
        if s is None:
            return None
        now = self.clock()
        if now >= s.expires_at or now >= s.idle_until:
            del self._sessions[key]
            return None
        s.idle_until = min(s.expires_at, now + self.idle)
        return s

    def end(self, session_id: str | None) -> bool:
        if not session_id:
            return False
        return self._sessions.pop(_key(session_id), None) is not None

    def prune(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        for k in [k for k, s in self._sessions.items() if now >= s.expires_at or now >= s.idle_until]:
            del self._sessions[k]

    def due_for_check(self, s: Session) -> bool:
        return self.clock() - s.checked_at >= RECHECK_SECONDS

    def checked(self, s: Session) -> None:
        s.checked_at = self.clock()


def safe_next(target: str | None, default: str = "/") -> str:
    """A same-site path to go to after login; anything else (another host, a scheme) → ``default``."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    if any(ord(c) < 0x20 for c in target) or len(target) > 2000:
        return default
    return target
