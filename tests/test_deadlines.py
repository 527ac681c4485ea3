"""Coarse per-request deadlines: a passed deadline cancels the wait and says so, a disarmed one
never fires, someone else's cancellation is not mistaken for a timeout, and concurrent
requests share timers."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from proxy.deadlines import Deadlines

T = TypeVar("T")


def spawn(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    return asyncio.get_running_loop().create_task(coro)


async def _wait_with_deadline(
    deadlines: Deadlines,
    seconds: float,
    wait: asyncio.Event,
    armed: asyncio.Event | None = None,
) -> str:
    """The pattern the pipeline uses; returns how the wait ended. `armed` is set once the
    deadline is armed and the wait is about to start."""
    try:
        with deadlines.within(seconds):
            if armed is not None:
                armed.set()
            await wait.wait()
        return "done"
    except TimeoutError:
        return "timed out"


async def test_a_passed_deadline_ends_the_wait_as_a_timeout_not_before_it() -> None:
    deadlines = Deadlines(resolution=0.02)
    loop = asyncio.get_running_loop()
    started = loop.time()
    outcome = await spawn(_wait_with_deadline(deadlines, 0.1, asyncio.Event()))
    assert outcome == "timed out"
    assert loop.time() - started >= 0.1
    assert deadlines.ticks() == 0


async def test_a_disarmed_deadline_never_cancels_later_work() -> None:
    deadlines = Deadlines(resolution=0.02)
    ready = asyncio.Event()
    ready.set()
    survivor_done = asyncio.Event()

    async def survivor() -> tuple[str, int]:
        outcome = await _wait_with_deadline(deadlines, 0.05, ready)  # answered in time
        await survivor_done.wait()  # still running when its old tick fires
        task = asyncio.current_task()
        assert task is not None
        return outcome, task.cancelling()

    task = spawn(survivor())
    # A second request armed later with the same budget: once it has timed out, the
    # survivor's tick (the same or an earlier one) has fired as well.
    assert await _wait_with_deadline(deadlines, 0.05, asyncio.Event()) == "timed out"
    survivor_done.set()
    assert await task == ("done", 0)


async def test_someone_elses_cancellation_is_not_reported_as_a_timeout() -> None:
    deadlines = Deadlines(resolution=0.02)
    armed = asyncio.Event()
    task = spawn(_wait_with_deadline(deadlines, 60.0, asyncio.Event(), armed))
    await armed.wait()
    task.cancel()  # a shutdown, say ...
    deadlines._fire(next(iter(deadlines._due)))  # ... just as the deadline passes
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_a_plain_cancellation_propagates() -> None:
    deadlines = Deadlines()
    armed = asyncio.Event()
    task = spawn(_wait_with_deadline(deadlines, 60.0, asyncio.Event(), armed))
    await armed.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_concurrent_requests_share_one_timer_per_tick() -> None:
    resolution = 0.05
    deadlines = Deadlines(resolution=resolution)
    release = asyncio.Event()
    loop = asyncio.get_running_loop()
    started = loop.time()
    armed = [asyncio.Event() for _ in range(1000)]
    tasks = [spawn(_wait_with_deadline(deadlines, 30.0, release, a)) for a in armed]
    for a in armed:
        await a.wait()
    spread = loop.time() - started
    # Deadlines armed over `spread` seconds fall into the ticks that span covers (usually a
    # few milliseconds: one or two 50 ms ticks), not one timer per request.
    assert 1 <= deadlines.ticks() <= math.ceil(spread / resolution) + 1
    assert deadlines.ticks() < len(tasks)
    release.set()
    assert await asyncio.gather(*tasks) == ["done"] * 1000
    assert "armed=0" in repr(deadlines)


async def test_arming_outside_a_task_is_refused() -> None:
    deadlines = Deadlines()

    def outside() -> None:
        deadlines.within(1.0)

    loop = asyncio.get_running_loop()
    failure: asyncio.Future[BaseException] = loop.create_future()

    def callback() -> None:
        try:
            outside()
        except RuntimeError as exc:
            failure.set_result(exc)

    loop.call_soon(callback)
    assert "running task" in str(await failure)
