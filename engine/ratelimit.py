"""Per-destination protection for a target: a token-bucket rate limit and a concurrency cap.

Retries and backoff are the delivery worker's job; these only make sure a burst (clinic check-in at 8am)
cannot flood the target.  Both are asyncio-only and fair (FIFO) enough for one process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from types import TracebackType

from engine.errors import ConfigError


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst`` (default: max(1, rate)).

    ``await acquire()`` waits until a token is available.  Waiters are served in arrival order
    because only one of them sleeps at a time (the lock is held while waiting).  ``clock`` and
    ``sleep`` are ``time.monotonic`` and ``asyncio.sleep``; a test passes a fake pair to move time.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = float(rate)
        self.capacity = float(burst if burst is not None else max(1.0, rate))
        if self.capacity < 1:
            raise ValueError("burst must be >= 1")
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.capacity
        self._last = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def try_acquire(self) -> bool:
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    async def acquire(self) -> None:
        async with self._lock:
            while not self.try_acquire():
                await self._sleep((1 - self._tokens) / self.rate)


class Limiter:
    """Concurrency cap (``async with limiter.slot():``) plus a request-rate bucket (``await limiter.request()``).

    ``concurrency`` 0 or None = unlimited; ``rate_limit`` 0 or None = unlimited (requests per second).
    """

    def __init__(
        self, concurrency: int | None, rate_limit: float | None, *, burst: float | None = None
    ) -> None:
        self.concurrency = int(concurrency or 0)
        self.rate_limit = float(rate_limit or 0)
        self._sem = asyncio.Semaphore(self.concurrency) if self.concurrency > 0 else None
        self.bucket = TokenBucket(self.rate_limit, burst) if self.rate_limit > 0 else None
        self.in_flight = 0
        self.max_in_flight = 0

    @classmethod
    def from_options(cls, opts: dict[str, object], *, config_file: str, key: str) -> Limiter:
        """Build from a destination's ``concurrency`` / ``rate_limit`` options, validating them."""
        conc, rate = opts.get("concurrency"), opts.get("rate_limit")
        if not isinstance(conc, int) or isinstance(conc, bool) or conc < 0:
            raise ConfigError(
                f"concurrency must be a whole number >= 0, not {conc!r}",
                file=config_file,
                key=f"{key}.concurrency",
                hint="0 means unlimited",
            )
        if not isinstance(rate, int | float) or isinstance(rate, bool) or rate < 0:
            raise ConfigError(
                f"rate_limit must be a number of requests per second >= 0, not {rate!r}",
                file=config_file,
                key=f"{key}.rate_limit",
                hint="0 means unlimited",
            )
        return cls(conc, float(rate))

    async def request(self) -> None:
        """Wait for a rate-limit token (call once per request sent to the target)."""
        if self.bucket is not None:
            await self.bucket.acquire()

    def slot(self) -> _Slot:
        return _Slot(self)


class _Slot:
    def __init__(self, limiter: Limiter) -> None:
        self._l = limiter

    async def __aenter__(self) -> None:
        if self._l._sem is not None:
            await self._l._sem.acquire()
        self._l.in_flight += 1
        self._l.max_in_flight = max(self._l.max_in_flight, self._l.in_flight)

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._l.in_flight -= 1
        if self._l._sem is not None:
            self._l._sem.release()
