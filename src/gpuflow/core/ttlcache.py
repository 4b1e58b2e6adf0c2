"""A per-process cache of values read from Redis, refreshed at most once per TTL per key.

The API caches what every task creation needs (a task type's config, the fleet's capacity)
for a second or two. A plain "read when expired" cache lets every request that arrives
while the value is expired do the read itself: with 32 requests in flight that is 32 reads
of the same hash, or 32 reads of every GPU record of a 10,000-GPU fleet, each time the
value expires. :class:`TtlCache` lets concurrent callers of an expired key share one read.

Not async-lru (aio-libs), which also shares concurrent calls: a ``drop`` here (after a
write in this process) must also keep a read that started before the write from storing
its stale answer, and one instance serves callers on different event loops (tests, the
agent's threads), which async-lru's loop-bound futures do not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """``await get(key)``: ``load(key)``'s answer, at most ``ttl`` seconds old."""

    def __init__(
        self, ttl: float, load: Callable[[K], Awaitable[V]], max_keys: int = 100_000
    ) -> None:
        self.ttl = ttl
        self._load = load
        self._max_keys = max_keys  # keys come and go (GPU ids): past this, start afresh
        self._values: dict[K, tuple[float, V]] = {}
        # Keyed by generation too: a caller after drop() must not join a read begun before it.
        self._flights: dict[tuple[K, asyncio.AbstractEventLoop, int], asyncio.Task[V]] = {}
        self._generation = 0

    async def get(self, key: K) -> V:
        hit = self._values.get(key)
        if hit is not None and time.monotonic() - hit[0] < self.ttl:
            return hit[1]
        loop = asyncio.get_running_loop()
        at = (key, loop, self._generation)
        flight = self._flights.get(at)
        if flight is None:
            flight = loop.create_task(self._fill(at, time.monotonic()))
            self._flights[at] = flight
        # Shielded: one caller giving up (a cancelled request) must not cancel the others' read.
        return await asyncio.shield(flight)

    def drop(self) -> None:
        """Forget every value, and keep reads now in flight from storing theirs."""
        self._values.clear()
        self._generation += 1

    async def _fill(self, at: tuple[K, asyncio.AbstractEventLoop, int], started: float) -> V:
        key, _, generation = at
        try:
            value = await self._load(key)
            if generation == self._generation:
                if len(self._values) >= self._max_keys:
                    self._values.clear()
                self._values[key] = (started, value)
            return value
        finally:
            self._flights.pop(at, None)
