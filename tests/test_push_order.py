"""Which waiting GPU a new task is pushed to: an idle one before one that runs tasks, and
among idle ones the one idle the shortest time (its agent is warm); among busy ones with
room, the longest waiting."""

from __future__ import annotations

import asyncio

import pytest

from gpuflow.core.gpus import GpuSpec
from gpuflow.core.models import TaskStatus
from gpuflow.core.tasks import NewTask

from .conftest import Services

pytestmark = pytest.mark.redis
Claim = asyncio.Task[list[list[object]]]


async def _waiting(s: Services, gpu_id: str, wait_s: float = 5.0) -> Claim:
    """An agent's claim blocked on its inbox, once its claim script has registered it."""
    flag = s.store.keys.gpu_waiting(gpu_id)
    claim = asyncio.create_task(s.dispatch.claim_rows(gpu_id, wait_s, push=True))
    for _ in range(400):  # the flag is (re)set with the whole wait plus a margin
        if (await s.store.redis.pttl(flag)) > wait_s * 1000:
            await asyncio.sleep(0.01)  # the next registration gets a later millisecond
            return claim
        await asyncio.sleep(0.005)
    raise AssertionError(f"{gpu_id} never waited")


async def _pushed(claim: Claim) -> list[object]:
    return [row[0] for row in await asyncio.wait_for(claim, 5)]


async def _stop(s: Services, *claims: tuple[str, Claim]) -> None:
    for gpu_id, claim in claims:
        await s.dispatch.unwait(gpu_id)
        await asyncio.wait_for(claim, 5)


async def test_idle_gpus_first_the_last_one_idle_first(services: Services) -> None:
    s = services
    for gpu_id in ("a", "b", "c"):
        await s.gpus.register(GpuSpec(gpu_id, [1], max_concurrent_tasks=2))
    a = await _waiting(s, "a")
    b = await _waiting(s, "b")
    c = await _waiting(s, "c")
    first = (await s.tasks.create(NewTask(1, "1")))["taskId"]
    assert await _pushed(c) == [first]  # the three idle: the one that waited least
    c = asyncio.create_task(s.dispatch.claim_rows("c", 5.0, push=True))  # room for one more
    second = (await s.tasks.create(NewTask(1, "2")))["taskId"]
    assert await _pushed(b) == [second]  # c runs a task now: an idle GPU goes first
    b = asyncio.create_task(s.dispatch.claim_rows("b", 5.0, push=True))
    await s.tasks.finish(first, TaskStatus.COMPLETED, "ok", attempt=1, gpu_id="c")
    third = (await s.tasks.create(NewTask(1, "3")))["taskId"]
    assert await _pushed(c) == [third]  # idle again, and the last to become idle
    assert not a.done() and not b.done()
    await s.tasks.finish(second, TaskStatus.COMPLETED, "ok", attempt=1, gpu_id="b")
    await _stop(s, ("a", a), ("b", b))


async def test_busy_gpus_with_room_take_turns(services: Services) -> None:
    s = services
    for gpu_id in ("p", "q"):
        await s.gpus.register(GpuSpec(gpu_id, [1], max_concurrent_tasks=3))
    claims = {"p": await _waiting(s, "p"), "q": await _waiting(s, "q")}
    order = []
    for i in range(4):
        task_id = (await s.tasks.create(NewTask(1, f"t{i}")))["taskId"]
        await asyncio.wait(claims.values(), timeout=5, return_when=asyncio.FIRST_COMPLETED)
        (gpu_id,) = [g for g, claim in claims.items() if claim.done()]
        assert await _pushed(claims[gpu_id]) == [task_id]
        order.append(gpu_id)
        claims[gpu_id] = asyncio.create_task(s.dispatch.claim_rows(gpu_id, 5.0, push=True))
        await asyncio.sleep(0.01)
    # q (idle, waiting least) first, then p (idle); then both busy: the longest waiting.
    assert order == ["q", "p", "q", "p"]
    await _stop(s, *claims.items())


async def test_an_idle_gpu_whose_read_ended_keeps_its_place(services: Services) -> None:
    s = services
    for gpu_id in ("x", "y"):
        await s.gpus.register(GpuSpec(gpu_id, [1], max_concurrent_tasks=2))
    x = await _waiting(s, "x", wait_s=0.2)
    y = await _waiting(s, "y")
    assert await asyncio.wait_for(x, 5) == []  # x's blocking read ended with nothing
    x = await _waiting(s, "x")  # its agent claims and waits again, still idle
    task_id = (await s.tasks.create(NewTask(1, "t")))["taskId"]
    assert await _pushed(y) == [task_id]  # y became idle after x did
    assert not x.done()
    await s.tasks.finish(task_id, TaskStatus.COMPLETED, "ok", attempt=1, gpu_id="y")
    await _stop(s, ("x", x))
