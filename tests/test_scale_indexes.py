"""Scale changes: the status × type index, sparse task hashes, and the scale bench's loader."""

from __future__ import annotations

import time

import pytest
import redis
from bench.scale_redis import Loader

from gpuflow.config import Settings
from gpuflow.core.gpus import GpuSpec
from gpuflow.core.models import TaskStatus
from gpuflow.core.tasks import NewTask

from .conftest import Services

pytestmark = pytest.mark.redis
STATUSES = [s.value for s in TaskStatus]


async def _index_of_every_task(s: Services) -> dict[str, tuple[str, int]]:
    """task id → (status, type) as the idx:st:{status}:{type} zsets hold them."""
    r, k = s.store.redis, s.store.keys
    seen: dict[str, tuple[str, int]] = {}
    for status in STATUSES:
        for task_type in (1, 2):
            for task_id in await r.zrange(k.idx_status_type(status, task_type), 0, -1):
                assert task_id not in seen, f"{task_id} is in two status × type indexes"
                seen[task_id] = (status, task_type)
    return seen


async def test_status_type_index_follows_every_transition(services: Services) -> None:
    s = services
    await s.gpus.register(GpuSpec("g1", [1, 2], max_concurrent_tasks=4))
    ids = [(await s.tasks.create(NewTask(1 + i % 2, f"p{i}")))["taskId"] for i in range(8)]
    started = [t["taskId"] for t in await s.dispatch.claim("g1")]
    assert len(started) == 4
    await s.tasks.finish(started[0], TaskStatus.COMPLETED, "ok", attempt=1)
    await s.tasks.finish(started[1], TaskStatus.FAILED, "no", attempt=1, retryable=False)
    await s.tasks.finish(started[2], TaskStatus.FAILED, "again", attempt=1)  # retried: QUEUED
    queued = [i for i in ids if i not in started]
    await s.tasks.cancel(queued[0])
    await s.tasks.cancel(started[3])  # PROCESSING → CANCELED

    truth = {i: (h["status"], h["taskType"]) for i in ids if (h := await s.tasks.get(i))}
    assert await _index_of_every_task(s) == truth
    for status in STATUSES:
        for task_type in (1, 2):
            want = sorted(
                (i for i, v in truth.items() if v == (status, task_type)),
                key=lambda i: -ids.index(i),
            )
            items, total = await s.tasks.list(status=TaskStatus(status), task_type=task_type)
            assert [t["taskId"] for t in items] == want
            assert total == len(want)
    # with a third filter the combined index is intersected with the user's
    items, total = await s.tasks.list(status=TaskStatus.QUEUED, task_type=1, user_id="nobody")
    assert (items, total) == ([], 0)


async def test_status_type_pages_are_newest_first(services: Services) -> None:
    s = services
    ids = [(await s.tasks.create(NewTask(1, f"p{i}")))["taskId"] for i in range(7)]
    pages = [await s.tasks.list(status=TaskStatus.QUEUED, task_type=1, page=p, size=3)
             for p in (1, 2, 3)]  # fmt: skip
    assert [t["taskId"] for items, _ in pages for t in items] == ids[::-1]
    assert {total for _, total in pages} == {7}


async def test_retention_deletes_the_status_type_entry(services: Services) -> None:
    s = services
    await s.gpus.register(GpuSpec("g1", [1]))
    task_id = (await s.tasks.create(NewTask(1, "x", user_id="u1")))["taskId"]
    await s.dispatch.claim("g1")
    await s.tasks.finish(task_id, TaskStatus.COMPLETED, "ok", attempt=1)
    key = s.store.keys.idx_status_type("COMPLETED", 1)
    assert await s.store.redis.zscore(key, task_id) is not None
    cutoff = int(time.time() * 1000) + 60_000
    assert (await s.store.scripts.call("purge_finished", cutoff, 100))[0] == 1
    assert await s.store.redis.exists(key, s.store.keys.task(task_id)) == 0


async def test_empty_optional_fields_are_not_stored(services: Services) -> None:
    s = services
    task_id = (await s.tasks.create(NewTask(3, "x")))["taskId"]
    stored = await s.store.redis.hgetall(s.store.keys.task(task_id))
    assert not {"userId", "app", "env"} & stored.keys()
    view = await s.tasks.get(task_id)
    assert (view["userId"], view["app"], view["env"]) == (None, None, None)
    assert (await s.tasks.list(task_type=3))[0][0]["app"] is None


async def test_bench_loader_stores_what_tasks_create_stores(
    services: Services, redis_url: str, settings: Settings
) -> None:
    """The scale bench's pipelined creates write the same task records as Tasks.create."""
    s = services
    core = await s.tasks.create(NewTask(1, '{"input":"image.jpg"}', "user0", "bench"))
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for _ in Loader(sync, settings).create(2, 5, 100):
            pass
    finally:
        sync.close()
    r, k = s.store.redis, s.store.keys
    ids = await r.zrange(k.idx_all, 0, -1)
    hashes = [await r.hgetall(k.task(i)) for i in ids]
    assert hashes[0]["taskId"] == core["taskId"]
    assert hashes[0].keys() == hashes[1].keys() == hashes[2].keys()
    same = ("status", "tier", "priority", "maxRetries", "timeout", "attempt", "retryCount")
    assert {tuple(h[f] for f in same) for h in hashes} == {tuple(hashes[0][f] for f in same)}


async def test_bench_loader_claims_and_finishes_through_the_scripts(
    services: Services, redis_url: str, settings: Settings
) -> None:
    """The scale bench's claim and batched finish calls match the scripts' argument layout."""
    s = services
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        loader = Loader(sync, settings)
        for _ in loader.create(150, 1, 10):
            pass
        loader.register("gb", [1], 150)
        ids = loader.claim("gb", [1])
        assert len(ids) == 150
        loader.finish(ids[:120], "gb", "COMPLETED")
        loader.finish(ids[120:], "gb", "FAILED")
    finally:
        sync.close()
    done, _ = await s.tasks.list(status=TaskStatus.COMPLETED, size=200)
    failed, _ = await s.tasks.list(status=TaskStatus.FAILED, size=200)
    assert {t["taskId"] for t in done} == set(ids[:120])
    assert {t["taskId"] for t in failed} == set(ids[120:])
    assert done[0]["result"] == '{"output":"result.jpg"}'
