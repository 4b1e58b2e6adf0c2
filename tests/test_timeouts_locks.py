"""Graded server-side timeouts, alerts, task-type defaults and the exclusive GPU lock."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from gpuflow.core.errors import Conflict
from gpuflow.core.gpus import GpuSpec
from gpuflow.core.models import GpuStatus, TaskStatus
from gpuflow.core.tasks import NewTask
from gpuflow.core.tasktypes import TaskTypeConfig

from .conftest import SystemFactory
from .servers import ApiServer

pytestmark = pytest.mark.redis


async def test_warning_then_hard_timeout(make_system: SystemFactory) -> None:
    system, maintenance = await make_system(
        timeout_grace_ms=200, timeout_warning_fraction=0.5, retry_on_timeout=False
    )
    await system.gpus.register(GpuSpec("g1", [1]))
    task_id = (await system.tasks.create(NewTask(1, "x", timeout=1000)))["taskId"]
    (t,) = await system.dispatch.claim("g1")
    await asyncio.sleep(0.6)  # past the warning (500 ms), not the hard limit (1200 ms)
    assert (await maintenance.tick())["timeouts"] == 1
    alerts, _ = await system.alerts.list(level="WARNING")
    assert task_id in alerts[0]["message"] and alerts[0]["source"] == "timeout_manager"
    assert (await system.tasks.get(task_id))["status"] == "PROCESSING"
    await asyncio.sleep(0.7)
    assert (await maintenance.tick())["timeouts"] == 1
    view = await system.tasks.get(task_id)
    assert (view["status"], view["completedAt"] is not None) == ("TIMEOUT", True)
    assert "hard timeout" in view["errorMessage"]
    with pytest.raises(Conflict):  # the late worker is fenced off
        await system.tasks.finish(task_id, TaskStatus.COMPLETED, "late", attempt=t["attempt"])
    # Its agent learns to stop it at the next heartbeat.
    assert (await system.gpus.heartbeat("g1", {task_id: t["attempt"]})).stop == [task_id]


async def test_timed_out_attempt_is_retried_when_allowed(make_system: SystemFactory) -> None:
    system, maintenance = await make_system(timeout_grace_ms=0, retry_on_timeout=True)
    await system.gpus.register(GpuSpec("g1", [1]))
    task_id = (await system.tasks.create(NewTask(1, "x", timeout=1000, max_retries=1)))["taskId"]
    await system.dispatch.claim("g1")
    await asyncio.sleep(1.1)
    await maintenance.tick()
    view = await system.tasks.get(task_id)
    assert (view["status"], view["retryCount"]) == ("QUEUED", 1)


async def test_task_type_defaults_apply(make_system: SystemFactory) -> None:
    system, _ = await make_system()
    await system.task_types.put(TaskTypeConfig(6, "asr", timeout=5000, max_retries=7))
    own = (await system.tasks.create(NewTask(6, "x", timeout=9000)))["taskId"]
    typed = (await system.tasks.create(NewTask(6, "y")))["taskId"]
    plain = (await system.tasks.create(NewTask(7, "z")))["taskId"]
    assert [(await system.tasks.get(i))["timeout"] for i in (own, typed, plain)] == [
        9000, 5000, 300_000]  # fmt: skip
    assert (await system.tasks.get(typed))["maxRetries"] == 7
    assert (await system.tasks.get(plain))["maxRetries"] == 3


async def test_exclusive_type_holds_the_gpu_alone(make_system: SystemFactory) -> None:
    system, maintenance = await make_system(lease_ms=60_000)
    await system.task_types.put(TaskTypeConfig(9, "big-model", exclusive=True))
    await system.gpus.register(GpuSpec("g1", [1, 9], max_concurrent_tasks=3))
    solo = (await system.tasks.create(NewTask(9, "solo", priority=5)))["taskId"]
    others = [(await system.tasks.create(NewTask(1, str(i))))["taskId"] for i in range(3)]
    got = await system.dispatch.claim("g1")
    assert [t["taskId"] for t in got] == [solo]  # VIP first, and then nothing else
    assert (await system.gpus.lock("g1"))["owner"] == solo
    assert await system.dispatch.claim("g1") == []
    await system.tasks.finish(solo, TaskStatus.COMPLETED, "ok", attempt=got[0]["attempt"])
    assert (await system.gpus.lock("g1"))["locked"] is False
    assert sorted(t["taskId"] for t in await system.dispatch.claim("g1")) == sorted(others)
    # An exclusive task waits while others run: it goes back and the GPU drains.
    second = (await system.tasks.create(NewTask(9, "again")))["taskId"]
    assert await system.dispatch.claim("g1") == []
    assert (await system.tasks.get(second))["status"] == "QUEUED"
    assert (await maintenance.tick())["locks"] == 0


async def test_an_exclusive_task_never_joins_one_started_in_the_same_claim(
    make_system: SystemFactory,
) -> None:
    """The claim script adds started tasks to the GPU's running set only when it ends: an
    exclusive task read after another one in the same call still sees that one running."""
    system, _ = await make_system(lease_ms=60_000)
    await system.task_types.put(TaskTypeConfig(9, exclusive=True))
    await system.gpus.register(GpuSpec("g1", [1, 9], max_concurrent_tasks=3))
    first = (await system.tasks.create(NewTask(1, "first", priority=5)))["taskId"]
    solo = (await system.tasks.create(NewTask(9, "solo", priority=5)))["taskId"]
    got = await system.dispatch.claim("g1")
    assert [t["taskId"] for t in got] == [first]
    assert (await system.tasks.get(solo))["status"] == "QUEUED"
    assert (await system.gpus.lock("g1"))["locked"] is False
    running = await system.store.redis.smembers(system.store.keys.gpu_running("g1"))
    assert running == {first}


async def test_a_batch_of_reports_releases_the_lock_of_its_holder_only(
    make_system: SystemFactory,
) -> None:
    """One finish call reads each GPU's lock once: the holder's report releases it, a report
    of another GPU's task in the same batch does not, and both leave the running sets."""
    system, _ = await make_system(lease_ms=60_000)
    await system.task_types.put(TaskTypeConfig(9, exclusive=True))
    await system.gpus.register(GpuSpec("g1", [9]))
    await system.gpus.register(GpuSpec("g2", [1], max_concurrent_tasks=2))
    solo = (await system.tasks.create(NewTask(9, "solo")))["taskId"]
    plain = [(await system.tasks.create(NewTask(1, str(i))))["taskId"] for i in range(2)]
    assert len(await system.dispatch.claim("g1")) == 1
    assert len(await system.dispatch.claim("g2")) == 2
    ends = await asyncio.gather(
        system.tasks.finish(plain[0], TaskStatus.COMPLETED, "a", attempt=1),
        system.tasks.finish(solo, TaskStatus.COMPLETED, "b", attempt=1),
        system.tasks.finish(plain[1], TaskStatus.FAILED, "c", attempt=1, retryable=False),
    )
    assert ends == [TaskStatus.COMPLETED, TaskStatus.COMPLETED, TaskStatus.FAILED]
    assert (await system.gpus.lock("g1"))["locked"] is False
    for gpu in ("g1", "g2"):
        assert await system.store.redis.scard(system.store.keys.gpu_running(gpu)) == 0


