"""Background tasks: a fire-and-forget failure is logged, an awaited one reaches its waiter
only, and whatever is left is cancelled on close."""

from __future__ import annotations

import asyncio

import pytest

from proxy.tasks import TaskOwner
from tests.conftest import LogCapture


async def _fail(message: str) -> None:
    raise ValueError(message)


async def test_a_fire_and_forget_failure_is_logged_with_its_traceback(
    log_capture: LogCapture,
) -> None:
    owner = TaskOwner("runtime")
    task = owner.spawn(_fail("the reload broke"), name="reload")
    await asyncio.wait([task])  # its wake-up is a done callback queued after the owner's
    failures = [ln for ln in log_capture.lines() if ln.get("logger") == "authproxy.tasks"]
    assert len(failures) == 1
    assert failures[0]["level"] == "error"
    assert failures[0]["message"] == "background task reload of runtime failed"
    assert "ValueError: the reload broke" in failures[0]["exception"]
    assert len(owner) == 0


async def test_an_awaited_failure_goes_to_its_waiter_and_is_not_logged_twice(
    log_capture: LogCapture,
) -> None:
    owner = TaskOwner("token-cache", awaited=True)
    task = owner.spawn(_fail("token endpoint said no"), name="fetch")
    with pytest.raises(ValueError, match="token endpoint said no"):
        await task
    assert not [ln for ln in log_capture.lines() if ln.get("logger") == "authproxy.tasks"]
    assert len(owner) == 0


async def test_close_cancels_what_is_left_without_logging_it(log_capture: LogCapture) -> None:
    owner = TaskOwner("runtime")
    task = owner.spawn(asyncio.Event().wait(), name="waits forever")
    await owner.aclose()
    assert task.cancelled()
    assert not [ln for ln in log_capture.lines() if ln.get("logger") == "authproxy.tasks"]
    with pytest.raises(RuntimeError, match="closed"):
        _ = owner.spawn(asyncio.sleep(0))
