"""Batched reports and heartbeats: several in one script call, each applied as if alone."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ResponseError

from gpuflow.core.coalesce import Coalescer
from gpuflow.core.errors import (
    Conflict,
    Damaged,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
)
from gpuflow.core.gpus import Beat, GpuSpec, HeartbeatReply, _chunks
from gpuflow.core.models import TaskStatus
from gpuflow.core.tasks import NewTask, Report

from .conftest import Services


async def _running(s: Services, n: int, **kw: object) -> list[dict[str, object]]:
    await s.gpus.register(GpuSpec("g1", [1], max_concurrent_tasks=n))
    for i in range(n):
        await s.tasks.create(NewTask(1, f"p{i}", **kw))  # type: ignore[arg-type]
    started = await s.dispatch.claim("g1")
    assert len(started) == n
    return started


def _counting(batch_call, sizes):  # type: ignore[no-untyped-def]
    """``batch_call``, recording each batch's size in ``sizes``."""

    async def counting(items):  # type: ignore[no-untyped-def]
        sizes.append(len(items))
        return await batch_call(items)

    return counting


@pytest.mark.redis
async def test_finish_many_applies_each_report_alone(services: Services) -> None:
    s = services
    a, b, c, d = await _running(s, 4, max_retries=1)
    results = await s.tasks.finish_many(
        [
            Report(str(a["taskId"]), TaskStatus.COMPLETED, "ra", "g1", 1),
            Report(str(b["taskId"]), TaskStatus.COMPLETED, "stale", "g1", 7),
            Report(str(c["taskId"]), TaskStatus.FAILED, "boom", "g1", 1),
            Report("task_missing", TaskStatus.COMPLETED, "x"),
            Report(str(d["taskId"]), TaskStatus.QUEUED, "not an end"),
            Report(str(d["taskId"]), TaskStatus.COMPLETED, "x" * 2_000_000),
            Report(str(a["taskId"]), TaskStatus.COMPLETED, "again", "g1", 1),
        ]
    )
    assert results[0] == TaskStatus.COMPLETED
    assert isinstance(results[1], Conflict) and "stale attempt 7" in str(results[1])
    assert results[2] == TaskStatus.QUEUED  # a retry was left
    assert isinstance(results[3], NotFound)
    assert isinstance(results[4], InvalidInput)
    assert isinstance(results[5], PayloadTooLarge)
    assert isinstance(results[6], Conflict)  # the first report of `a` landed before it
    assert (await s.tasks.get(str(a["taskId"])))["result"] == "ra"
    assert (await s.tasks.get(str(b["taskId"])))["status"] == "PROCESSING"
    assert (await s.tasks.get(str(c["taskId"])))["retryCount"] == 1
    d_now = await s.tasks.get(str(d["taskId"]))
    assert d_now["status"] == "PROCESSING" and d_now["result"] is None
    gpu = await s.gpus.get("g1")
    assert gpu["taskFailureCount"] == 1  # the failure came after the completion


@pytest.mark.redis
async def test_concurrent_finishes_share_calls_and_all_land(services: Services) -> None:
    s = services
    started = await _running(s, 40)
    calls: list[int] = []
    s.tasks._finisher = Coalescer(_counting(s.tasks.finish_many, calls))
    ends = await asyncio.gather(
        *(
            s.tasks.finish(str(t["taskId"]), TaskStatus.COMPLETED, f"r{i}", attempt=1)
            for i, t in enumerate(started)
        )
    )
    assert ends == [TaskStatus.COMPLETED] * 40
    assert sum(calls) == 40 and len(calls) < 40
    for i, t in enumerate(started):
        assert (await s.tasks.get(str(t["taskId"])))["result"] == f"r{i}"
    assert await s.dispatch.claim("g1") == []  # every slot is free again, nothing queued


async def test_coalescer_fails_only_the_refused_item_and_every_item_on_a_lost_call() -> None:
    batches: list[list[int]] = []
    broken = False

    async def call(items: list[int]) -> list[int | Exception]:
        batches.append(items)
        await asyncio.sleep(0.01)
        if broken:
            raise ConnectionError("lost")
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]

    co: Coalescer[int, int] = Coalescer(call, max_batch=3)
    out = await asyncio.gather(*(co.submit(i) for i in (1, -2, 3, 4)), return_exceptions=True)
    assert out[0] == 10 and out[2] == 30 and out[3] == 40
    assert isinstance(out[1], ValueError)
    assert batches == [[1, -2, 3], [4]]  # at most max_batch per call, in order
    broken = True
    lost = await asyncio.gather(co.submit(5), co.submit(6), return_exceptions=True)
    assert all(isinstance(x, ConnectionError) for x in lost)
    broken = False
    assert await co.submit(7) == 70  # a lone call is not held back


