"""Dispatch rules and fenced transitions, against a real Redis."""

from __future__ import annotations

import asyncio

import pytest

from gpuflow.core.errors import Conflict, NotFound
from gpuflow.core.gpus import GpuSpec
from gpuflow.core.models import GpuStatus, TaskStatus, Tier
from gpuflow.core.tasks import NewTask

from .conftest import Services

pytestmark = pytest.mark.redis


async def test_vip_first_on_normal_node(services: Services) -> None:
    s = services
    await s.gpus.register(GpuSpec("g1", [1], max_concurrent_tasks=1))
    normal = await s.tasks.create(NewTask(1, "n", priority=0))
    vip = await s.tasks.create(NewTask(1, "v", priority=2))
    first = await s.dispatch.claim("g1")
    assert [t["taskId"] for t in first] == [vip["taskId"]]
    assert await s.dispatch.claim("g1") == []  # at capacity
    await s.tasks.finish(vip["taskId"], TaskStatus.COMPLETED, "ok", attempt=1)
    second = await s.dispatch.claim("g1")
    assert [t["taskId"] for t in second] == [normal["taskId"]]


async def test_vip_node_takes_only_vip_and_only_its_types(services: Services) -> None:
    s = services
    await s.gpus.register(GpuSpec("v1", [1], supported_task_priority=Tier.VIP))
    await s.tasks.create(NewTask(1, "n", priority=0))
    await s.tasks.create(NewTask(2, "other type", priority=5))
    assert await s.dispatch.claim("v1") == []
    vip = await s.tasks.create(NewTask(1, "v", priority=3))
    assert [t["taskId"] for t in await s.dispatch.claim("v1")] == [vip["taskId"]]


async def test_faulty_node_takes_nothing_until_recovered(services: Services) -> None:
    s = services
    await s.gpus.register(GpuSpec("g1", [1]))
    await s.tasks.create(NewTask(1, "x"))
    await s.gpus.set_status("g1", GpuStatus.FAULTY, "fan")
    assert await s.dispatch.claim("g1") == []
    assert (await s.gpus.get("g1"))["status"] == "FAULTY"
    await s.gpus.set_status("g1", GpuStatus.ACTIVE)
    assert len(await s.dispatch.claim("g1")) == 1


async def test_stale_attempt_is_refused(services: Services) -> None:
    s = services
    await s.gpus.register(GpuSpec("g1", [1]))
    created = await s.tasks.create(NewTask(1, "x", max_retries=2))
    task_id = created["taskId"]
    (t,) = await s.dispatch.claim("g1")
    assert t["attempt"] == 1
    await s.tasks.requeue(task_id, attempt=1)
    (t2,) = await s.dispatch.claim("g1")
    assert t2["attempt"] == 2
    with pytest.raises(Conflict, match="stale attempt"):
        await s.tasks.finish(task_id, TaskStatus.COMPLETED, "late", attempt=1)
    await s.tasks.finish(task_id, TaskStatus.COMPLETED, "right", attempt=2)
    with pytest.raises(Conflict):
        await s.tasks.finish(task_id, TaskStatus.COMPLETED, "dup", attempt=2)
    assert (await s.tasks.get(task_id))["result"] == "right"


async def test_blocked_claim_wakes_on_new_task(services: Services) -> None:
    s = services
    await s.gpus.register(GpuSpec("g1", [7]))
    waiter = asyncio.create_task(s.dispatch.claim("g1", wait_s=10))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    created = await s.tasks.create(NewTask(7, "wake"))
    got = await asyncio.wait_for(waiter, 5)
    assert [t["taskId"] for t in got] == [created["taskId"]]


async def test_one_new_task_wakes_one_of_many_idle_nodes(services: Services) -> None:
    s = services
    for i in range(4):
        await s.gpus.register(GpuSpec(f"g{i}", [8]))
    waiters = [asyncio.create_task(s.dispatch.claim(f"g{i}", wait_s=1.5)) for i in range(4)]
    await asyncio.sleep(0.2)
    await s.tasks.create(NewTask(8, "one"))
    results = await asyncio.gather(*waiters)
    assert sorted(len(r) for r in results) == [0, 0, 0, 1]


