"""Many nodes claiming at once: capacity limits hold and every task runs exactly once."""

from __future__ import annotations

import asyncio
import random

import pytest

from gpuflow.core.errors import Conflict
from gpuflow.core.gpus import GpuSpec
from gpuflow.core.models import TaskStatus, Tier
from gpuflow.core.tasks import NewTask

from .conftest import Services

pytestmark = pytest.mark.redis


async def test_hundreds_of_tasks_over_concurrent_nodes(services: Services) -> None:
    s = services
    nodes = {f"n{i}": (1 + i % 3, Tier.VIP if i == 0 else Tier.NORMAL) for i in range(6)}
    for gpu_id, (cap, tier) in nodes.items():
        await s.gpus.register(
            GpuSpec(gpu_id, [1, 2], supported_task_priority=tier, max_concurrent_tasks=cap)
        )
    ids = set()
    for i in range(300):
        created = await s.tasks.create(NewTask(1 + i % 2, str(i), priority=i % 4))
        ids.add(created["taskId"])
    running: dict[str, set[str]] = {g: set() for g in nodes}
    done: list[tuple[str, str, str]] = []
    peak = dict.fromkeys(nodes, 0)

    async def node_loop(gpu_id: str) -> None:
        cap, tier = nodes[gpu_id]
        for _ in range(2000):
            if len(done) >= len(ids):
                return
            got = await s.dispatch.claim(gpu_id, wait_s=0.2)
            for t in got:
                assert tier is Tier.NORMAL or t["tier"] == "VIP"
                running[gpu_id].add(t["taskId"])
            peak[gpu_id] = max(peak[gpu_id], len(running[gpu_id]))
            assert len(running[gpu_id]) <= cap
            for t in got:
                await asyncio.sleep(random.random() / 500)
                await s.tasks.finish(t["taskId"], TaskStatus.COMPLETED, "ok", attempt=t["attempt"])
                running[gpu_id].discard(t["taskId"])
                done.append((t["taskId"], gpu_id, t["tier"]))

    await asyncio.wait_for(asyncio.gather(*(node_loop(g) for g in nodes)), 60)
    assert sorted(t for t, _, _ in done) == sorted(ids)  # each exactly once
    assert all(peak[g] <= nodes[g][0] for g in nodes)
    assert max(peak.values()) > 1  # the limit was actually reached somewhere
    _, total = await s.tasks.list(status=TaskStatus.COMPLETED)
    assert total == 300
    for g in nodes:
        assert (await s.gpus.get(g))["currentTasks"] == 0


async def test_two_claimers_on_one_node_never_exceed_its_limit(services: Services) -> None:
    s = services
    await s.gpus.register(GpuSpec("solo", [1], max_concurrent_tasks=2))
    for i in range(20):
        await s.tasks.create(NewTask(1, str(i)))
    results = await asyncio.gather(*(s.dispatch.claim("solo", wait_s=0.1) for _ in range(8)))
    assert sum(len(r) for r in results) == 2


async def test_estimated_wait_follows_queue_capacity_and_history(services: Services) -> None:
    s = services
    first = await s.tasks.create(NewTask(3, "a"))
    assert first["estimatedWaitTime"] == -1  # nobody serves type 3 yet
    await s.gpus.register(GpuSpec("e1", [3], max_concurrent_tasks=2))
    # avg = default 60 s; 1 ahead over capacity 2 -> ceil(1/2)*60 + 60
    second = await s.tasks.create(NewTask(3, "b"))
    assert second["estimatedWaitTime"] == 120
    progress = await s.tasks.progress_view(second["taskId"])
    assert progress["queuePosition"] == 2
    # A VIP task jumps ahead of both NORMAL ones.
    vip = await s.tasks.create(NewTask(3, "v", priority=5))
    assert (await s.tasks.progress_view(vip["taskId"]))["queuePosition"] == 1
    assert (await s.tasks.progress_view(second["taskId"]))["queuePosition"] == 3
    # Measured processing times replace the default.
    await s.store.redis.hset(s.store.keys.tstat(3), mapping={"avgMs": 10_000, "n": 5})
    assert (await s.tasks.get(second["taskId"]))["estimatedWaitTime"] == 20


async def test_reports_from_another_gpu_are_refused(services: Services) -> None:
    s = services
    await s.gpus.register(GpuSpec("a", [1]))
    await s.gpus.register(GpuSpec("b", [1]))
    task_id = (await s.tasks.create(NewTask(1, "x")))["taskId"]
    (t,) = await s.dispatch.claim("a")
    with pytest.raises(Conflict, match="runs on GPU a"):
        await s.tasks.report_progress(task_id, 10, gpu_id="b")
    await s.tasks.report_progress(task_id, 10, gpu_id="a", attempt=t["attempt"])