async def test_coalescer_deadline_fails_a_stuck_batch_and_the_next_one_goes_out() -> None:
    """One timer per batch: a call that never answers fails its items with TimeoutError
    after ``timeout_s``; the items queued behind it go out in the next batch."""
    stuck, out = asyncio.Event(), asyncio.Event()

    async def call(items: list[int]) -> list[int | Exception]:
        if 0 in items:
            out.set()
            await stuck.wait()  # a connection that never answers
        return [i * 10 for i in items]

    co: Coalescer[int, int] = Coalescer(call, timeout_s=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    first = asyncio.ensure_future(co.submit(0))
    await asyncio.wait_for(out.wait(), 2)  # its batch is out: the next waits for the next
    second = asyncio.ensure_future(co.submit(2))
    with pytest.raises(TimeoutError):
        await first
    assert 0.2 <= loop.time() - started < 2
    assert await asyncio.wait_for(second, 2) == 20


@pytest.mark.redis
async def test_compact_claim_gives_the_agent_what_the_full_view_gives(services: Services) -> None:
    from gpuflow.worker.transport import ClaimedTask

    s = services
    await s.gpus.register(GpuSpec("g1", [1], max_concurrent_tasks=1))
    await s.gpus.register(GpuSpec("g2", [1], max_concurrent_tasks=1))
    for _ in range(2):
        await s.tasks.create(
            NewTask(1, '{"in": "a.jpg"}', "u1", "app1", 3, max_retries=2, timeout=0)
        )
    (full,) = await s.dispatch.claim("g1")
    (compact,) = await s.dispatch.claim("g2", compact=True)
    a, b = ClaimedTask.from_view(full), ClaimedTask.from_view(compact)
    await s.tasks.requeue(b.task_id, attempt=1)
    (row,) = await s.dispatch.claim_rows("g2")  # the agent's path: the same task, attempt 2
    c = ClaimedTask.from_row(row)
    assert (c.task_id, c.attempt, c.retry_count) == (b.task_id, 2, b.retry_count)
    kept = ("task_type", "gpu_id", "payload", "priority", "display_id", "user_id", "app")
    kept += ("timeout_ms", "max_retries")
    assert [getattr(c, f) for f in kept] == [getattr(b, f) for f in kept]
    assert (b.gpu_id, b.attempt, b.payload, b.user_id, b.app) == (
        "g2",
        1,
        '{"in": "a.jpg"}',
        "u1",
        "app1",
    )
    same = ("task_type", "priority", "timeout_ms", "retry_count", "max_retries")
    assert [getattr(a, f) for f in same] == [getattr(b, f) for f in same]
    assert b.display_id == a.display_id + 1
    assert (await s.tasks.get(b.task_id))["status"] == "PROCESSING"


@pytest.mark.redis
async def test_a_damaged_record_fails_its_own_report_only(services: Services) -> None:
    s = services
    a, b, c = await _running(s, 3)
    await s.store.redis.hdel(s.store.keys.task(str(b["taskId"])), "startedAt")
    ends = await asyncio.gather(
        *(
            s.tasks.finish(str(t["taskId"]), TaskStatus.COMPLETED, "r", attempt=1)
            for t in (a, b, c)
        ),
        return_exceptions=True,
    )
    assert ends[0] == ends[2] == TaskStatus.COMPLETED
    assert isinstance(ends[1], Damaged) and "damaged" in str(ends[1])
    assert (await s.tasks.get(str(c["taskId"])))["status"] == "COMPLETED"


@pytest.mark.redis
async def test_a_new_registration_is_seen_by_the_next_claim(services: Services) -> None:
    s = services
    await s.gpus.register(GpuSpec("g1", [1, 2], max_concurrent_tasks=4))
    assert await s.dispatch.claim("g1") == []  # caches g1's streams (types 1 and 2)
    await s.gpus.register(GpuSpec("g1", [1], max_concurrent_tasks=4))  # type 2 dropped
    await s.tasks.create(NewTask(2, "not for g1 any more"))
    assert await s.dispatch.claim("g1") == []


async def test_coalescer_cancels_what_a_dying_flusher_leaves() -> None:
    started = asyncio.Event()

    async def hang(items: list[int]) -> list[int | Exception]:
        started.set()
        await asyncio.sleep(3600)
        return items

    co: Coalescer[int, int] = Coalescer(hang, max_batch=1)
    calls = [asyncio.ensure_future(co.submit(i)) for i in range(3)]
    await asyncio.wait_for(started.wait(), 5)
    (flusher,) = co._flushers.values()
    flusher.cancel()
    done, _ = await asyncio.wait(calls, timeout=5)
    assert len(done) == 3 and all(c.cancelled() for c in calls)


@pytest.mark.redis
async def test_heartbeat_many_applies_each_beat_alone(services: Services) -> None:
    s = services
    a, _b = await _running(s, 2)
    await s.gpus.register(GpuSpec("g2", [2]))
    await s.gpus.register(GpuSpec("g3", [3]))
    await s.tasks.create(NewTask(3, "p"))
    (lost,) = await s.dispatch.claim("g3")
    lost_key = s.store.keys.task(str(lost["taskId"]))
    await s.store.redis.hset(lost_key, "startedAt", 0)  # long gone from the agent's list
    await s.store.redis.hdel(lost_key, "maxRetries")  # ... and its record damaged
    a_id = str(a["taskId"])
    replies = await s.gpus.heartbeat_many(
        [
            ("g1", {a_id: 1}),
            ("nope", None),
            ("g3", {}),
            ("g2", None),
            ("g1", {a_id: 1, "task_x": 2}),
        ]
    )
    assert replies[0] == HeartbeatReply("ACTIVE", [])
    assert isinstance(replies[1], NotFound)
    assert isinstance(replies[2], Damaged) and "g3" in str(replies[2])
    assert replies[3] == HeartbeatReply("ACTIVE", [])
    assert replies[4] == HeartbeatReply("ACTIVE", ["task_x"])
    # The unlisted task of g1 started just now: within the grace, it keeps running.
    assert await s.store.redis.scard(s.store.keys.gpu_running("g1")) == 2


@pytest.mark.redis
async def test_concurrent_heartbeats_share_calls(services: Services) -> None:
    s = services
    for i in range(30):
        await s.gpus.register(GpuSpec(f"hb{i}", [1]))
    calls: list[int] = []
    s.gpus.heartbeat_many = _counting(s.gpus.heartbeat_many, calls)  # type: ignore[method-assign]
    replies = await asyncio.gather(*(s.gpus.heartbeat(f"hb{i}", {}) for i in range(30)))
    assert replies == [HeartbeatReply("ACTIVE", [])] * 30
    assert calls == [30]
    with pytest.raises(NotFound, match="GPU ghost not registered"):
        await s.gpus.heartbeat("ghost")


@pytest.mark.redis
async def test_heartbeat_groups_share_a_call_and_answer_as_groups(services: Services) -> None:
    """Groups made together (several agents' batch requests) share one script call; each
    is answered as a group, in order, errors in place."""
    s = services
    for i in range(6):
        await s.gpus.register(GpuSpec(f"lg{i}", [1]))
    calls: list[int] = []
    s.gpus.heartbeat_many = _counting(s.gpus.heartbeat_many, calls)  # type: ignore[method-assign]
    groups = await asyncio.gather(
        *(s.gpus.heartbeats([(f"lg{2 * i}", {}), (f"lg{2 * i + 1}", None)]) for i in range(3))
    )
    assert groups == [[HeartbeatReply("ACTIVE", [])] * 2] * 3
    assert calls == [6]
    mixed = await s.gpus.heartbeats([("lg0", {}), ("ghost", None), ("lg1", None)])
    assert mixed[0] == mixed[2] == HeartbeatReply("ACTIVE", [])
    assert isinstance(mixed[1], NotFound)


def test_beat_chunks_bound_each_calls_arguments() -> None:
    big = {f"t{i}": 1 for i in range(4096)}  # 8,195 arguments
    beats: list[Beat] = [("a", big), ("b", None), ("c", big), ("d", {}), ("e", big)]
    chunks = _chunks(beats)
    assert [b for chunk in chunks for b in chunk] == beats  # all, in order
    assert [[g for g, _ in chunk] for chunk in chunks] == [["a", "b"], ["c", "d"], ["e"]]
    assert _chunks([]) == []
    assert [len(c) for c in _chunks([("g", None)] * 600)] == [256, 256, 88]


@pytest.mark.redis
async def test_scripts_are_loaded_again_after_a_script_flush(services: Services) -> None:
    """A Redis that lost its script cache (restart, failover, SCRIPT FLUSH) gets each
    script again on its next call: NOSCRIPT never reaches the caller."""
    s = services
    await s.gpus.register(GpuSpec("g1", [1]))
    await s.store.redis.script_flush()
    created = await s.tasks.create(NewTask(1, "after flush"))
    assert created["status"] == "QUEUED"
    (started,) = await s.dispatch.claim("g1")
    assert started["taskId"] == created["taskId"]


@pytest.mark.redis
async def test_a_claim_stopped_by_a_damaged_record_keeps_what_it_started_reapable(
    services: Services,
) -> None:
    """The claim's index and timer writes go out at the end of the script; a damaged record
    that stops it midway must not leave an earlier started task without its lease entry."""
    s = services
    await s.gpus.register(GpuSpec("g1", [1], max_concurrent_tasks=2))
    a = await s.tasks.create(NewTask(1, "a"))
    b = await s.tasks.create(NewTask(1, "b"))
    await s.store.redis.hset(s.store.keys.task(b["taskId"]), "attempt", "not a number")
    with pytest.raises(ResponseError):
        await s.dispatch.claim("g1")
    k = s.store.keys
    assert await s.store.redis.hget(k.task(a["taskId"]), "status") == "PROCESSING"
    assert await s.store.redis.zscore(k.leases, a["taskId"]) is not None
    assert await s.store.redis.zscore(k.idx_status("PROCESSING"), a["taskId"]) is not None
    assert await s.store.redis.zscore(k.idx_status("QUEUED"), a["taskId"]) is None


@pytest.mark.redis
async def test_a_missing_sort_key_fails_its_own_task_not_the_whole_batch(
    services: Services,
) -> None:
    """A record without displayId (an index score) fails where its ZADD would have failed
    alone, not at the end of the batch for every task in it."""
    s = services
    k = s.store.keys
    await s.gpus.register(GpuSpec("g1", [1], max_concurrent_tasks=2))
    a = await s.tasks.create(NewTask(1, "a"))
    b = await s.tasks.create(NewTask(1, "b"))
    await s.store.redis.hdel(k.task(b["taskId"]), "displayId")
    with pytest.raises(ResponseError, match="bad score"):
        await s.dispatch.claim("g1")
    assert await s.store.redis.zscore(k.leases, a["taskId"]) is not None
    assert await s.store.redis.hget(k.task(b["taskId"]), "status") == "QUEUED"


@pytest.mark.redis
async def test_a_finish_without_sort_key_is_damaged_alone(services: Services) -> None:
    s = services
    k = s.store.keys
    a, b, c = await _running(s, 3)
    await s.store.redis.hdel(k.task(str(b["taskId"])), "displayId")
    ends = await s.tasks.finish_many(
        [Report(str(t["taskId"]), TaskStatus.COMPLETED, "r", "g1", 1) for t in (a, b, c)]
    )
    assert ends[0] == ends[2] == TaskStatus.COMPLETED
    assert isinstance(ends[1], Damaged)
    for t in (a, c):
        assert await s.store.redis.zscore(k.idx_status("COMPLETED"), str(t["taskId"])) is not None
        assert await s.store.redis.zscore(k.leases, str(t["taskId"])) is None


async def test_alone_first_sends_a_lone_call_at_once_and_batches_what_piles_up() -> None:
    """With ``alone_first`` a call made while nothing is in flight goes out in its caller's
    task, before the loop turns; the calls made meanwhile share one batch, which does not wait
    for the lone call; a lone call's refusal and deadline are its own."""
    batches: list[list[int]] = []
    release = asyncio.Event()

    async def call(items: list[int]) -> list[int | Exception]:
        batches.append(items)
        await asyncio.sleep(0)  # a round trip
        if 0 in items:
            await release.wait()
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]

    co: Coalescer[int, int] = Coalescer(call, timeout_s=0.5, alone_first=True)
    first = asyncio.ensure_future(co.submit(0))
    await asyncio.sleep(0)  # the lone call is out, in first's own task
    assert batches == [[0]] and not co._flushers
    rest = asyncio.gather(*(co.submit(i) for i in (1, 2, 3)))
    assert await asyncio.wait_for(rest, 2) == [10, 20, 30]  # not held behind the lone call
    assert batches == [[0], [1, 2, 3]] and not first.done()
    release.set()
    assert await first == 0
    with pytest.raises(ValueError, match="bad -1"):
        await co.submit(-1)
    assert batches[-1] == [-1]
    release.clear()
    with pytest.raises(TimeoutError):
        await co.submit(0)  # a lone call that never answers fails after timeout_s
    release.set()
    assert await co.submit(5) == 50  # and the next one goes out alone again
    assert batches[-1] == [5]
    # Calls that pile up: the last call carried several, so a burst is batched whole, as
    # without alone_first, until calls come one at a time again.
    assert await asyncio.gather(*(co.submit(i) for i in (5, 6, 7))) == [50, 60, 70]
    assert batches[-2:] == [[5], [6, 7]]
    assert await asyncio.gather(*(co.submit(i) for i in (8, 9))) == [80, 90]
    assert batches[-1] == [8, 9]
    assert await co.submit(1) == 10  # a batch of one: quiet again
    assert await co.submit(2) == 20 and batches[-1] == [2]


async def test_without_alone_first_calls_of_one_tick_share_a_batch() -> None:
    batches: list[list[int]] = []

    async def call(items: list[int]) -> list[int | Exception]:
        batches.append(items)
        return list(items)

    co: Coalescer[int, int] = Coalescer(call)
    assert await asyncio.gather(*(co.submit(i) for i in range(4))) == [0, 1, 2, 3]
    assert batches == [[0, 1, 2, 3]]
