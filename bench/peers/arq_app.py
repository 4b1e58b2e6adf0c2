"""arq peer: a no-op coroutine; the end-to-end latency through ``Job.result``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from _common import DEADLINE_S, DONE_KEY, main, percentiles, redis_url
from arq import create_pool
from arq.connections import RedisSettings

POLL_S = 0.005  # arq's Job.result polls (default 0.5 s); the same 5 ms as gpuflow's wait


async def noop(ctx: dict[str, Any]) -> None:
    await ctx["redis"].incr(DONE_KEY)


async def echo(ctx: dict[str, Any], i: int) -> int:
    return i


class WorkerSettings:
    functions = [noop, echo]  # noqa: RUF012
    redis_settings = RedisSettings.from_dsn(redis_url())
    max_jobs = 50  # default 10
    poll_delay = 0.01  # default 0.5 s: the worker sleeps that long whenever it finds nothing


async def _single(k: int) -> dict[str, object]:
    pool = await create_pool(WorkerSettings.redis_settings)
    t0 = time.perf_counter()
    for _ in range(k):
        await pool.enqueue_job("noop")
    rate = k / (time.perf_counter() - t0)
    await pool.aclose()
    return {"rate": rate}


async def _batch(n: int) -> dict[str, object]:
    pool = await create_pool(WorkerSettings.redis_settings)
    sem = asyncio.Semaphore(64)

    async def one() -> None:
        async with sem:
            await pool.enqueue_job("noop")

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), DEADLINE_S)
    rate = n / (time.perf_counter() - t0)
    await pool.aclose()
    return {"rate": rate, "how": "no bulk API: enqueue_job, 64 concurrent"}


async def _e2e(m: int) -> dict[str, object]:
    pool = await create_pool(WorkerSettings.redis_settings)
    samples = []
    start = time.perf_counter()
    for i in range(-1, m):
        t0 = time.perf_counter()
        job = await pool.enqueue_job("echo", i)
        assert job is not None
        assert await job.result(timeout=30, poll_delay=POLL_S) == i
        if i >= 0:
            samples.append(time.perf_counter() - t0)
        if time.perf_counter() - start > DEADLINE_S:
            break
    await pool.aclose()
    return percentiles(samples)


if __name__ == "__main__":
    main(
        {
            "single": lambda k: asyncio.run(_single(k)),
            "batch": lambda n: asyncio.run(_batch(n)),
            "e2e": lambda m: asyncio.run(_e2e(m)),
        }
    )