async def test_stale_and_expired_locks_are_released(make_system: SystemFactory) -> None:
    system, maintenance = await make_system(lease_ms=300)
    await system.task_types.put(TaskTypeConfig(9, exclusive=True))
    await system.gpus.register(GpuSpec("g1", [9]))
    task_id = (await system.tasks.create(NewTask(9, "x")))["taskId"]
    await system.dispatch.claim("g1")
    # Stale: the owner ended without releasing (simulated by moving it on directly).
    await system.store.redis.hset(system.store.keys.task(task_id), "status", "FAILED")
    assert (await maintenance.tick())["locks"] == 1
    assert (await system.gpus.lock("g1"))["locked"] is False
    alerts, _ = await system.alerts.list(level="WARNING")
    assert any(a["title"] == "Stale GPU lock" for a in alerts)
    # Expired: a held lock that nobody renews disappears with its TTL.
    await system.store.redis.set(system.store.keys.gpulock("g1"), "someone", px=100)
    await asyncio.sleep(0.15)
    assert (await system.gpus.lock("g1"))["locked"] is False


async def test_faulty_threshold_raises_a_critical_alert(make_system: SystemFactory) -> None:
    system, _ = await make_system(gpu_fault_threshold=2)
    await system.gpus.register(GpuSpec("g1", [1]))
    for i in range(2):
        task_id = (await system.tasks.create(NewTask(1, str(i), max_retries=0)))["taskId"]
        (t,) = await system.dispatch.claim("g1")
        await system.tasks.finish(task_id, TaskStatus.FAILED, "CUDA error", attempt=t["attempt"])
    gpu = await system.gpus.get("g1")
    assert (gpu["status"], gpu["taskFailureCount"]) == ("FAULTY", 2)
    assert "2 consecutive task failures" in gpu["faultReason"]
    (alert,) = (await system.alerts.list(level="CRITICAL"))[0]
    assert alert["title"] == "GPU fault" and "g1" in alert["message"]
    await system.alerts.acknowledge(alert["id"], "ops")
    stats = await system.alerts.stats()
    assert (stats["critical_alerts"], stats["acknowledged_alerts"]) == (1, 1)
    with pytest.raises(Conflict):
        await system.alerts.acknowledge(alert["id"], "ops")
    await system.gpus.set_status("g1", GpuStatus.ACTIVE)
    assert (await system.gpus.get("g1"))["taskFailureCount"] == 0