async def test_failure_retries_then_fails(services: Services) -> None:
    s = services
    await s.gpus.register(GpuSpec("g1", [1]))
    task_id = (await s.tasks.create(NewTask(1, "x", max_retries=1)))["taskId"]
    assert len(await s.dispatch.claim("g1")) == 1
    assert await s.tasks.finish(task_id, TaskStatus.FAILED, "e1", attempt=1) == TaskStatus.QUEUED
    assert len(await s.dispatch.claim("g1")) == 1
    assert await s.tasks.finish(task_id, TaskStatus.FAILED, "e2", attempt=2) == TaskStatus.FAILED
    view = await s.tasks.get(task_id)
    assert (view["status"], view["retryCount"], view["errorMessage"]) == ("FAILED", 1, "e2")


async def test_unknown_ids(services: Services) -> None:
    with pytest.raises(NotFound):
        await services.tasks.get("task_nope")
    with pytest.raises(NotFound):
        await services.gpus.heartbeat("nope")
    with pytest.raises(NotFound):
        await services.dispatch.claim("nope")


async def test_a_resent_create_script_answers_the_same_task(services: Services) -> None:
    """redis-py resends a command after a dropped connection; the task id makes it safe."""
    s = services
    fields = ["taskType", 1, "tier", "NORMAL", "payload", "x", "maxRetries", 0, "timeout", 1000]
    first = await s.store.scripts.call("create_task", "", "", 60, 1, 1000, "task_same", *fields)
    again = await s.store.scripts.call("create_task", "", "", 60, 1, 1000, "task_same", *fields)
    assert first == again and first[0] == "OK"
    _, total = await s.tasks.list()
    assert total == 1
    assert await s.store.redis.xlen(s.store.keys.queue(1, "NORMAL")) == 1


async def test_capacity_is_summed_per_type_and_tier(services: Services) -> None:
    s = services
    await s.gpus.register(GpuSpec("n1", [1], max_concurrent_tasks=2))
    await s.gpus.register(
        GpuSpec("v1", [2], supported_task_priority=Tier.VIP, max_concurrent_tasks=3)
    )
    assert await s.gpus.capacity(1, Tier.NORMAL) == 2
    assert await s.gpus.capacity(1, Tier.VIP) == 2  # a NORMAL node takes VIP tasks too
    assert await s.gpus.capacity(2, Tier.VIP) == 3
    assert await s.gpus.capacity(2, Tier.NORMAL) == 0  # a VIP node takes only VIP
    await s.gpus.set_status("n1", GpuStatus.FAULTY, "hot")
    assert await s.gpus.capacity(1, Tier.NORMAL) == 0  # a status change is seen at once


