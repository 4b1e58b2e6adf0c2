"""saq peer: a no-op coroutine; the end-to-end latency through ``Queue.apply``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from _common import DEADLINE_S, DONE_KEY, main, percentiles, redis_url
from saq import Queue

queue = Queue.from_url(redis_url())
POLL_S = 0.005  # Queue.apply's poll_interval (default 0.5 s); the same 5 ms as gpuflow's wait


async def noop(ctx: dict[str, Any]) -> None:
    await queue.redis.incr(DONE_KEY)


async def echo(ctx: dict[str, Any], *, i: int) -> int:
    return i


settings = {"queue": queue, "functions": [noop, echo], "concurrency": 10}


async def _single(k: int) -> dict[str, object]:
    await queue.connect()
    t0 = time.perf_counter()
    for _ in range(k):
        await queue.enqueue("noop")
    return {"rate": k / (time.perf_counter() - t0)}


async def _batch(n: int) -> dict[str, object]:
    await queue.connect()
    sem = asyncio.Semaphore(64)

    async def one() -> None:
        async with sem:
            await queue.enqueue("noop")

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), DEADLINE_S)
    return {"rate": n / (time.perf_counter() - t0), "how": "enqueue, 64 concurrent"}


async def _e2e(m: int) -> dict[str, object]:
    await queue.connect()
    samples = []
    start = time.perf_counter()
    for i in range(-1, m):
        t0 = time.perf_counter()
        assert await queue.apply("echo", timeout=30, poll_interval=POLL_S, i=i) == i
        if i >= 0:
            samples.append(time.perf_counter() - t0)
        if time.perf_counter() - start > DEADLINE_S:
            break
    return percentiles(samples)


if __name__ == "__main__":
    main(
        {
            "single": lambda k: asyncio.run(_single(k)),
            "batch": lambda n: asyncio.run(_batch(n)),
            "e2e": lambda m: asyncio.run(_e2e(m)),
        }
    )
