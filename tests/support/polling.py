"""Wait for a condition instead of sleeping a fixed time before an assert.

``wait_for(lambda: ..., what="...")`` polls until the condition returns something truthy and hands that
value back; if it never does within ``timeout`` it raises AssertionError saying what was awaited (and,
when ``what`` is a callable, what the state was at the end).  The timeout is a bound for a hung test,
not a measured timing: keep it generous, the call returns as soon as the condition holds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

Describe = str | Callable[[], str]


def _failure(what: Describe, timeout: float) -> AssertionError:
    text = what() if callable(what) else what
    return AssertionError(f"timed out after {timeout:g}s waiting for {text or 'the condition'}")


def wait_for(
    condition: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.05, what: Describe = ""
) -> T:
    """Poll ``condition`` until it returns a truthy value and return it; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _failure(what, timeout)
        time.sleep(interval)


async def wait_for_async(
    condition: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.01, what: Describe = ""
) -> T:
    """``wait_for`` inside an event loop: sleeps with ``asyncio.sleep`` so other tasks run meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _failure(what, timeout)
        await asyncio.sleep(interval)
