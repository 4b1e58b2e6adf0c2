"""The events stream: one entry per transition, or per group of like transitions of one
batch script call (claim, finish), read alike through ``per_task``."""

from __future__ import annotations

import pytest

from gpuflow.core.gpus import GpuSpec
from gpuflow.core.models import TaskStatus
from gpuflow.core.tasks import NewTask, Report
from gpuflow.store.events import per_task, task_ids

from .conftest import Services


async def _entries(s: Services) -> list[dict[str, str]]:
    return [fields for _, fields in await s.store.redis.xrange(s.store.keys.events)]


def test_per_task_reads_both_shapes_alike() -> None:
    one = {"event": "started", "taskId": "task_a", "status": "PROCESSING", "gpuId": "g1"}
    many = {"event": "completed", "taskIds": "task_b,task_c", "status": "COMPLETED"}
    alert = {"event": "alert", "taskId": "", "status": "CRITICAL", "alertId": "alert_1"}
    assert task_ids(one) == ["task_a"] and task_ids(many) == ["task_b", "task_c"]
    assert task_ids(alert) == []
    assert list(per_task([one, many, alert])) == [
        one,
        {"event": "completed", "taskId": "task_b", "status": "COMPLETED"},
        {"event": "completed", "taskId": "task_c", "status": "COMPLETED"},
        alert,
    ]


@pytest.mark.redis
async def test_a_batch_call_writes_one_entry_per_group_of_like_transitions(
    services: Services,
) -> None:
    s = services
    await s.gpus.register(GpuSpec("g1", [1], max_concurrent_tasks=4))
    ids = [
        str((await s.tasks.create(NewTask(1, f"p{i}", max_retries=1)))["taskId"]) for i in range(4)
    ]
    created = len(await _entries(s))
    assert created == 4  # one per create (not a batch call)
    started = await s.dispatch.claim("g1")
    assert sorted(str(t["taskId"]) for t in started) == sorted(ids)
    claim_entries = (await _entries(s))[created:]
    assert claim_entries == [
        {"event": "started", "taskIds": ",".join(ids), "status": "PROCESSING", "gpuId": "g1"}
    ]

    a, b, c, d = ids
    await s.tasks.finish_many(
        [
            Report(a, TaskStatus.COMPLETED, "ra", "g1", 1),
            Report(b, TaskStatus.FAILED, "boom", "g1", 1),  # a retry is left
            Report(c, TaskStatus.COMPLETED, "rc", "g1", 1),
            Report(d, TaskStatus.FAILED, "bang", "g1", 1),  # other fields: its own entry
        ]
    )
    finish_entries = (await _entries(s))[created + 1 :]
    assert finish_entries == [
        {"event": "completed", "taskIds": f"{a},{c}", "status": "COMPLETED", "gpuId": "g1"},
        {"event": "retry", "taskId": b, "status": "QUEUED", "error": "boom"},
        {"event": "retry", "taskId": d, "status": "QUEUED", "error": "bang"},
    ]
    # Read per task, each task's history is what one entry per transition would say.
    seen = [(f["taskId"], f["event"]) for f in per_task(await _entries(s))]
    for task_id in ids:
        mine = [event for tid, event in seen if tid == task_id]
        end = "completed" if task_id in (a, c) else "retry"
        assert mine == ["created", "started", end]
