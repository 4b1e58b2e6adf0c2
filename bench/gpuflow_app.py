"""gpuflow's side of the benchmark: the worker served by ``gpuflow worker`` (an async no-op
handler that echoes its payload) and the enqueue / end-to-end drivers.

The drivers run in the orchestrator's process (the project's own venv): the direct path is
``System.tasks.create`` (what the API calls), the HTTP path is :class:`gpuflow.client.AsyncClient`
against ``gpuflow api``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Literal

from gpuflow.client import AsyncClient
from gpuflow.config import Settings
from gpuflow.core.system import System
from gpuflow.core.tasks import NewTask
from gpuflow.worker import TaskContext, Worker

TASK_TYPE = 1
#: Round trips each side of a duel (http_e2e_turns) makes before its samples.
DUEL_WARM_UP = 100
BATCH_CONCURRENCY = 64
# Over HTTP: 32, as the HTTP ceiling's load generator (the api also takes 64 without errors:
# its Redis pool waits for a free connection instead of failing).
HTTP_CONCURRENCY = 32
#: The client's documented fast transport (the `gpuflow[aiohttp]` extra); httpx's own pool
#: made 32 concurrent creates slower than sequential ones (~0.8k vs 1.1k/s; aiohttp ~2.7k/s).
TRANSPORT: Literal["aiohttp"] = "aiohttp"
worker = Worker(ref="bench.gpuflow_app:worker")


@worker.handler(TASK_TYPE)
async def noop(payload: Any, ctx: TaskContext) -> Any:
    return payload


def pct_ms(ms_samples: list[float]) -> dict[str, float]:
    """p50 / p99 (nearest rank) and n of samples in ms."""
    ms = sorted(ms_samples)
    at = lambda p: ms[min(len(ms) - 1, round(p * (len(ms) - 1)))]  # noqa: E731
    return {"p50": at(0.50), "p99": at(0.99), "n": len(ms)}


async def _gather_bounded(
    n: int, one: Any, deadline_s: float, conc: int = BATCH_CONCURRENCY
) -> float:
    sem = asyncio.Semaphore(conc)

    async def run() -> None:
        async with sem:
            await one()

    t0 = time.perf_counter()
    async with asyncio.timeout(deadline_s):
        await asyncio.gather(*(run() for _ in range(n)))
    return n / (time.perf_counter() - t0)


async def direct_enqueue(
    url: str, settings: Settings, n: int, *, batch: bool, deadline_s: float
) -> float:
    """Tasks/s through ``System.tasks.create``: one at a time, or 64 concurrent."""
    system = System.connect(url, settings)
    new = NewTask(task_type=TASK_TYPE, payload="")
    try:
        if batch:
            return await _gather_bounded(n, lambda: system.tasks.create(new), deadline_s)
        t0 = time.perf_counter()
        async with asyncio.timeout(deadline_s):
            for _ in range(n):
                await system.tasks.create(new)
        return n / (time.perf_counter() - t0)
    finally:
        await system.close()


async def http_enqueue(api: str, key: str, n: int, *, batch: bool, deadline_s: float) -> float:
    """Tasks/s through the Python client (POST /api/v2/tasks): one at a time, or 32 concurrent."""
    async with AsyncClient(api, api_key=key, transport=TRANSPORT) as gf:
        await gf.create_task(TASK_TYPE)  # warm up the connection
        if batch:
            one = lambda: gf.create_task(TASK_TYPE)  # noqa: E731
            return await _gather_bounded(n, one, deadline_s, HTTP_CONCURRENCY)
        t0 = time.perf_counter()
        async with asyncio.timeout(deadline_s):
            for _ in range(n):
                await gf.create_task(TASK_TYPE)
        return n / (time.perf_counter() - t0)


async def breakdown(url: str, settings: Settings, ids: list[str]) -> dict[str, float]:
    """Median ms from the task records (ms timestamps): created → started (dispatch) and
    started → completed (run + report)."""
    system = System.connect(url, settings)
    try:
        pipe = system.store.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hmget(system.store.keys.task(task_id), "createdAt", "startedAt", "completedAt")
        rows = [[int(x) for x in r] for r in await pipe.execute() if all(r)]
    finally:
        await system.close()
    if not rows:
        return {}
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {
        "dispatch_ms": med([s - c for c, s, _ in rows]),
        "run_report_ms": med([d - s for _, s, d in rows]),
        "in_redis_ms": med([d - c for c, _, d in rows]),
    }


#: How gpuflow's e2e round trip is made (the report's row and note).
E2E_HOW = "`AsyncClient.run_task`: `POST /api/v2/tasks?wait=30`, one request"


async def _round_trip(gf: AsyncClient, i: int) -> tuple[float, str]:
    """One task created and awaited: its ms and id (a task that did not complete fails)."""
    t0 = time.perf_counter()
    task = await gf.run_task(TASK_TYPE, {"i": i})
    took = (time.perf_counter() - t0) * 1000
    if task["status"] != "COMPLETED":
        raise RuntimeError(f"task {task['taskId']} ended {task['status']}")
    return took, task["taskId"]


async def http_e2e_turns(
    api: str,
    key: str,
    turns: int,
    per_turn: int,
    peer: Callable[[int], list[float]],
    deadline_s: float,
) -> tuple[list[float], list[float], list[str]]:
    """gpuflow (HTTP) and a peer taking turns: ``turns`` times ``per_turn`` round trips each,
    the first of each pair alternating; ``peer(n)`` makes the peer's n and returns their ms.
    Both warmed up first (the peer by its caller). gpuflow's ms, the peer's ms, gpuflow's
    task ids."""
    async with (
        asyncio.timeout(deadline_s),
        AsyncClient(api, api_key=key, transport=TRANSPORT) as gf,
    ):
        ids: list[str] = []
        ours: list[float] = []
        theirs: list[float] = []
        for _ in range(DUEL_WARM_UP):
            await _round_trip(gf, -1)
        for turn in range(turns):
            for who in ("peer", "gpuflow") if turn % 2 == 0 else ("gpuflow", "peer"):
                if who == "peer":
                    theirs += peer(per_turn)  # blocks this loop: gpuflow's client is idle
                    continue
                for i in range(per_turn):
                    took, task_id = await _round_trip(gf, i)
                    ours.append(took)
                    ids.append(task_id)
    return ours, theirs, ids


async def http_e2e(
    api: str, key: str, m: int, deadline_s: float, url: str = "", settings: Settings | None = None
) -> dict[str, Any]:
    """Submit one task and wait for its end, ``m`` times; p50 / p99 in ms (and, given the
    Redis ``url``, where the time goes: see :func:`breakdown`)."""
    async with (
        asyncio.timeout(deadline_s),
        AsyncClient(api, api_key=key, transport=TRANSPORT) as gf,
    ):
        await _round_trip(gf, -1)
        ids: list[str] = []
        samples: list[float] = []
        for i in range(m):
            took, task_id = await _round_trip(gf, i)
            samples.append(took)
            ids.append(task_id)
    parts = await breakdown(url, settings, ids) if url and settings else {}
    return {**pct_ms(samples), **parts, "how": E2E_HOW}
