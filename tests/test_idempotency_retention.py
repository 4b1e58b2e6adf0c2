"""Idempotent creation and retention (Redis memory stays bounded)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from gpuflow.config import Settings
from gpuflow.core.gpus import GpuSpec
from gpuflow.core.leader import Leadership
from gpuflow.core.loops import Maintenance
from gpuflow.core.models import TaskStatus
from gpuflow.core.system import System
from gpuflow.core.tasks import NewTask

from .servers import ApiServer


async def test_idempotency_key_returns_the_same_task(api_server: ApiServer) -> None:
    admin = {"X-API-Key": api_server.admin_key}
    async with httpx.AsyncClient(base_url=api_server.url, headers=admin) as c:
        body = {"taskType": 1, "payload": {"a": 1}}
        first = await c.post("/api/v2/tasks", json=body, headers={"Idempotency-Key": "k-1"})
        again = await c.post("/api/v2/tasks", json=body, headers={"Idempotency-Key": "k-1"})
        assert first.status_code == again.status_code == 200
        assert again.json()["data"]["taskId"] == first.json()["data"]["taskId"]
        other = await c.post("/api/v2/tasks", json={**body, "priority": 3},
                             headers={"Idempotency-Key": "k-1"})  # fmt: skip
        assert other.status_code == 409 and "different request body" in other.json()["message"]
        fresh = await c.post("/api/v2/tasks", json=body, headers={"Idempotency-Key": "k-2"})
        assert fresh.json()["data"]["taskId"] != first.json()["data"]["taskId"]
        too_long = await c.post("/api/v2/tasks", json=body, headers={"Idempotency-Key": "k" * 201})
        assert too_long.status_code == 400 and "Idempotency-Key" in too_long.json()["message"]
        listed = await c.get("/api/v2/tasks")
        assert listed.headers["X-Total-Count"] == "2"
        # Keys are scoped to the caller: another key may use the same name.
        key = (await c.post("/api/v2/keys", json={"role": "client", "userId": "u"})).json()
        mine = await c.post(
            "/api/v2/tasks",
            json=body,
            headers={"Idempotency-Key": "k-1", "X-API-Key": key["data"]["key"]},
        )
        assert mine.json()["data"]["taskId"] != first.json()["data"]["taskId"]  # fmt: skip


async def test_concurrent_repeats_create_one_task(api_server: ApiServer) -> None:
    admin = {"X-API-Key": api_server.admin_key, "Idempotency-Key": "same"}
    async with httpx.AsyncClient(base_url=api_server.url, headers=admin) as c:
        replies = await asyncio.gather(
            *(c.post("/api/v2/tasks", json={"taskType": 2}) for _ in range(10))
        )
        assert len({r.json()["data"]["taskId"] for r in replies}) == 1


@pytest.fixture
async def system(redis_url: str, settings: Settings) -> AsyncIterator[System]:
    s = System.connect(redis_url, settings.model_copy(update={"retention_s": 0}))
    yield s
    keys = [k async for k in s.store.redis.scan_iter(match=f"{settings.namespace}*")]
    if keys:
        await s.store.redis.delete(*keys)
    await s.close()


async def namespace_keys(system: System) -> set[str]:
    pattern = f"{system.settings.namespace}*"
    return {k async for k in system.store.redis.scan_iter(match=pattern, count=1000)}


@pytest.mark.redis
async def test_retention_deletes_finished_tasks_and_their_index_entries(system: System) -> None:
    leadership = Leadership(system.store, "ret")
    assert await leadership.step()
    maintenance = Maintenance(system, leadership)
    await system.gpus.register(GpuSpec("g1", [1], max_concurrent_tasks=50))
    await system.gpus.register(GpuSpec("g2", [1], max_concurrent_tasks=50))

    async def run_batch(n: int) -> None:
        for i in range(n):
            await system.tasks.create(NewTask(1, str(i), user_id=f"u{i % 3}", max_retries=1))
        for gpu in ("g1", "g2"):
            for t in await system.dispatch.claim(gpu):
                outcome = TaskStatus.FAILED if int(t["payload"]) % 7 == 0 else TaskStatus.COMPLETED
                await system.tasks.finish(t["taskId"], outcome, "x", attempt=t["attempt"])
        # Retried ones run again (on whichever GPU) and complete.
        for gpu in ("g1", "g2"):
            for t in await system.dispatch.claim(gpu):
                await system.tasks.finish(
                    t["taskId"], TaskStatus.COMPLETED, "y", attempt=t["attempt"]
                )

    await run_batch(60)
    await maintenance.tick()
    baseline = await namespace_keys(system)
    assert not any(":task:" in k for k in baseline)
    for _ in range(3):  # a steady stream: the key set does not grow
        await run_batch(60)
        await maintenance.tick()
        assert await namespace_keys(system) == baseline
    _, total = await system.tasks.list()
    assert total == 0
    for key in baseline:
        if ":idx:" in key:
            raise AssertionError(f"index {key} should be empty and gone")
