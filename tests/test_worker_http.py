"""The agent through the HTTP worker protocol only, against a real API server."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from gpuflow.api.envelope import envelope, error
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


class Recording(httpx.AsyncBaseTransport):
    """A real HTTP transport that notes each request's path and JSON body."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sent: list[tuple[str, Any]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.sent.append((request.url.path, body))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def beats(self) -> list[tuple[str, Any]]:
        return [(p, b) for p, b in self.sent if "heartbeat" in p]


async def worker_key(api_server: ApiServer) -> str:
    admin = {"X-API-Key": api_server.admin_key}
    async with httpx.AsyncClient(base_url=api_server.url, headers=admin) as c:
        r = await c.post("/api/v2/keys", json={"role": "worker", "name": "beats"})
    return str(r.json()["data"]["key"])


async def test_agent_beats_for_all_its_nodes_in_one_request(
    services: Services, api_server: ApiServer
) -> None:
    """Three nodes, one heartbeat request per interval listing all three; each node is
    renewed."""
    sent = Recording()
    transport = HttpTransport(api_server.url, await worker_key(api_server), transport=sent)
    specs = detect_nodes([14], gpus=3, hostname=f"b{uuid.uuid4().hex[:6]}")
    agent = Agent(worker, transport, specs, heartbeat_interval_s=0.2, claim_wait_s=1.0)
    try:
        async with running(agent):
            before = {s.gpu_id: (await services.gpus.get(s.gpu_id))["lastHeartbeat"] for s in specs}
            await asyncio.sleep(0.7)
            after = {s.gpu_id: (await services.gpus.get(s.gpu_id))["lastHeartbeat"] for s in specs}
    finally:
        await transport.close()
    beats = sent.beats()
    assert len(beats) >= 2
    assert all(path == "/api/v2/gpus/heartbeats" for path, _ in beats)
    for _, body in beats:
        assert sorted(b["gpuId"] for b in body["beats"]) == sorted(s.gpu_id for s in specs)
    assert all(after[g] > before[g] for g in before)


async def test_batch_heartbeat_errors_are_per_node(
    services: Services, api_server: ApiServer
) -> None:
    sent = Recording()
    http = HttpTransport(api_server.url, await worker_key(api_server), transport=sent)
    try:
        node = NodeSpec(f"k{uuid.uuid4().hex[:6]}", [31])
        await http.register(node)
        known, unknown = await asyncio.gather(
            http.heartbeat(node.gpu_id, {}), http.heartbeat("no-such-gpu", {}),
            return_exceptions=True,
        )  # fmt: skip
    finally:
        await http.close()
    assert known == [] and isinstance(unknown, NodeUnknown)
    assert [p for p, _ in sent.beats()] == ["/api/v2/gpus/heartbeats"]


def without_batch_route(app: ASGIApp) -> ASGIApp:
    """The api as it was before ``POST /api/v2/gpus/heartbeats``: FastAPI answered 405 there
    (the path matched ``GET /api/v2/gpus/{gpuId}`` only)."""

    async def older(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/api/v2/gpus/heartbeats":
            await error(405, "Method Not Allowed")(scope, receive, send)
            return
        await app(scope, receive, send)

    return older


async def test_heartbeats_go_one_at_a_time_to_an_api_without_the_batch_route(
    services: Services, redis_url: str, settings: Any
) -> None:
    """An older api (no ``POST /api/v2/gpus/heartbeats``: it answers 405) still gets every
    beat, each on the single endpoint, and is not asked for the batch again."""
    from .servers import start_api

    older = start_api(settings, redis_url, wrap=without_batch_route)
    sent = Recording()
    http = HttpTransport(older.url, await worker_key(older), transport=sent)
    try:
        nodes = [NodeSpec(f"o{i}{uuid.uuid4().hex[:6]}", [31]) for i in range(2)]
        for node in nodes:
            await http.register(node)
        for _ in range(2):
            answers = await asyncio.gather(*(http.heartbeat(n.gpu_id, {}) for n in nodes))
            assert answers == [[], []]
    finally:
        await http.close()
        older.stop()
    paths = [p for p, _ in sent.beats()]
    singles = [f"/api/v2/gpus/{n.gpu_id}/heartbeat" for n in nodes]
    assert paths == ["/api/v2/gpus/heartbeats", *singles, *singles]


def answering_batches_with(data: list[Any]) -> Callable[[ASGIApp], ASGIApp]:
    """An api whose batch heartbeat route answers ``data`` (a broken or foreign server)."""

    def wrap(app: ASGIApp) -> ASGIApp:
        async def odd(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"] == "/api/v2/gpus/heartbeats":
                await envelope(data)(scope, receive, send)
                return
            await app(scope, receive, send)

        return odd

    return wrap


@pytest.mark.parametrize(
    ("data", "first", "second"),
    [
        (["not an answer", {"code": 200, "stop": ["t1"]}], TransportError, ["t1"]),
        ([{"code": 200, "stop": []}], TransportError, TransportError),  # one answer for two
        ([{"code": 409, "message": "?"}, {"code": 403, "message": "no"}], StaleAttempt,
         TransportRejected),
    ],
)  # fmt: skip
async def test_odd_batch_answers_fail_only_what_they_cannot_answer(
    services: Services, redis_url: str, settings: Any, data: list[Any], first: Any, second: Any
) -> None:
    from .servers import start_api

    odd = start_api(settings, redis_url, wrap=answering_batches_with(data))
    http = HttpTransport(odd.url, await worker_key(odd))
    try:
        got = await asyncio.gather(
            http.heartbeat("g1", {}), http.heartbeat("g2", {}), return_exceptions=True
        )
    finally:
        await http.close()
        odd.stop()
    for answer, want in zip(got, (first, second), strict=True):
        if isinstance(want, list):
            assert answer == want
        else:
            assert isinstance(answer, want), answer
