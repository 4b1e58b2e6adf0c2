"""Helpers for the worker tests (no tests here): create tasks, wait on the events stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from gpuflow.config import Settings
from gpuflow.core.cluster import new_instance_id
from gpuflow.core.leader import Leadership
from gpuflow.core.loops import Maintenance
from gpuflow.core.system import System
from gpuflow.core.tasks import NewTask, Tasks
from gpuflow.store import Store
from gpuflow.store.events import per_task
from gpuflow.worker import Agent

FINAL = frozenset({"COMPLETED", "FAILED", "TIMEOUT", "CANCELED"})


async def create(tasks: Tasks, task_type: int, payload: str = "", **kw: Any) -> str:
    return str((await tasks.create(NewTask(task_type, payload, **kw)))["taskId"])


async def wait_until(
    store: Store,
    task_ids: Iterable[str],
    ok: Callable[[dict[str, str]], bool],
    within_s: float = 20.0,
) -> dict[str, dict[str, str]]:
    """Wait until ``ok(task hash)`` holds for every task, woken by the events stream."""
    ids = list(task_ids)
    r, last = store.redis, "0-0"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        async with r.pipeline(transaction=False) as p:
            for task_id in ids:
                p.hgetall(store.keys.task(task_id))
            hashes = await p.execute()
        pending = [i for i, h in zip(ids, hashes, strict=True) if not ok(h)]
        if not pending:
            return dict(zip(ids, hashes, strict=True))
        left = deadline - loop.time()
        if left <= 0:
            raise AssertionError(f"{len(pending)} task(s) still waiting: {pending[:3]}")
        reply = await r.xread({store.keys.events: last}, block=int(min(left, 1.0) * 1000))
        if reply:
            last = reply[0][1][-1][0]


async def wait_status(
    store: Store, task_ids: Iterable[str], want: Iterable[str] = FINAL, within_s: float = 20.0
) -> dict[str, dict[str, str]]:
    wanted = set(want)
    return await wait_until(store, task_ids, lambda h: h.get("status") in wanted, within_s)


async def wait_pid(store: Store, task_id: str) -> int:
    """The pid a test handler announced in its progress message."""
    done = await wait_until(
        store, [task_id], lambda h: h.get("progressMessage", "").startswith("pid ")
    )
    return int(done[task_id]["progressMessage"].split()[1])


async def events_of(store: Store, task_id: str) -> list[dict[str, str]]:
    entries = await store.redis.xrange(store.keys.events)
    return [f for f in per_task(fields for _, fields in entries) if f.get("taskId") == task_id]


@asynccontextmanager
async def running(agent: Agent, grace_s: float = 5.0) -> AsyncIterator[Agent]:
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop(grace_s)


def fast_settings(namespace: str, tmp_path: Path, **kw: Any) -> Settings:
    """Settings with short leases and heartbeats, for the reliability tests."""
    kw = {
        "lease_ms": 600,
        "heartbeat_interval_s": 0.1,
        "maintenance_interval_s": 0.05,
        "leader_lease_ms": 1000,
        "retry_base_ms": 0,
        **kw,
    }
    return Settings(
        namespace=namespace,
        data_dir=tmp_path / "data",
        admin_key="test-admin-key",
        _env_file=None,  # type: ignore[call-arg]
        **kw,
    )


@asynccontextmanager
async def own_store(url: str, settings: Settings) -> AsyncIterator[Store]:
    """A store over ``url`` whose namespace is deleted afterwards (as conftest's ``store``)."""
    store = Store.connect(url, settings)
    try:
        yield store
    finally:
        keys = [k async for k in store.redis.scan_iter(match=f"{settings.namespace}*")]
        for i in range(0, len(keys), 500):
            await store.redis.delete(*keys[i : i + 500])
        await store.close()


@asynccontextmanager
async def leader_loops(url: str, settings: Settings) -> AsyncIterator[System]:
    """The leader's maintenance (leases, retries, OFFLINE) running as in an api process."""
    system = System.connect(url, settings)
    leadership = Leadership(system.store, new_instance_id("test"))
    stop = asyncio.Event()
    loops = [
        asyncio.create_task(leadership.run(stop)),
        asyncio.create_task(Maintenance(system, leadership).run(stop)),
    ]
    try:
        yield system
    finally:
        stop.set()
        await asyncio.gather(*loops)
        await system.close()


async def wait_for(check: Callable[[], bool], within_s: float = 10.0, what: str = "") -> None:
    """Poll a condition nothing signals (a process state, a file), bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"still waiting for {what or check}")
        await asyncio.sleep(0.01)
