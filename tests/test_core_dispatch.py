"""Dispatch rules and fenced transitions, against a real Redis."""

from __future__ import annotations

import asyncio

import pytest

from gpuflow.core.errors import Conflict, NotFound
from gpuflow.core.gpus import GpuSpec
from gpuflow.core.models import GpuStatus, TaskStatus, Tier
from gpuflow.core.tasks import NewTask
from gpuflow.store import Store

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
    head = ("", "", 60, 1, 1000, 30_000, 5_000, 0.8, "task_same")  # ..., lease, grace, fraction
    first = await s.store.scripts.call("create_task", *head, *fields)
    again = await s.store.scripts.call("create_task", *head, *fields)
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


# --- push dispatch: a waiting GPU gets new tasks started and pushed to its inbox ----------


async def _waiting(s: Services, gpu_id: str) -> asyncio.Task[list[list[object]]]:
    """An agent's claim blocked on its inbox (its first call registers it as waiting)."""
    claim = asyncio.create_task(s.dispatch.claim_rows(gpu_id, 5.0, push=True))
    flag = s.store.keys.gpu_waiting(gpu_id)
    for _ in range(400):
        if await s.store.redis.exists(flag):
            return claim
        await asyncio.sleep(0.005)
    raise AssertionError(f"{gpu_id} never waited")


async def test_a_new_task_is_started_for_a_waiting_gpu_and_pushed(services: Services) -> None:
    s = services
    await s.gpus.register(GpuSpec("p1", [1], max_concurrent_tasks=2))
    claim = await _waiting(s, "p1")
    created = await s.tasks.create(NewTask(1, '{"in": 1}', priority=0, user_id="u1"))
    assert created["status"] == "PROCESSING"  # started before create answered
    (row,) = await asyncio.wait_for(claim, 5)
    assert row[0] == created["taskId"] and int(row[2]) == 1 and row[3] == "p1"
    assert row[4] == '{"in": 1}'
    task = await s.tasks.get(created["taskId"])
    assert task["status"] == "PROCESSING" and task["gpuId"] == "p1" and task["attempt"] == 1
    assert await s.store.redis.xlen(s.store.keys.queue(1, "NORMAL")) == 0  # never queued
    assert await s.store.redis.scard(s.store.keys.gpu_running("p1")) == 1
    listed, total = await s.tasks.list(status=TaskStatus.PROCESSING, task_type=1)
    assert total == 1 and listed[0]["taskId"] == created["taskId"]
    assert (await s.tasks.list(status=TaskStatus.QUEUED))[1] == 0
    k = s.store.keys
    assert not await s.store.redis.zscore(k.idx_status_type("QUEUED", 1), created["taskId"])
    assert await s.store.redis.zscore(k.idx_gpu("p1"), created["taskId"])
    assert await s.store.redis.zscore(k.idx_user("u1"), created["taskId"])
    assert task["userId"] == "u1" and task["payload"] == '{"in": 1}'
    # Room for one more: it is still waiting, so the next task is pushed without a claim call.
    assert await s.store.redis.exists(s.store.keys.gpu_waiting("p1"))
    second = asyncio.create_task(s.dispatch.claim_rows("p1", 5.0, push=True))
    other = await s.tasks.create(NewTask(1, "b"))
    assert [r[0] for r in await asyncio.wait_for(second, 5)] == [other["taskId"]]
    # Full now: no longer waiting; the next task is queued in the stream.
    assert not await s.store.redis.exists(s.store.keys.gpu_waiting("p1"))
    third = await s.tasks.create(NewTask(1, "c"))
    assert third["status"] == "QUEUED"
    await s.tasks.finish(created["taskId"], TaskStatus.COMPLETED, "ok", attempt=1, gpu_id="p1")
    assert [r[0] for r in await s.dispatch.claim_rows("p1", 5.0, push=True)] == [third["taskId"]]


async def test_inbox_reads_keep_their_connection_and_a_cancelled_one_takes_nothing(
    services: Services,
) -> None:
    """An agent's inbox reads run on connections the dispatcher keeps between them; a read
    cancelled while it blocks closes its connection, so a task pushed afterwards waits in the
    inbox for the next read instead of going to the dead one."""
    s = services
    await s.gpus.register(GpuSpec("k1", [1], max_concurrent_tasks=4))
    claim = await _waiting(s, "k1")
    first = await s.tasks.create(NewTask(1, "a"))
    assert [r[0] for r in await asyncio.wait_for(claim, 5)] == [first["taskId"]]
    assert s.dispatch._inboxes.kept == 1  # the read's connection, clean, kept for the next
    blocked = asyncio.create_task(s.dispatch.claim_rows("k1", 5.0, push=True))
    await asyncio.sleep(0.2)  # blocked in its BLPOP on the kept connection
    assert s.dispatch._inboxes.kept == 0
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    await asyncio.sleep(0.05)
    second = await s.tasks.create(NewTask(1, "b"))
    assert second["status"] == "PROCESSING"  # still registered as waiting: pushed
    rows = await asyncio.wait_for(s.dispatch.claim_rows("k1", 5.0, push=True), 5)
    assert [r[0] for r in rows] == [second["taskId"]]
    assert s.dispatch._inboxes.kept == 1


