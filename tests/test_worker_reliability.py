"""The agent's reliability against a real Redis with short leases (600 ms, heartbeats every
100 ms): heartbeats that a stuck handler cannot stop, graded timeouts, cancellation through
the heartbeat reply, orphans of a restarted agent, cluster membership."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from gpuflow.core.cluster import instances
from gpuflow.core.dispatch import Dispatcher
from gpuflow.core.gpus import Gpus, GpuSpec
from gpuflow.core.tasks import Tasks
from gpuflow.store import Store
from gpuflow.worker import Agent, NodeSpec, StopRequested, TaskContext, Worker, detect_nodes
from gpuflow.worker.redis_transport import RedisTransport

from . import test_worker_handlers as support
from .test_worker_support import (
    create,
    events_of,
    fast_settings,
    leader_loops,
    own_store,
    running,
    wait_for,
    wait_pid,
    wait_status,
    wait_until,
)

pytestmark = pytest.mark.redis


# Async handlers run in the agent's loop (their module is imported once: this one).
seen_stop: list[bool] = []
release = asyncio.Event()


async def patient(payload: Any, ctx: TaskContext) -> str:
    """Waits; cancelled, it notes whether ctx.should_stop() was already true."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        seen_stop.append(ctx.should_stop())
        raise
    return "woke up"


async def stubborn(payload: Any, ctx: TaskContext) -> str:
    """Ignores every cancellation until the test releases it."""
    while not release.is_set():
        try:
            await release.wait()
        except asyncio.CancelledError:
            seen_stop.append(ctx.should_stop())
    return "released"


mixed = Worker({**support.worker.handlers, 41: patient, 42: stubborn})


@dataclass
class Env:
    url: str
    store: Store
    gpus: Gpus
    tasks: Tasks
    dispatch: Dispatcher
    transport: RedisTransport


@pytest.fixture
async def env(redis_url: str, namespace: str, tmp_path: Path) -> AsyncIterator[Env]:
    settings = fast_settings(namespace, tmp_path)
    async with own_store(redis_url, settings) as store:
        gpus = Gpus(store)
        blocking = store.blocking_client()
        transport = RedisTransport(store)
        try:
            yield Env(
                redis_url, store, gpus, Tasks(store, gpus), Dispatcher(store, gpus, blocking),
                transport,
            )  # fmt: skip
        finally:
            await transport.close()
            await blocking.aclose()


def nodes(types: list[int], slots: int = 1) -> list[NodeSpec]:
    host = f"r{uuid.uuid4().hex[:6]}"
    return detect_nodes(types, gpus=1, max_concurrent_tasks=slots, hostname=host)


def agent(worker: Worker, env: Env, specs: list[NodeSpec], **kw: Any) -> Agent:
    kw.setdefault("heartbeat_interval_s", 0.1)
    kw.setdefault("claim_wait_s", 1.0)
    kw.setdefault("stop_grace_s", 0.3)
    return Agent(worker, env.transport, specs, **kw)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_a_frozen_sync_handler_keeps_its_lease(env: Env) -> None:
    """The handler's process is stopped (SIGSTOP) for longer than the lease while the leader
    expires leases: the agent's heartbeats keep the task, which completes once."""
    silent = f"silent-{uuid.uuid4().hex[:6]}"
    async with (
        leader_loops(env.url, env.store.settings),
        running(agent(support.worker, env, nodes([16]))),
    ):
        task = await create(env.tasks, 16)
        pid = await wait_pid(env.store, task)
        await wait_for(
            lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, what="SIGSTOP"
        )
        # A control task on a GPU that never beats: the leader requeues it after a lease,
        # which is also how long the frozen task has gone without its handler.
        await env.gpus.register(GpuSpec(silent, [99]))
        control = await create(env.tasks, 99)
        assert [t["taskId"] for t in await env.dispatch.claim(silent)] == [control]
        await wait_until(env.store, [control], lambda h: h.get("retryCount") == "1")
        assert (await env.tasks.get(task))["status"] == "PROCESSING"
        os.kill(pid, signal.SIGCONT)
        done = await wait_status(env.store, [task])
    h = done[task]
    assert (h["status"], h["result"]) == ("COMPLETED", "thawed on attempt 1")
    assert (h["attempt"], h["retryCount"]) == ("1", "0")
    kinds = [e["event"] for e in await events_of(env.store, task)]
    assert "retry" not in kinds and "requeued" not in kinds


async def test_soft_timeout_stops_a_cooperative_sync_handler(env: Env) -> None:
    """Past its timeout the handler sees ctx.should_stop() and returns: the attempt is a
    timeout, and its process, not killed, runs the next task."""
    async with running(agent(support.worker, env, nodes([17]), stop_grace_s=10)):
        first = await create(env.tasks, 17, timeout=300, max_retries=0)
        pid = await wait_pid(env.store, first)
        second = await create(env.tasks, 17, timeout=300, max_retries=0)
        assert await wait_pid(env.store, second) == pid
        done = await wait_status(env.store, [first, second])
    for h in done.values():
        assert h["status"] == "TIMEOUT"
        assert h["errorMessage"] == "timed out after 300 ms; the handler stopped when asked"


