"""An owner for background tasks: strong references, logged failures, cancelled on close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("authproxy.tasks")


class TaskOwner:
    """Keeps every task it starts alive until done, and cancels what is left in `aclose()`.

    `awaited=False` is for fire-and-forget work (a reload, a maintenance loop) that nobody
    awaits: a failure is logged with its traceback instead of vanishing. With `awaited=True`
    the tasks' waiters receive failures through their own await, and nothing is logged twice."""

    def __init__(self, name: str, *, awaited: bool = False) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._awaited = awaited

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self.name} is closed")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        # Retrieved either way, so asyncio does not report it as never retrieved.
        exc = task.exception()
        if exc is not None and not self._awaited:
            log.error("background task %s of %s failed", task.get_name(), self.name, exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    def __repr__(self) -> str:
        return f"<TaskOwner {self.name} running={len(self._tasks)} closed={self._closed}>"

    async def aclose(self) -> None:
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def alongside(coro: Coroutine[Any, Any, None], *, name: str) -> AsyncIterator[None]:
    """Run `coro` while the block runs (a lease keeper, say); when the block ends, cancel it
    and wait until it has stopped, so nothing it does lands after the block's own cleanup."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    try:
        yield
    finally:
        task.cancel()
        _ = await asyncio.wait([task])
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", name, exc_info=task.exception())