async def test_a_claim_after_one_that_emptied_the_streams_reads_first(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Right after a claim that left free capacity, the next claim goes straight to the
    blocking read: one claim script per idle cycle; a task queued in between is still taken."""
    s = services
    await s.gpus.register(GpuSpec("g1", [1], max_concurrent_tasks=4))
    first = await s.tasks.create(NewTask(1, "a"))
    assert [t["taskId"] for t in await s.dispatch.claim("g1", wait_s=5)] == [first["taskId"]]

    calls: list[str] = []
    call = s.store.scripts.call

    async def counting(name: str, *args: object) -> object:
        calls.append(name)
        return await call(name, *args)

    monkeypatch.setattr(s.store.scripts, "call", counting)
    queued = await s.tasks.create(NewTask(1, "queued between claims"))
    calls.clear()
    assert [t["taskId"] for t in await s.dispatch.claim("g1", wait_s=5)] == [queued["taskId"]]
    assert calls == ["claim"]

    calls.clear()
    waiter = asyncio.create_task(s.dispatch.claim("g1", wait_s=10))
    await asyncio.sleep(0.2)
    woke = await s.tasks.create(NewTask(1, "wakes the blocked read"))
    assert [t["taskId"] for t in await asyncio.wait_for(waiter, 5)] == [woke["taskId"]]
    assert calls == ["create_task", "claim"]


async def test_a_full_node_claims_through_the_script_again(services: Services) -> None:
    """A claim that filled the node drops the shortcut: the next one sees the node busy
    through the script and takes no entry it could not run."""
    s = services
    await s.gpus.register(GpuSpec("g1", [1], max_concurrent_tasks=1))
    a = await s.tasks.create(NewTask(1, "a"))
    b = await s.tasks.create(NewTask(1, "b"))
    key = s.store.keys.task(b["taskId"])
    entry = await s.store.redis.hget(key, "streamId")
    assert [t["taskId"] for t in await s.dispatch.claim("g1", wait_s=1)] == [a["taskId"]]
    assert await s.dispatch.claim("g1", wait_s=0.3) == []
    assert (await s.tasks.get(b["taskId"]))["status"] == "QUEUED"
    assert await s.store.redis.hget(key, "streamId") == entry  # never read and put back


async def test_the_reclaim_loop_trims_acknowledged_entries_and_keeps_pending_ones(
    services: Services,
) -> None:
    """Claims acknowledge their entries and leave them; the reclaim script trims the stream
    below the oldest entry still pending, so an entry delivered to a reader that died
    before its claim survives until it is reclaimed."""
    s = services
    q = s.store.keys.queue(1, "NORMAL")
    await s.gpus.register(GpuSpec("g1", [1], max_concurrent_tasks=10))
    done = [(await s.tasks.create(NewTask(1, f"t{i}")))["taskId"] for i in range(3)]
    assert len(await s.dispatch.claim("g1")) == 3
    # A reader that took the next entry and died before its claim script.
    orphan = (await s.tasks.create(NewTask(1, "orphan")))["taskId"]
    ((_, entries),) = await s.store.redis.xreadgroup("workers", "dead", {q: ">"}, count=1)
    later = (await s.tasks.create(NewTask(1, "later")))["taskId"]
    assert await s.store.redis.xlen(q) == 5  # acknowledged, not deleted
    assert await s.store.scripts.call("reclaim_pending", q, 60_000, 500) == 0
    left = [fields["id"] for _, fields in await s.store.redis.xrange(q)]
    assert left == [orphan, later]  # trimmed below the pending entry
    assert entries[0][1]["id"] == orphan
    assert await s.store.scripts.call("reclaim_pending", q, 0, 500) == 1  # now reclaimed
    await s.store.scripts.call("reclaim_pending", q, 0, 500)  # and trimmed behind it
    left = [fields["id"] for _, fields in await s.store.redis.xrange(q)]
    assert left == [later, orphan]  # the orphan's fresh entry at the tail
    assert sorted(t["taskId"] for t in await s.dispatch.claim("g1")) == sorted([later, orphan])
    for task_id in done:
        assert (await s.tasks.get(task_id))["status"] == "PROCESSING"


async def test_a_started_attempt_shows_no_progress_of_the_one_before(
    services: Services,
) -> None:
    """The claim does not reset progress itself: every way back to QUEUED does."""
    s = services
    await s.gpus.register(GpuSpec("g1", [1]))
    task_id = (await s.tasks.create(NewTask(1, "x", max_retries=2)))["taskId"]
    for back_to_queue in ("release", "retry"):
        (t,) = await s.dispatch.claim("g1")
        assert (t["progress"], t["progressMessage"]) == (0, None)
        await s.tasks.report_progress(task_id, 60, "half", gpu_id="g1", attempt=t["attempt"])
        assert (await s.tasks.get(task_id))["progress"] == 60
        if back_to_queue == "release":
            await s.tasks.requeue(task_id, attempt=t["attempt"])
        else:
            await s.tasks.finish(task_id, TaskStatus.FAILED, "e", attempt=t["attempt"])
    (t,) = await s.dispatch.claim("g1")
    assert (t["attempt"], t["progress"], t["progressMessage"]) == (3, 0, None)


async def test_entries_of_a_blocking_read_start_in_priority_order(services: Services) -> None:
    """A blocking read answers with the next entry of every non-empty stream; the claim
    script takes each in its stream's turn, so VIP work queued later still goes first."""
    s = services
    await s.gpus.register(GpuSpec("g1", [1], max_concurrent_tasks=4))
    await s.tasks.create(NewTask(1, "warm-up"))
    assert len(await s.dispatch.claim("g1", wait_s=5)) == 1  # room 3: the shortcut is on
    normal = (await s.tasks.create(NewTask(1, "n", priority=0)))["taskId"]
    vips = [(await s.tasks.create(NewTask(1, f"v{i}", priority=5)))["taskId"] for i in range(2)]
    got = await s.dispatch.claim("g1", wait_s=5)
    assert [t["taskId"] for t in got] == [*vips, normal]