async def test_interrupt_on_stop_raises_in_a_sleeping_handler(env: Env) -> None:
    """With interrupt_on_stop, time.sleep(30) ends in StopRequested; no kill needed."""
    assert issubclass(StopRequested, BaseException)
    interrupting = agent(support.interrupting, env, nodes([13]), stop_grace_s=10)
    async with running(interrupting):
        first = await create(env.tasks, 13, '{"seconds": 30}', timeout=300, max_retries=0)
        pid = await wait_pid(env.store, first)
        second = await create(env.tasks, 13, '{"seconds": 30}', timeout=300, max_retries=0)
        assert await wait_pid(env.store, second) == pid
        done = await wait_status(env.store, [first, second])
    for h in done.values():
        assert h["status"] == "TIMEOUT"
        assert h["errorMessage"] == "timed out after 300 ms; the handler stopped when asked"


async def test_async_handlers_are_cancelled_then_abandoned(env: Env) -> None:
    seen_stop.clear()
    release.clear()
    try:
        async with running(agent(mixed, env, nodes([41, 42], slots=2))):
            polite = await create(env.tasks, 41, timeout=300, max_retries=0)
            rude = await create(env.tasks, 42, timeout=300, max_retries=0)
            done = await wait_status(env.store, [polite, rude])
    finally:
        release.set()
    assert {h["status"] for h in done.values()} == {"TIMEOUT"}
    assert done[polite]["errorMessage"].endswith("; the handler stopped when asked")
    assert done[rude]["errorMessage"].endswith(
        "; the handler ignored its cancellation and was abandoned"
    )
    assert seen_stop and all(seen_stop)  # the flag is set before the cancellation


async def test_cancel_stops_handlers_without_a_report(env: Env) -> None:
    """The heartbeat reply says stop: a cooperative handler stops (its process stays), one
    that ignores it is killed after the grace, an async one is cancelled; none reports."""
    seen_stop.clear()
    async with running(agent(mixed, env, nodes([13, 14, 17, 41]))):
        polite = await create(env.tasks, 17)
        pid = await wait_pid(env.store, polite)
        await env.tasks.cancel(polite)
        rude = await create(env.tasks, 13, '{"seconds": 30}')
        assert await wait_pid(env.store, rude) == pid  # the same process: not killed
        await env.tasks.cancel(rude)
        in_loop = await create(env.tasks, 41)
        await wait_until(env.store, [in_loop], lambda h: h.get("status") == "PROCESSING")
        assert gone(pid)
        await env.tasks.cancel(in_loop)
        after = await create(env.tasks, 14, "next")
        done = await wait_status(env.store, [after])
        gpu = await env.gpus.get(done[after]["gpuId"])
    assert done[after]["result"] == "raw:next"
    assert seen_stop == [True]
    for task in (polite, rude, in_loop):
        view = await env.tasks.get(task)
        assert (view["status"], view["result"], view["attempt"]) == ("CANCELED", None, 1)
        kinds = {e["event"] for e in await events_of(env.store, task)}
        assert not kinds & {"completed", "failed", "timeout", "retry", "requeued"}
    assert gpu["currentTasks"] == 0


async def test_restarted_agent_requeues_its_orphans(env: Env) -> None:
    """A task left PROCESSING by a previous run of the same node is not among what the new
    agent's heartbeats list: the server fails that attempt and the task runs again."""
    specs = nodes([25])
    gpu_id = specs[0].gpu_id
    await env.gpus.register(GpuSpec(gpu_id, [25]))
    task = await create(env.tasks, 25)
    (claimed,) = await env.dispatch.claim(gpu_id)
    assert claimed["taskId"] == task

    async def handler(payload: Any, ctx: TaskContext) -> str:
        return f"attempt {ctx.attempt}"

    async with running(agent(Worker({25: handler}), env, specs)):
        done = await wait_status(env.store, [task])
    assert (done[task]["result"], done[task]["retryCount"]) == ("attempt 2", "1")
    (retry,) = [e for e in await events_of(env.store, task) if e["event"] == "retry"]
    assert "lost attempt 1" in retry["error"]


async def test_agent_is_a_cluster_instance(env: Env) -> None:
    async def handler(payload: Any, ctx: TaskContext) -> None:
        return None

    me = os.getpid()

    async def workers() -> list[dict[str, Any]]:
        return [i for i in await instances(env.store) if i["role"] == "WORKER" and i["pid"] == me]

    async with running(agent(Worker({26: handler}), env, nodes([26]))):
        for _ in range(250):  # its first beat follows the start at once
            if found := await workers():
                break
            await asyncio.sleep(0.02)
    assert len(found) == 1 and found[0]["instance_id"].startswith("worker-")
    assert await workers() == []  # it leaves when it stops