async def test_a_task_queued_another_way_wakes_a_waiting_gpu(services: Services) -> None:
    """Retries, requeues and exclusive types go through the stream: the waiting GPU is woken
    with an empty row and takes the task with its next claim."""
    s = services
    await s.gpus.register(GpuSpec("p2", [1]))
    await s.gpus.register(GpuSpec("busy", [1], max_concurrent_tasks=1))
    task = await s.tasks.create(NewTask(1, "x", max_retries=3))
    (started,) = await s.dispatch.claim("busy")
    assert started["taskId"] == task["taskId"]
    claim = await _waiting(s, "p2")
    await s.tasks.requeue(task["taskId"], attempt=1)  # e.g. its worker shut down
    assert await asyncio.wait_for(claim, 5) == []  # woken at once, not after its 5 s
    (row,) = await s.dispatch.claim_rows("p2", 5.0, push=True)
    assert row[0] == task["taskId"] and row[3] == "p2"


async def test_an_exclusive_task_is_not_pushed_but_wakes_the_gpu(
    services: Services, store: Store
) -> None:
    s = services
    await store.redis.hset(store.keys.tasktype(9), mapping={"exclusive": "1"})
    await s.gpus.register(GpuSpec("p3", [9], max_concurrent_tasks=4))
    claim = await _waiting(s, "p3")
    created = await s.tasks.create(NewTask(9, "alone"))
    assert created["status"] == "QUEUED"
    assert await asyncio.wait_for(claim, 5) == []
    (row,) = await s.dispatch.claim_rows("p3", 5.0, push=True)
    assert row[0] == created["taskId"]
    assert await store.redis.get(store.keys.gpulock("p3")) == created["taskId"]


async def test_a_gpu_that_cannot_take_more_is_passed_over(services: Services) -> None:
    """A waiter that went FAULTY (or is full, or locked) gets nothing; the next one does."""
    s = services
    await s.gpus.register(GpuSpec("w1", [1]))
    await s.gpus.register(GpuSpec("w2", [1]))
    first = await _waiting(s, "w1")
    second = await _waiting(s, "w2")
    await s.gpus.set_status("w1", GpuStatus.FAULTY, "fan")
    created = await s.tasks.create(NewTask(1, "x"))
    assert [r[0] for r in await asyncio.wait_for(second, 5)] == [created["taskId"]]
    assert not first.done()
    assert await s.dispatch.unwait("w1") == 0
    assert await asyncio.wait_for(first, 5) == []  # the empty row ended its read


async def test_stopping_puts_back_what_was_pushed_and_not_taken(services: Services) -> None:
    s = services
    await s.gpus.register(GpuSpec("p4", [1], max_concurrent_tasks=2))
    claim = await _waiting(s, "p4")
    first = await s.tasks.create(NewTask(1, "a"))
    await asyncio.wait_for(claim, 5)  # the agent took the first; it stays waiting
    second = await s.tasks.create(NewTask(1, "b"))  # pushed while no read is in progress
    assert second["status"] == "PROCESSING"
    assert await s.dispatch.unwait("p4") == 1
    back = await s.tasks.get(second["taskId"])
    assert back["status"] == "QUEUED" and back["gpuId"] in (None, "", "p4")
    assert (await s.tasks.get(first["taskId"]))["status"] == "PROCESSING"
    assert await s.store.redis.scard(s.store.keys.gpu_running("p4")) == 1
    # Nothing is pushed to a stopped agent: a new task is queued.
    assert (await s.tasks.create(NewTask(1, "c")))["status"] == "QUEUED"


async def test_a_pushed_task_the_agent_missed_comes_with_its_next_claim(
    services: Services,
) -> None:
    """Pushed after its read ended (the flag outlives the read a little), or before a
    restart: the next claim returns it, once, if it still runs there."""
    s = services
    await s.gpus.register(GpuSpec("p5", [1], max_concurrent_tasks=3))
    claim = await _waiting(s, "p5")
    claim.cancel()  # the read is gone; the GPU still counts as waiting
    with pytest.raises(asyncio.CancelledError):
        await claim
    kept = await s.tasks.create(NewTask(1, "kept"))
    gone = await s.tasks.create(NewTask(1, "canceled meanwhile"))
    assert kept["status"] == gone["status"] == "PROCESSING"
    await s.tasks.cancel(gone["taskId"])
    rows = await s.dispatch.claim_rows("p5", 0.0, push=True, recover=True)
    assert [r[0] for r in rows] == [kept["taskId"]]
    assert await s.store.redis.llen(s.store.keys.gpu_inbox("p5")) == 0


async def test_a_pushed_task_waiting_in_the_inbox_is_not_lost(services: Services) -> None:
    """The agent lists only what it runs; a task pushed while its slots were full (by its
    own count) waits in the inbox and is not taken for lost, however long it waits there."""
    s = services
    await s.gpus.register(GpuSpec("p6", [1], max_concurrent_tasks=2))
    claim = await _waiting(s, "p6")
    claim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await claim
    created = await s.tasks.create(NewTask(1, "x", max_retries=3))
    key = s.store.keys.task(created["taskId"])
    await s.store.redis.hset(key, "startedAt", 1)  # started long before the orphan grace
    await s.gpus.heartbeat("p6", {})
    assert (await s.tasks.get(created["taskId"]))["status"] == "PROCESSING"
    (row,) = await s.dispatch.claim_rows("p6", 0.0, push=True)  # taken: now it must be listed
    assert row[0] == created["taskId"]
    await s.gpus.heartbeat("p6", {})
    task = await s.tasks.get(created["taskId"])
    assert task["status"] == "QUEUED" and task["retryCount"] == 1
