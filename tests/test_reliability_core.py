"""Leases, OFFLINE detection, reclaiming stale claims and leader election, on a real Redis."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from gpuflow.core.errors import Conflict
from gpuflow.core.gpus import GpuSpec
from gpuflow.core.leader import Leadership
from gpuflow.core.models import TaskStatus
from gpuflow.core.tasks import NewTask
from gpuflow.store.keys import GROUP

from .conftest import SystemFactory
from .servers import ApiServer

pytestmark = pytest.mark.redis


async def test_expired_lease_requeues_and_fences_off_the_late_worker(
    make_system: SystemFactory,
) -> None:
    system, maintenance = await make_system(lease_ms=200)
    await system.gpus.register(GpuSpec("g1", [1]))
    task_id = (await system.tasks.create(NewTask(1, "x")))["taskId"]
    (first,) = await system.dispatch.claim("g1")
    await asyncio.sleep(0.3)  # the lease (200 ms) runs out: nobody renewed it
    assert (await maintenance.tick())["expired"] == 1
    view = await system.tasks.get(task_id)
    assert (view["status"], view["retryCount"]) == ("QUEUED", 1)
    assert "lease expired" in view["errorMessage"]
    assert (await system.gpus.get("g1"))["currentTasks"] == 0
    (second,) = await system.dispatch.claim("g1")
    assert second["attempt"] == first["attempt"] + 1
    with pytest.raises(Conflict, match="stale attempt"):
        await system.tasks.finish(task_id, TaskStatus.COMPLETED, "late", attempt=first["attempt"])
    await system.tasks.finish(task_id, TaskStatus.COMPLETED, "good", attempt=second["attempt"])
    assert (await system.tasks.get(task_id))["result"] == "good"


async def test_lease_expiry_with_no_retries_left_fails(make_system: SystemFactory) -> None:
    system, maintenance = await make_system(lease_ms=100)
    await system.gpus.register(GpuSpec("g1", [1]))
    task_id = (await system.tasks.create(NewTask(1, "x", max_retries=0)))["taskId"]
    await system.dispatch.claim("g1")
    await asyncio.sleep(0.2)
    await maintenance.tick()
    assert (await system.tasks.get(task_id))["status"] == "FAILED"


async def test_heartbeats_keep_a_long_task_alive(make_system: SystemFactory) -> None:
    system, maintenance = await make_system(lease_ms=300)
    await system.gpus.register(GpuSpec("g1", [1]))
    task_id = (await system.tasks.create(NewTask(1, "x")))["taskId"]
    await system.dispatch.claim("g1")
    for _ in range(6):  # 0.6 s in all, twice the lease
        await asyncio.sleep(0.1)
        await system.gpus.heartbeat("g1")
        assert (await maintenance.tick())["expired"] == 0
    assert (await system.tasks.get(task_id))["status"] == "PROCESSING"


async def test_silent_gpu_goes_offline_and_its_tasks_move(make_system: SystemFactory) -> None:
    system, maintenance = await make_system(gpu_offline_after_s=0.2, lease_ms=60_000)
    await system.gpus.register(GpuSpec("quiet", [1], max_concurrent_tasks=2))
    await system.gpus.register(GpuSpec("alive", [1], max_concurrent_tasks=2))
    ids = [(await system.tasks.create(NewTask(1, str(i))))["taskId"] for i in range(2)]
    assert len(await system.dispatch.claim("quiet")) == 2
    await asyncio.sleep(0.3)
    await system.gpus.heartbeat("alive")
    assert (await maintenance.tick())["offline"] == 1
    quiet = await system.gpus.get("quiet")
    assert (quiet["status"], quiet["currentTasks"], quiet["failureCount"]) == ("OFFLINE", 0, 1)
    assert (await system.gpus.get("alive"))["status"] == "ACTIVE"
    assert await system.dispatch.claim("quiet") == []
    moved = await system.dispatch.claim("alive")
    assert sorted(t["taskId"] for t in moved) == sorted(ids)
    assert (await system.gpus.heartbeat("quiet")).status == "ACTIVE"
    assert (await maintenance.tick())["offline"] == 0


async def test_entry_read_but_never_started_is_reclaimed(make_system: SystemFactory) -> None:
    system, maintenance = await make_system(reclaim_idle_ms=0)
    await system.gpus.register(GpuSpec("crashy", [1]))
    await system.gpus.register(GpuSpec("other", [1]))
    task_id = (await system.tasks.create(NewTask(1, "x")))["taskId"]
    # A node's blocking read delivers the entry, then the node dies before claiming it.
    queue = system.store.keys.queue(1, "NORMAL")
    got = await system.store.redis.xreadgroup(GROUP, "crashy", {queue: ">"}, count=1)
    assert got and got[0][1][0][1]["id"] == task_id
    assert await system.dispatch.claim("other") == []
    assert (await maintenance.tick())["reclaimed"] == 1
    (t,) = await system.dispatch.claim("other")
    assert t["taskId"] == task_id


async def test_one_leader_at_a_time_and_takeover(make_system: SystemFactory) -> None:
    system, _ = await make_system(leader_lease_ms=400)
    await system.store.redis.delete(system.store.keys.leader)
    a = Leadership(system.store, "a")
    b = Leadership(system.store, "b")
    assert await a.step() is True
    assert await b.step() is False
    assert a.is_leader and not b.is_leader
    assert await a.step() is True  # renewal
    # a dies without resigning; b takes over within two lease periods.
    t0 = time.monotonic()
    while not await b.step():
        assert time.monotonic() - t0 < 0.8
        await asyncio.sleep(0.05)
    assert await b.current() == "b"
    # a, back from a pause, finds its lease gone and stops acting at once.
    await asyncio.sleep(0.2)
    assert await b.step() is True
    await asyncio.sleep(0.2)
    assert not a.is_leader
    assert await a.step() is False
    assert b.is_leader


async def test_a_process_that_is_not_leader_does_nothing(make_system: SystemFactory) -> None:
    system, maintenance = await make_system(lease_ms=50)
    await system.gpus.register(GpuSpec("g1", [1]))
    await system.tasks.create(NewTask(1, "x"))
    await system.dispatch.claim("g1")
    await asyncio.sleep(0.1)
    await maintenance.leadership.resign()
    assert await maintenance.tick() == {}
    assert (await system.gpus.get("g1"))["currentTasks"] == 1


async def test_cluster_endpoints_show_the_leader(api_server: ApiServer) -> None:
    admin = {"X-API-Key": api_server.admin_key}
    async with httpx.AsyncClient(base_url=api_server.url, headers=admin) as c:
        for _ in range(100):  # the server's first campaign runs at start-up
            data = (await c.get("/api/v2/cluster/status")).json()["data"]
            if data["leader_instance"] and data["instances"]:
                break
            await asyncio.sleep(0.05)
        (me,) = data["instances"]
        assert (me["role"], me["instance_id"]) == ("LEADER", data["leader_instance"])
        assert data["total_instances"] == data["active_instances"] == 1
        listed = (await c.get("/api/v2/cluster/instances")).json()["data"]
        assert [i["instance_id"] for i in listed] == [me["instance_id"]]
