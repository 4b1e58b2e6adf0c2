"""The agent end to end against a real Redis: child-process and in-loop executors,
outcomes, concurrency limits, a killed child, timeouts, graceful stop, stale reports."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gpuflow.core.tasks import NewTask
from gpuflow.worker import Agent, NodeSpec, NonRetryableError, TaskContext, Worker, detect_nodes
from gpuflow.worker.executor import ExecutorError
from gpuflow.worker.redis_transport import RedisTransport

from . import test_worker_handlers as support
from .conftest import Services
from .test_worker_support import create, events_of, running, wait_pid, wait_status

pytestmark = pytest.mark.redis


@pytest.fixture
async def transport(services: Services) -> AsyncIterator[RedisTransport]:
    t = RedisTransport(services.store)
    try:
        yield t
    finally:
        await t.close()


def nodes(types: list[int], gpus: int = 1, slots: int = 1) -> list[NodeSpec]:
    host = f"h{uuid.uuid4().hex[:6]}"
    return detect_nodes(types, gpus=gpus, max_concurrent_tasks=slots, hostname=host)


def agent(worker: Worker, transport: RedisTransport, specs: list[NodeSpec], **kw: Any) -> Agent:
    kw.setdefault("heartbeat_interval_s", 0.5)
    kw.setdefault("claim_wait_s", 2.0)
    kw.setdefault("stop_grace_s", 0.3)
    return Agent(worker, transport, specs, **kw)


def marks(tmp_path: Path, **fields: Any) -> str:
    return json.dumps({"dir": str(tmp_path), **fields})


async def test_sync_handlers_on_two_gpus(
    services: Services, transport: RedisTransport, tmp_path: Path
) -> None:
    s = services
    specs = nodes([11, 14], gpus=2)
    async with running(agent(support.worker, transport, specs)):
        tracked = [await create(s.tasks, 11, marks(tmp_path, ms=50)) for _ in range(8)]
        as_json = await create(s.tasks, 14, '{"a": [1, 2]}')
        as_text = await create(s.tasks, 14, "plain words")
        done = await wait_status(s.store, [*tracked, as_json, as_text])
    assert {h["status"] for h in done.values()} == {"COMPLETED"}
    results = [json.loads(done[t]["result"]) for t in tracked]
    assert {r["gpu"] for r in results} == {n.gpu_id for n in specs}
    for r, t in zip(results, tracked, strict=True):
        assert r["gpu"] == done[t]["gpuId"]
        assert r["cuda"] == r["gpu"].rsplit("gpu", 1)[1]  # pinned to the node's index
        assert r["pid"] != os.getpid()
    # One child per GPU slot, reused between tasks.
    assert len({r["pid"] for r in results}) == 2
    assert json.loads(done[as_json]["result"]) == {
        "payload": {"a": [1, 2]},
        "raw": '{"a": [1, 2]}',
        "attempt": 1,
    }
    assert done[as_text]["result"] == "raw:plain words"
    for t in tracked:
        progress = [e for e in await events_of(s.store, t) if e["event"] == "progress"]
        assert progress and progress[0]["progress"] == "50"
    for n in specs:
        gpu = await s.gpus.get(n.gpu_id)
        assert gpu["status"] == "ACTIVE" and gpu["currentTasks"] == 0
        assert gpu["metadata"]["gpuModel"] == "simulated"


async def test_async_handlers_run_in_the_loop(
    services: Services, transport: RedisTransport
) -> None:
    s = services
    seen: list[TaskContext] = []

    async def handler(payload: Any, ctx: TaskContext) -> Any:
        seen.append(ctx)
        ctx.progress(30, "thinking")
        await asyncio.sleep(0.01)
        ctx.progress(90)
        if payload == "text please":
            return "just text"
        return {"got": payload, "gpu": ctx.gpu_id}

    specs = nodes([21], slots=2)
    async with running(agent(Worker({21: handler}), transport, specs)):
        a = await create(s.tasks, 21, '{"x": 1}', user_id="u1", app="demo", priority=1)
        b = await create(s.tasks, 21, "text please")
        done = await wait_status(s.store, [a, b])
    assert json.loads(done[a]["result"]) == {"got": {"x": 1}, "gpu": specs[0].gpu_id}
    assert done[b]["result"] == "just text"
    ctx = next(c for c in seen if c.task_id == a)
    assert (ctx.user_id, ctx.app, ctx.priority, ctx.attempt, ctx.task_type) == (
        "u1",
        "demo",
        1,
        1,
        21,
    )
    assert ctx.gpu_index == 0 and ctx.max_retries == 3 and ctx.retry_count == 0
    # The last progress before the result is always sent.
    progress = [e["progress"] for e in await events_of(s.store, a) if e["event"] == "progress"]
    assert progress[-1] == "90"


async def test_outcomes_non_retryable_and_retryable(
    services: Services, transport: RedisTransport
) -> None:
    s = services
    async with running(agent(support.worker, transport, nodes([15], slots=2))):
        fatal = await create(s.tasks, 15, '{"mode": "fatal"}')
        flaky = await create(s.tasks, 15, '{"mode": "flaky", "ok_from": 2}')
        hopeless = await create(s.tasks, 15, '{"mode": "flaky"}', max_retries=1)
        done = await wait_status(s.store, [fatal, flaky, hopeless])
    assert (done[fatal]["status"], done[fatal]["retryCount"]) == ("FAILED", "0")
    assert done[fatal]["errorMessage"] == "bad input, no retry"
    assert (done[flaky]["status"], done[flaky]["result"]) == ("COMPLETED", "ok on attempt 2")
    assert done[flaky]["retryCount"] == "1"
    assert (done[hopeless]["status"], done[hopeless]["retryCount"]) == ("FAILED", "1")
    assert done[hopeless]["errorMessage"] == "flaky on attempt 2"


async def test_async_non_retryable_error(services: Services, transport: RedisTransport) -> None:
    async def handler(payload: Any, ctx: TaskContext) -> None:
        raise NonRetryableError("no")

    async with running(agent(Worker({22: handler}), transport, nodes([22]))):
        task = await create(services.tasks, 22, "x", max_retries=5)
        done = await wait_status(services.store, [task])
    assert (done[task]["status"], done[task]["retryCount"]) == ("FAILED", "0")
    assert done[task]["errorMessage"] == "no"


async def test_max_concurrent_tasks_never_exceeded(services: Services, tmp_path: Path) -> None:
    """Two agents (3 nodes, 8 child processes) against 200 tasks."""
    s = services
    t1, t2 = RedisTransport(s.store), RedisTransport(s.store)
    a_nodes, b_nodes = nodes([11], gpus=2, slots=3), nodes([11], gpus=1, slots=2)
    limits = {n.gpu_id: n.max_concurrent_tasks for n in a_nodes + b_nodes}
    try:
        async with (
            running(agent(support.worker, t1, a_nodes)),
            running(agent(support.worker, t2, b_nodes)),
        ):
            payload = marks(tmp_path, ms=30)
            ids = [await create(s.tasks, 11, payload) for _ in range(200)]
            done = await wait_status(s.store, ids, within_s=40)
    finally:
        await t1.close()
        await t2.close()
    assert {h["status"] for h in done.values()} == {"COMPLETED"}
    samples = {g: (tmp_path / g / "samples").read_text().split() for g in limits}
    peaks = {g: max(int(x) for x in xs) for g, xs in samples.items()}
    for gpu_id, limit in limits.items():
        assert peaks[gpu_id] <= limit, (gpu_id, peaks[gpu_id], limit)
    assert sum(len(xs) for xs in samples.values()) == 200
    assert max(peaks.values()) >= 2  # the load really ran tasks side by side


async def test_killed_child_fails_the_task_and_restarts(
    services: Services, transport: RedisTransport
) -> None:
    s = services
    async with running(agent(support.worker, transport, nodes([12, 14]))):
        task = await create(s.tasks, 12, max_retries=2)
        first = await wait_pid(s.store, task)
        os.kill(first, signal.SIGKILL)
        done = await wait_status(s.store, [task])
        after = await create(s.tasks, 14, "still serving")
        after_done = await wait_status(s.store, [after])
    assert done[task]["status"] == "COMPLETED"
    assert done[task]["result"].startswith("attempt 2 in ")
    assert done[task]["result"] != f"attempt 2 in {first}"  # a new child
    assert done[task]["retryCount"] == "1"
    retry = [e for e in await events_of(s.store, task) if e["event"] == "retry"]
    assert len(retry) == 1 and "died (exit code -9)" in retry[0]["error"]
    assert after_done[after]["result"] == "raw:still serving"


async def test_hard_timeout_kills_the_child(services: Services, transport: RedisTransport) -> None:
    s = services
    async with running(agent(support.worker, transport, nodes([13, 14]))):
        task = await create(s.tasks, 13, '{"seconds": 30}', timeout=1000, max_retries=0)
        pid = await wait_pid(s.store, task)
        done = await wait_status(s.store, [task])
        after = await create(s.tasks, 14, "next")
        after_done = await wait_status(s.store, [after])
    assert done[task]["status"] == "TIMEOUT"
    assert done[task]["errorMessage"] == (
        f"timed out after 1000 ms; executor process {pid} killed after 0.3 s of grace"
    )
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert after_done[after]["result"] == "raw:next"


async def test_graceful_stop_releases_unfinished_tasks(
    services: Services, transport: RedisTransport
) -> None:
    s = services
    worker_agent = agent(support.worker, transport, nodes([13]))
    await worker_agent.start()
    task = await create(s.tasks, 13, '{"seconds": 30}')
    pid = await wait_pid(s.store, task)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await worker_agent.stop(grace_s=0.3)
    assert loop.time() - t0 < 5
    view = await s.tasks.get(task)
    assert (view["status"], view["retryCount"], view["attempt"]) == ("QUEUED", 0, 1)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_graceful_stop_lets_running_tasks_finish(
    services: Services, transport: RedisTransport
) -> None:
    started = asyncio.Event()

    async def handler(payload: Any, ctx: TaskContext) -> str:
        started.set()
        await asyncio.sleep(0.3)
        return "finished in time"

    worker_agent = agent(Worker({23: handler}), transport, nodes([23]))
    await worker_agent.start()
    task = await create(services.tasks, 23)
    await asyncio.wait_for(started.wait(), 10)
    await worker_agent.stop(grace_s=10)
    view = await services.tasks.get(task)
    assert (view["status"], view["result"]) == ("COMPLETED", "finished in time")


async def test_stale_report_is_dropped(services: Services, transport: RedisTransport) -> None:
    s = services
    started, gate = asyncio.Event(), asyncio.Event()

    async def handler(payload: Any, ctx: TaskContext) -> str:
        if ctx.attempt == 1:
            started.set()
            await gate.wait()
        return f"attempt {ctx.attempt}"

    async with running(agent(Worker({24: handler}), transport, nodes([24]))) as a:
        task = await create(s.tasks, 24)
        await asyncio.wait_for(started.wait(), 10)
        await s.tasks.requeue(task, attempt=1)  # as when its lease is lost
        gate.set()
        done = await wait_status(s.store, [task])
        assert a.ready.is_set()
    assert (done[task]["result"], done[task]["attempt"]) == ("attempt 2", "2")


async def test_bad_worker_setups_fail_early(transport: RedisTransport) -> None:
    with pytest.raises(ValueError, match="no handler for task type"):
        Agent(Worker({1: lambda p, c: p}), transport, nodes([1, 2]))
    # A zero wait or interval would spin its loop; it is refused, not swapped for the default.
    echo = Worker({1: lambda p, c: p})
    with pytest.raises(ValueError, match="claim_wait_s must be > 0"):
        Agent(echo, transport, nodes([1]), claim_wait_s=0.0)
    with pytest.raises(ValueError, match="heartbeat_interval_s must be > 0"):
        Agent(echo, transport, nodes([1]), heartbeat_interval_s=0)
    short = Agent(echo, transport, nodes([1]), claim_wait_s=0.25, heartbeat_interval_s=0.5)
    assert (short.options.claim_wait_s, short.options.heartbeat_interval_s) == (0.25, 0.5)
    closure = Worker({1: lambda p, c: p})
    with pytest.raises(TypeError, match="must be importable"):
        await agent(closure, transport, nodes([1])).run(asyncio.Event())
    missing = Worker({1: support.describe}, ref="tests.no_such_module:worker")
    with pytest.raises(ExecutorError, match="ModuleNotFoundError"):
        await agent(missing, transport, nodes([1])).run(asyncio.Event())


async def test_deleted_node_registers_again(services: Services, transport: RedisTransport) -> None:
    s = services

    async def handler(payload: Any, ctx: TaskContext) -> str:
        return "served"

    specs = nodes([26])
    async with running(agent(Worker({26: handler}), transport, specs, claim_wait_s=0.5)):
        await s.gpus.delete(specs[0].gpu_id)  # an operator removed it
        task = await create(s.tasks, 26)
        done = await wait_status(s.store, [task])
        gpu = await s.gpus.get(specs[0].gpu_id)
    assert done[task]["result"] == "served"
    assert gpu["status"] == "ACTIVE"


async def test_heartbeat_registers_a_deleted_busy_node_and_its_siblings_keep_beating(
    services: Services, transport: RedisTransport
) -> None:
    """Both nodes' one slot is busy, so only the heartbeat can notice that one was deleted:
    the agent's shared heartbeat round registers it again, and the other node's beat goes
    on meanwhile."""
    s = services
    running_now: set[str] = set()
    both = asyncio.Event()

    async def handler(payload: Any, ctx: TaskContext) -> str:
        running_now.add(ctx.gpu_id)
        if len(running_now) == 2:
            both.set()
        for _ in range(300):  # until told to stop (bounded: 3 s)
            if ctx.should_stop():
                break
            await asyncio.sleep(0.01)
        return "done"

    specs = nodes([27], gpus=2)
    gone, kept = specs[0].gpu_id, specs[1].gpu_id
    work = agent(Worker({27: handler}), transport, specs, heartbeat_interval_s=0.2)
    async with running(work):
        await create(s.tasks, 27)
        await create(s.tasks, 27)
        await asyncio.wait_for(both.wait(), 10)
        await s.gpus.delete(gone)
        before = (await s.gpus.get(kept))["lastHeartbeat"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not await s.store.redis.exists(s.store.keys.gpu(gone)):
            assert loop.time() < deadline, "the deleted node was not registered again"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert (await s.gpus.get(kept))["lastHeartbeat"] > before


async def test_an_idle_agent_gets_new_tasks_pushed_and_a_stopped_one_none(
    services: Services, transport: RedisTransport
) -> None:
    """Push dispatch end to end: an idle agent waits on its inbox and runs what a create
    started for it; stopped while it runs one task and waits for more, it lets that task
    finish, its waiting flag is gone and a new task stays QUEUED instead of going to it."""
    s = services
    gate = asyncio.Event()

    async def handler(payload: Any, ctx: TaskContext) -> str:
        if payload == "hold":
            await gate.wait()
        return f"ran {payload}"

    specs = nodes([24], slots=2)
    gpu_id = specs[0].gpu_id
    flag = s.store.keys.gpu_waiting(gpu_id)
    worker_agent = agent(Worker({24: handler}), transport, specs)
    await worker_agent.start()
    try:
        for _ in range(400):  # until its first claim found nothing and it waits
            if await s.store.redis.exists(flag):
                break
            await asyncio.sleep(0.01)
        first = await s.tasks.create(NewTask(24, "quick"))
        assert first["status"] == "PROCESSING"  # started on the waiting GPU by the create
        await wait_status(s.store, [first["taskId"]])
        held = await s.tasks.create(NewTask(24, "hold"))
        assert held["status"] == "PROCESSING"
    finally:
        gate.set()
        await worker_agent.stop(grace_s=5)
    assert (await s.tasks.get(held["taskId"]))["status"] == "COMPLETED"
    assert not await s.store.redis.exists(flag)
    after = await s.tasks.create(NewTask(24, "late"))
    assert after["status"] == "QUEUED"
    assert await s.store.redis.llen(s.store.keys.gpu_inbox(gpu_id)) <= 1  # at most a wake row


async def test_in_loop_handlers_start_eagerly(
    services: Services, transport: RedisTransport
) -> None:
    """An async handler's first step runs in the job's own task (worker/eager.py): one that
    never suspends ends there; one that suspends goes on in a task of its own, under its
    timeout as before."""
    where: dict[str, list[str | None]] = {"quick": [], "slow": []}

    def task_name() -> str | None:
        current = asyncio.current_task()
        return current.get_name() if current is not None else None

    async def quick(payload: Any, ctx: TaskContext) -> str:
        where["quick"].append(task_name())
        return "quick"

    async def slow(payload: Any, ctx: TaskContext) -> str:
        where["slow"].append(task_name())
        await asyncio.sleep(0.01)
        where["slow"].append(task_name())
        await asyncio.sleep(30)  # past its timeout
        return "late"

    s = services
    eager = Worker({41: quick, 42: slow})
    async with running(agent(eager, transport, nodes([41, 42], slots=2))):
        fast = await create(s.tasks, 41)
        late = await create(s.tasks, 42, timeout=300, max_retries=0)
        done = await wait_status(s.store, [fast, late], within_s=20)
    assert done[fast]["status"] == "COMPLETED" and done[fast]["result"] == "quick"
    assert where["quick"] == [f"task-{fast}"]
    assert done[late]["status"] == "TIMEOUT", done[late]
    first, after = where["slow"]
    assert first == f"task-{late}" and after != first  # resumed in a task of its own