async def test_lock_and_alert_endpoints(api_server: ApiServer) -> None:
    admin = {"X-API-Key": api_server.admin_key}
    async with httpx.AsyncClient(base_url=api_server.url, headers=admin) as c:
        r = await c.put("/api/v2/task-types/9", json={"name": "big", "exclusive": True})
        assert r.json()["data"] == {"taskType": 9, "name": "big", "timeout": None,
                                    "maxRetries": None, "exclusive": True}  # fmt: skip
        await c.post("/api/v2/gpus/register", json={"gpuId": "L1", "supportedTaskTypes": [9]})
        await c.post("/api/v2/tasks", json={"taskType": 9})
        (t,) = (await c.post("/api/v2/gpus/L1/claim", params={"wait": 1})).json()["data"]
        lock = await c.get("/api/v1/monitoring/gpu-lock/status", params={"gpuId": "L1"})
        assert lock.json()["data"]["owner"] == t["taskId"]
        r = await c.post("/api/v1/monitoring/lock/release", params={"gpuId": "L1"})
        assert t["taskId"] in r.json()["data"]
        lock = await c.get("/api/v1/monitoring/gpu-lock/status", params={"gpuId": "L1"})
        assert lock.json()["data"]["locked"] is False
        assert (await c.get("/api/v2/task-types")).json()["data"][0]["taskType"] == 9
        stats = (await c.get("/api/v2/monitoring/alerts/stats")).json()["data"]
        assert stats["total_alerts"] == 0
        assert (await c.post("/api/v2/monitoring/alerts/alert_x/acknowledge")).status_code == 404


async def test_a_broken_queue_key_does_not_stop_the_others_trim(
    make_system: SystemFactory,
) -> None:
    """The reclaim step goes on past a queue it cannot read (a key of another type) and
    forgets one that was deleted; the healthy queue is still trimmed."""
    system, maintenance = await make_system(lease_ms=60_000)
    redis, keys = system.store.redis, system.store.keys
    await system.gpus.register(GpuSpec("g1", [1], max_concurrent_tasks=5))
    for i in range(3):
        await system.tasks.create(NewTask(1, str(i)))
    assert len(await system.dispatch.claim("g1")) == 3
    queue = keys.queue(1, "NORMAL")
    assert await redis.xlen(queue) == 3  # acknowledged, not yet trimmed
    bogus, gone = keys.queue(77, "NORMAL"), keys.queue(78, "NORMAL")
    await redis.set(bogus, "not a stream")
    await redis.sadd(keys.queues, bogus, gone)
    await maintenance.tick()
    assert await redis.xlen(queue) <= 1  # the group's last delivered entry may stay
    assert not await redis.sismember(keys.queues, gone)
    assert await redis.sismember(keys.queues, bogus)  # kept: reported, not dropped
