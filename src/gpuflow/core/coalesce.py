"""Coalescing of concurrent calls into one batch call.

Each Redis round trip costs the caller more Python (redis-py's command path) than Redis
costs to run a small script, so a busy worker that reports every task alone spends most of
its time on round trips. :class:`Coalescer` collects the calls made in one event-loop tick
(and those made while a batch is in flight) and runs them as one batch. It never waits for
more work: a lone call goes out on the next loop iteration, so an idle system sees no extra
latency; batches only form when calls pile up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: A batch call: one result per item, in order; an exception in an item's place fails that
#: item only.
BatchCall = Callable[[list[T]], Awaitable[Sequence[R | Exception]]]


class Coalescer(Generic[T, R]):
    """``await submit(item)`` runs ``item`` as part of the next batch call.

    One batch is in flight at a time (per coalescer); up to ``max_batch`` items go in each.
    When the batch call itself fails (a lost connection), every item in it gets that error.
    A caller cancelled after its batch left may still have had its item applied, as with
    any cancelled remote call.
    """

    def __init__(self, call: BatchCall[T, R], max_batch: int = 128) -> None:
        self._call = call
        self._max = max(1, max_batch)
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, fut))
        flusher = self._flusher
        if flusher is None or flusher.done() or flusher.get_loop() is not loop:
            self._flusher = loop.create_task(self._flush(loop))
        return await fut

    async def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._pending:
            # Items of another (closed) event loop cannot be answered: drop them.
            pending = [(i, f) for i, f in self._pending if f.get_loop() is loop]
            batch, rest = pending[: self._max], pending[self._max :]
            self._pending = rest
            live = [(item, fut) for item, fut in batch if not fut.done()]
            if not live:
                continue
            try:
                results = await self._call([item for item, _ in live])
            except asyncio.CancelledError:
                for _, fut in live:
                    fut.cancel()
                raise
            except Exception as exc:
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(live, results, strict=True):
                if fut.done():
                    continue
                if isinstance(result, Exception):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)
