"""Coalescing of concurrent calls into one batch call.

Each Redis round trip costs the caller more Python (redis-py's command path) than Redis
costs to run a small script, so a busy worker that reports every task alone spends most of
its time on round trips. :class:`Coalescer` collects the calls made in one event-loop tick
(and those made while a batch is in flight) and runs them as one batch. It never waits for
more work: a lone call goes out on the next loop iteration, so an idle system sees no extra
latency; batches only form when calls pile up. With ``alone_first``, while calls come one
at a time (the last call carried one item), a call made while nothing is in flight goes out
at once, in its caller's own task (no flushing task to start, no loop iteration to wait for:
a task's report is on the path of every awaited task), and the calls that pile up behind it
go out together; once they pile up (the last call carried several), every call waits for the
loop's turn again, so that a busy worker's reports keep sharing calls. Callers whose calls
should all share one batch (the heartbeats of one agent's GPUs) leave it off.
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

    One batch is in flight at a time (per event loop); up to ``max_batch`` items go in each.
    With ``alone_first``, a call made while nothing is in flight and the last call carried
    one item goes alone, at once; the batch of the calls made meanwhile may run alongside it.
    When the batch call itself fails (a lost connection), every item in it gets that error;
    with ``timeout_s``, a batch call that runs longer fails its items with ``TimeoutError``
    (one timer per batch, not per caller).
    A caller cancelled after its batch left may still have had its item applied, as with
    any cancelled remote call. No caller waits forever: if the flushing task dies (cancelled
    at shutdown), the items it had not answered are cancelled.
    """

    def __init__(
        self,
        call: BatchCall[T, R],
        max_batch: int = 128,
        timeout_s: float | None = None,
        *,
        alone_first: bool = False,
    ) -> None:
        self._call = call
        self._max = max(1, max_batch)
        self._timeout = timeout_s
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._flushers: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}
        self._alone_first = alone_first
        self._alone: set[asyncio.AbstractEventLoop] = set()  # loops with a lone call out
        self._quiet = True  # the last call carried one item: calls come one at a time

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        flusher = self._flushers.get(loop)
        if (
            self._alone_first
            and self._quiet
            and loop not in self._alone
            and (flusher is None or flusher.done())
        ):
            return await self._alone_call(loop, item)
        fut: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, fut))
        if flusher is None or flusher.done():
            self._flushers = {lp: t for lp, t in self._flushers.items() if not lp.is_closed()}
            self._flushers[loop] = loop.create_task(self._flush(loop))
        return await fut

    async def _alone_call(self, loop: asyncio.AbstractEventLoop, item: T) -> R:
        """``item`` as a batch of one, in the caller's task (cancelled with its caller)."""
        self._alone.add(loop)
        try:
            async with asyncio.timeout(self._timeout):
                results = await self._call([item])
        finally:
            self._alone.discard(loop)
        if len(results) != 1:
            raise RuntimeError(f"batch call answered {len(results)} of 1")
        result = results[0]
        if isinstance(result, Exception):
            raise result
        return result

    def _take(
        self, loop: asyncio.AbstractEventLoop, limit: int
    ) -> list[tuple[T, asyncio.Future[R]]]:
        """Up to ``limit`` pending items of ``loop``, out of the pending list (the items of a
        closed loop are dropped: nobody can be answered there)."""
        taken: list[tuple[T, asyncio.Future[R]]] = []
        kept: list[tuple[T, asyncio.Future[R]]] = []
        for entry in self._pending:
            owner = entry[1].get_loop()
            if owner is loop and len(taken) < limit:
                taken.append(entry)
            elif not owner.is_closed():
                kept.append(entry)
        self._pending = kept
        return taken

    async def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        live: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while batch := self._take(loop, self._max):
                live = [(item, fut) for item, fut in batch if not fut.done()]
                if not live:
                    continue
                results: Sequence[R | Exception]
                self._quiet = len(live) == 1
                try:
                    async with asyncio.timeout(self._timeout):
                        results = await self._call([item for item, _ in live])
                except Exception as exc:
                    results = [exc] * len(live)
                if len(results) != len(live):
                    error = RuntimeError(f"batch call answered {len(results)} of {len(live)}")
                    results = [error] * len(live)
                for (_, fut), result in zip(live, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(result, Exception):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)
                live = []
        finally:
            for _, fut in live + self._take(loop, len(self._pending)):
                if not fut.done():
                    fut.cancel()
