"""Small asyncio helpers of the agent: interruptible sleep, a cancel that sticks, backoff,
and the background forwarding of a task's progress."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

CANCEL_TRIES = 20


async def sleep_unless(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep unless ``stop`` is set first; returns whether it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel and wait. On Python 3.11 a cancel can be lost in a race inside
    ``asyncio.wait_for`` (which redis-py uses), and the claim would then go on into its long
    poll: cancel again until it ends."""
    for _ in range(CANCEL_TRIES):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.1)
        if done:
            return
    await asyncio.wait({task})


class Backoff:
    """Exponential delays from `first` up to `cap`; `reset` after a success."""

    def __init__(self, first: float = 0.2, cap: float = 10.0) -> None:
        self.first, self.cap, self.next = first, cap, first

    def step(self) -> float:
        delay, self.next = self.next, min(self.next * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.next = self.first


class ProgressPump:
    """Forwards a task's progress in the background; only the latest pending value is kept."""

    def __init__(self, send: Callable[[int, str | None], Awaitable[None]]) -> None:
        self._send = send
        self._pending: tuple[int, str | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def push(self, percent: int, message: str | None) -> None:
        if self._closed:
            return
        self._pending = (percent, message)
        if self._task is None:
            self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._pending is not None:
                percent, message = self._pending
                self._pending = None
                await self._send(percent, message)
        finally:
            self._task = None

    async def close(self) -> None:
        """Send what is pending, then stop (before the outcome is reported)."""
        self._closed = True
        if self._task is not None:
            await self._task

    def cancel(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
