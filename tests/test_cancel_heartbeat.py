"""Cancellation and the heartbeat's running-task reconciliation."""

from __future__ import annotations

import httpx
import pytest

from gpuflow.core.errors import Conflict
from gpuflow.core.gpus import GpuSpec
from gpuflow.core.models import TaskStatus
from gpuflow.core.tasks import NewTask

from .conftest import Services
from .servers import ApiServer

pytestmark = pytest.mark.redis


async def test_cancel_queued_task_is_never_started(services: Services) -> None:
    s = services
    await s.gpus.register(GpuSpec("g1", [1]))
    task_id = (await s.tasks.create(NewTask(1, "x")))["taskId"]
    assert await s.tasks.cancel(task_id) == TaskStatus.QUEUED
    assert (await s.tasks.get(task_id))["status"] == "CANCELED"
    assert await s.dispatch.claim("g1") == []
    with pytest.raises(Conflict, match="already CANCELED"):
        await s.tasks.cancel(task_id)


async def test_cancel_processing_fences_the_attempt_and_tells_the_agent(
    services: Services,
) -> None:
    s = services
    await s.gpus.register(GpuSpec("g1", [1]))
    task_id = (await s.tasks.create(NewTask(1, "x")))["taskId"]
    (t,) = await s.dispatch.claim("g1")
    assert await s.tasks.cancel(task_id) == TaskStatus.PROCESSING
    with pytest.raises(Conflict):
        await s.tasks.finish(task_id, TaskStatus.COMPLETED, "late", attempt=t["attempt"])
    # The slot stays taken until the agent has stopped the handler ...
    assert (await s.gpus.get("g1"))["currentTasks"] == 1
    reply = await s.gpus.heartbeat("g1", {task_id: t["attempt"]})
    assert reply.stop == [task_id]
    # ... and is free once the agent no longer lists it.
    assert (await s.gpus.heartbeat("g1", {})).stop == []
    assert (await s.gpus.get("g1"))["currentTasks"] == 0
    view = await s.tasks.get(task_id)
    assert (view["status"], view["result"]) == ("CANCELED", None)


async def test_heartbeat_reaps_tasks_the_agent_lost(services: Services) -> None:
    s = services
    await s.gpus.register(GpuSpec("g1", [1], max_concurrent_tasks=2))
    ids = [(await s.tasks.create(NewTask(1, str(i))))["taskId"] for i in range(2)]
    claimed = {t["taskId"]: t["attempt"] for t in await s.dispatch.claim("g1")}
    assert set(claimed) == set(ids)
    # Pretend both started long ago; the restarted agent only knows the first one.
    for task_id in ids:
        await s.store.redis.hset(s.store.keys.task(task_id), "startedAt", 1)
    reply = await s.gpus.heartbeat("g1", {ids[0]: claimed[ids[0]]})
    assert reply.stop == []
    lost = await s.tasks.get(ids[1])
    assert (lost["status"], lost["retryCount"]) == ("QUEUED", 1)
    assert "lost attempt" in lost["errorMessage"]
    assert (await s.tasks.get(ids[0]))["status"] == "PROCESSING"


async def test_a_just_claimed_task_is_not_reaped(services: Services) -> None:
    s = services
    await s.gpus.register(GpuSpec("g1", [1]))
    task_id = (await s.tasks.create(NewTask(1, "x")))["taskId"]
    await s.dispatch.claim("g1")
    # The heartbeat races the claim reply: the agent does not list the task yet.
    assert (await s.gpus.heartbeat("g1", {})).stop == []
    assert (await s.tasks.get(task_id))["status"] == "PROCESSING"


async def test_cancel_over_http(api_server: ApiServer) -> None:
    admin = {"X-API-Key": api_server.admin_key}
    async with httpx.AsyncClient(base_url=api_server.url, headers=admin) as c:
        await c.post("/api/v2/gpus/register", json={"gpuId": "h1", "supportedTaskTypes": [2]})
        task_id = (await c.post("/api/v2/tasks", json={"taskType": 2})).json()["data"]["taskId"]
        claimed = (await c.post("/api/v2/gpus/h1/claim", params={"wait": 1})).json()["data"]
        r = await c.post(f"/api/v2/tasks/{task_id}/cancel")
        assert r.json() == {"code": 200, "message": "success",
                            "data": "task canceled (was PROCESSING)"}  # fmt: skip
        assert (await c.post(f"/api/v2/tasks/{task_id}/cancel")).status_code == 409
        hb = {"running": [{"taskId": task_id, "attempt": claimed[0]["attempt"]}]}
        r = await c.post("/api/v2/gpus/h1/heartbeat", json=hb)
        assert r.json()["data"] == {"status": "ACTIVE", "stop": [task_id]}
        r = await c.post("/api/v2/gpus/h1/heartbeat")
        assert r.json()["data"] == "heartbeat updated"
        assert (await c.post("/api/v2/tasks/task_nope/cancel")).status_code == 404
