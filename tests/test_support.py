"""The shared test helpers themselves: CI detection and the polling wait."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from tests.support.ci import in_ci
from tests.support.polling import wait_for, wait_for_async


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, False, id="unset"),
        pytest.param("", False, id="empty"),
        pytest.param("false", False, id="false"),
        pytest.param("FALSE", False, id="false-upper"),
        pytest.param("0", False, id="zero"),
        pytest.param(" false ", False, id="false-spaced"),
        pytest.param("true", True, id="true"),
        pytest.param("True", True, id="true-capital"),
        pytest.param("1", True, id="one"),
        pytest.param("yes", True, id="yes"),
        pytest.param("woodpecker", True, id="a-ci-name"),
    ],
)
def test_in_ci(value: str | None, expected: bool) -> None:
    assert in_ci({} if value is None else {"CI": value}) is expected


def test_wait_for_returns_the_first_truthy_value() -> None:
    calls = itertools.count(1)
    assert wait_for(lambda: (n := next(calls)) >= 3 and n, interval=0) == 3


def test_wait_for_says_what_it_waited_for() -> None:
    state = {"rows": 2}
    with pytest.raises(AssertionError, match=r"timed out after 0s waiting for 5 rows \(have 2\)"):
        wait_for(lambda: state["rows"] >= 5, timeout=0, what=lambda: f"5 rows (have {state['rows']})")


def test_wait_for_async_lets_other_tasks_run() -> None:
    async def main() -> None:
        done: list[int] = []

        async def worker() -> None:
            await asyncio.sleep(0)
            done.append(1)

        task = asyncio.create_task(worker())
        assert await wait_for_async(lambda: done, what="the worker") == [1]
        await task
        with pytest.raises(AssertionError, match="waiting for nothing"):
            await wait_for_async(lambda: False, timeout=0, what="nothing")

    asyncio.run(main())
