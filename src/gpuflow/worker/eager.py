"""Eager start of an in-loop handler: its first step runs in the caller's task.

A handler that ends without suspending (a quick transform, a cached answer) then needs no
task of its own, no timer and no waiter: its outcome is known at once. One that suspends
goes on in a task that resumes it where it stopped, supervised as before. Python 3.12's
``asyncio.eager_task_factory`` does the same for every task of a loop; gpuflow runs on 3.11
and wants it only here (measured in docs/architecture.md, "One awaited task, hop by hop").
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Started(Generic[T]):
    """The first step of ``coro``: ``done`` with its ``value``, or suspended (``resume``)."""

    __slots__ = ("_coro", "_yielded", "done", "value")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        self._yielded: Any = None
        self.done = False
        self.value: T | None = None
        try:
            self._yielded = coro.send(None)
        except StopIteration as stop:
            self.done, self.value = True, stop.value

    def resume(self) -> Coroutine[Any, Any, T]:
        """A coroutine that goes on with the suspended one (for a task to run)."""
        if self.done:
            raise RuntimeError("the coroutine has ended")
        return _resumed(self)


async def _resumed(started: Started[T]) -> T:
    return await _Continuation(started._coro, started._yielded)


class _Continuation(Generic[T]):
    """Awaitable that drives a coroutine whose first step already yielded ``first``: what
    the coroutine yields goes up to the task (a future to wait for, or None for a bare
    turn), what the task sends or throws (a cancellation) goes down to it."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, T], first: Any) -> None:
        self._coro, self._first = coro, first

    def __await__(self) -> Generator[Any, Any, T]:
        coro, out = self._coro, self._first
        while True:
            try:
                sent = yield out
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # a cancellation: it goes to the coroutine
                try:
                    out = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
            else:
                try:
                    out = coro.send(sent)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
