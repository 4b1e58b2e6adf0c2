"""A node's slots when a claim races past a report that has landed: the server counts the
slot free as soon as the report lands, so the claim may bring a task for it while the node
still awaits the report's answer. The node runs it (its handler is done) instead of
releasing it back to the queue."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gpuflow.worker import Agent, TaskContext, Worker, detect_nodes
from gpuflow.worker.redis_transport import RedisTransport
from gpuflow.worker.transport import ClaimedTask

from .conftest import Services
from .test_worker_support import create, events_of, running, wait_status

pytestmark = pytest.mark.redis
TYPE = 31


class Gated(RedisTransport):
    """The real transport, with two gates a test opens: a claim made while ``hold_claims``
    is set waits for ``claim_go``, then goes to Redis as a claim that does not wait (the
    claim script, which takes what the GPU has room for; not a blocking read of pushed
    tasks, which brings one); a completion that has landed waits for ``answer_go`` before
    its caller hears of it."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.hold_claims = False
        self.claim_held = asyncio.Event()
        self.claim_go = asyncio.Event()
        self.answer_go = asyncio.Event()
        self.landed: list[str] = []

    async def claim(
        self, gpu_id: str, wait_s: float, *, recover: bool = False
    ) -> list[ClaimedTask]:
        if self.hold_claims:
            self.claim_held.set()
            await self.claim_go.wait()
            wait_s = 0.0
        return await super().claim(gpu_id, wait_s, recover=recover)

    async def complete(self, task: ClaimedTask, result: str) -> None:
        await super().complete(task, result)
        self.landed.append(task.task_id)
        await self.answer_go.wait()


@pytest.fixture
async def gated(services: Services) -> AsyncIterator[Gated]:
    t = Gated(services.store)
    try:
        yield t
    finally:
        t.claim_go.set()
        t.answer_go.set()
        await t.close()


async def test_a_claim_that_raced_a_landed_report_runs_all_it_brought(
    services: Services, gated: Gated
) -> None:
    s = services
    first_done = asyncio.Event()
    in_handlers = 0
    peak = 0
    worker = Worker()

    @worker.handler(TYPE)
    async def work(payload: Any, ctx: TaskContext) -> str:
        nonlocal in_handlers, peak
        in_handlers += 1
        peak = max(peak, in_handlers)
        try:
            if payload == "first":
                await first_done.wait()
            return str(payload)
        finally:
            in_handlers -= 1

    specs = detect_nodes([TYPE], gpus=1, max_concurrent_tasks=2, hostname=uuid.uuid4().hex[:8])
    agent = Agent(worker, gated, specs, heartbeat_interval_s=0.5, claim_wait_s=1.0)
    async with running(agent):
        first = await create(s.tasks, TYPE, "first")
        await wait_status(s.store, [first], {"PROCESSING"})
        gated.hold_claims = True
        await asyncio.wait_for(gated.claim_held.wait(), 5)  # one slot free: a claim is out
        more = [await create(s.tasks, TYPE, f"t{i}") for i in range(2)]
        first_done.set()  # the first report lands; the node does not hear it yet
        await wait_status(s.store, [first], {"COMPLETED"})
        gated.claim_go.set()  # the claim reaches Redis now: both slots are free there
        await wait_status(s.store, more, {"COMPLETED"}, within_s=5)
        assert gated.landed[0] == first and len(gated.landed) == 3  # before its answer
        gated.answer_go.set()
    assert peak <= 2  # never more handlers than slots
    for task_id in more:
        kinds = [e["event"] for e in await events_of(s.store, task_id)]
        assert kinds == ["created", "started", "completed"]  # run at once, never released
