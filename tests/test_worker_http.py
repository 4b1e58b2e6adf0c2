"""The agent through the HTTP worker protocol only, against a real API server."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gpuflow.worker import (
    Agent,
    ClaimedTask,
    NodeSpec,
    NodeUnknown,
    StaleAttempt,
    TaskContext,
    TransportError,
    TransportRejected,
    Worker,
    detect_nodes,
)
from gpuflow.worker.http_transport import HttpTransport

from . import test_worker_handlers as handlers
from .conftest import Services
from .servers import ApiServer
from .test_worker_support import create, events_of, running, wait_pid, wait_status


async def handler_21(payload: Any, ctx: TaskContext) -> str:
    ctx.progress(40, "over http")
    await asyncio.sleep(0)
    return f"async got {payload['n']}"


worker = Worker({**handlers.worker.handlers, 21: handler_21}, ref=None)


@pytest.fixture
async def http(api_server: ApiServer) -> AsyncIterator[HttpTransport]:
    admin = {"X-API-Key": api_server.admin_key}
    async with httpx.AsyncClient(base_url=api_server.url, headers=admin) as c:
        r = await c.post("/api/v2/keys", json={"role": "worker", "name": "test-node"})
        key = r.json()["data"]["key"]
    t = HttpTransport(api_server.url, key)
    try:
        yield t
    finally:
        await t.close()


def http_agent(transport: HttpTransport, types: list[int], slots: int = 1) -> Agent:
    host = f"http{uuid.uuid4().hex[:6]}"
    specs = detect_nodes(types, gpus=1, max_concurrent_tasks=slots, hostname=host)
    return Agent(worker, transport, specs, heartbeat_interval_s=0.5, claim_wait_s=1.0)


async def test_agent_over_http(services: Services, http: HttpTransport) -> None:
    s = services
    async with running(http_agent(http, [14, 15, 21], slots=2)) as agent:
        described = await create(s.tasks, 14, '{"k": "v"}')
        raw = await create(s.tasks, 14, "not json")
        fatal = await create(s.tasks, 15, '{"mode": "fatal"}')
        flaky = await create(s.tasks, 15, '{"mode": "flaky", "ok_from": 2}')
        in_loop = await create(s.tasks, 21, '{"n": 7}')
        done = await wait_status(s.store, [described, raw, fatal, flaky, in_loop])
        gpu_id = agent.specs[0].gpu_id
        gpu = await s.gpus.get(gpu_id)
    assert json.loads(done[described]["result"])["payload"] == {"k": "v"}
    assert done[raw]["result"] == "raw:not json"
    assert (done[fatal]["status"], done[fatal]["errorMessage"]) == ("FAILED", "bad input, no retry")
    assert (done[flaky]["result"], done[flaky]["retryCount"]) == ("ok on attempt 2", "1")
    assert done[in_loop]["result"] == "async got 7"
    assert any(e["event"] == "progress" for e in await events_of(s.store, in_loop))
    assert gpu["status"] == "ACTIVE" and gpu["metadata"]["gpuModel"] == "simulated"
    assert gpu["maxConcurrentTasks"] == 2


async def test_stop_over_http_releases_the_task(services: Services, http: HttpTransport) -> None:
    s = services
    agent = http_agent(http, [13])
    await agent.start()
    task = await create(s.tasks, 13, '{"seconds": 30}')
    pid = await wait_pid(s.store, task)
    await agent.stop(grace_s=0.2)
    view = await s.tasks.get(task)
    assert (view["status"], view["retryCount"]) == ("QUEUED", 0)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_http_errors_map_to_transport_errors(
    services: Services, http: HttpTransport, api_server: ApiServer
) -> None:
    with pytest.raises(NodeUnknown):
        await http.heartbeat("no-such-gpu", {})
    with pytest.raises(NodeUnknown):
        await http.claim("no-such-gpu", 0)
    node = NodeSpec(f"e{uuid.uuid4().hex[:6]}", [31])
    await http.register(node)
    task_id = await create(services.tasks, 31, "x")
    (claimed,) = await http.claim(node.gpu_id, 1.0)
    assert (claimed.task_id, claimed.attempt, claimed.payload) == (task_id, 1, "x")
    # The heartbeat lists what the node runs; an attempt the server moved on from is to stop.
    assert await http.heartbeat(node.gpu_id, {task_id: 1}) == []
    assert await http.heartbeat(node.gpu_id, {task_id: 7}) == [task_id]
    stale = ClaimedTask(task_id, 31, 7, node.gpu_id, "x")
    with pytest.raises(StaleAttempt):
        await http.progress(stale, 10, None)
    with pytest.raises(StaleAttempt):
        await http.complete(stale, "late")
    await http.complete(claimed, "on time")
    with pytest.raises(StaleAttempt):
        await http.complete(claimed, "twice")
    bad_key = HttpTransport(api_server.url, "wrong-key")
    try:
        with pytest.raises(TransportRejected):
            await bad_key.heartbeat(node.gpu_id, {})
    finally:
        await bad_key.close()
    nowhere = HttpTransport("http://127.0.0.1:9", "k", timeout_s=2)
    try:
        with pytest.raises(TransportError):
            await nowhere.heartbeat(node.gpu_id, {})
    finally:
        await nowhere.close()
    assert (await services.tasks.get(task_id))["result"] == "on time"
