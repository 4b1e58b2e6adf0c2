"""worker/eager.py: a handler's first step runs in the caller; one that suspends goes on in a
task as if it had been one from the start."""

from __future__ import annotations

import asyncio

import pytest

from gpuflow.worker.eager import Started


async def test_a_coroutine_that_never_suspends_ends_in_the_first_step() -> None:
    ran: list[str] = []

    async def quick(x: int) -> int:
        ran.append("ran")
        return x * 2

    started = Started(quick(21))
    assert started.done and started.value == 42 and ran == ["ran"]
    with pytest.raises(RuntimeError, match="ended"):
        started.resume()


async def test_a_suspended_coroutine_goes_on_in_a_task_with_what_it_awaits() -> None:
    loop = asyncio.get_running_loop()
    first: asyncio.Future[str] = loop.create_future()
    second: asyncio.Future[str] = loop.create_future()
    steps: list[str] = []

    async def slow() -> str:
        steps.append("before")
        a = await first  # suspends in the first step
        await asyncio.sleep(0)  # a bare turn
        b = await second
        steps.append("after")
        return a + b

    started = Started(slow())
    assert not started.done and steps == ["before"]
    task = asyncio.ensure_future(started.resume())
    await asyncio.sleep(0)
    assert not task.done()
    first.set_result("x")
    await asyncio.sleep(0.01)
    assert not task.done()
    second.set_result("y")
    assert await task == "xy"
    assert steps == ["before", "after"]


async def test_an_error_after_suspending_reaches_the_task() -> None:
    async def failing() -> None:
        await asyncio.sleep(0)
        raise ValueError("boom")

    task = asyncio.ensure_future(Started(failing()).resume())
    with pytest.raises(ValueError, match="boom"):
        await task


async def test_cancelling_the_task_cancels_the_coroutine_where_it_waits() -> None:
    seen: list[str] = []
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def waiting() -> str:
        await asyncio.sleep(0)
        try:
            await never
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        return "unreachable"

    task = asyncio.ensure_future(Started(waiting()).resume())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"] and never.cancelled()


async def test_a_coroutine_may_swallow_a_cancellation_and_answer() -> None:
    async def stubborn() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "stopped cleanly"
        return "slept"

    task = asyncio.ensure_future(Started(stubborn()).resume())
    await asyncio.sleep(0.01)
    task.cancel()
    assert await task == "stopped cleanly"
