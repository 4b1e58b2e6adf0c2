"""The fast paths (heartbeat, batch heartbeat, create) answer exactly what the FastAPI
routes answer, and hand every case they do not take to those routes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from gpuflow.config import Settings
from gpuflow.core.gpus import Gpus
from gpuflow.core.models import GpuStatus
from gpuflow.store import Store

from .servers import ApiServer, start_api


@pytest.fixture
def route_server(redis_url: str, settings: Settings, api_server: ApiServer) -> Iterator[ApiServer]:
    """A second API over the same namespace with the fast path off: the reference."""
    server = start_api(settings, redis_url, fast_paths=False)
    try:
        yield server
    finally:
        server.stop()


GPU = {
    "supportedTaskTypes": [7],
    "supportedTaskPriority": "NORMAL",
    "maxConcurrentTasks": 2,
}


async def _setup(c: httpx.AsyncClient, admin_key: str) -> dict[str, str]:
    """Register a GPU with a running task; keys of each role."""
    admin = {"X-API-Key": admin_key}
    keys = {}
    for role in ("worker", "client", "viewer"):
        body: dict[str, Any] = {"role": role, **({"userId": "u1"} if role == "client" else {})}
        r = await c.post("/api/v2/keys", json=body, headers=admin)
        keys[role] = r.json()["data"]["key"]
    worker = {"X-API-Key": keys["worker"]}
    r = await c.post("/api/v2/gpus/register", json={"gpuId": "fp-gpu", **GPU}, headers=worker)
    assert r.status_code == 200
    await c.post("/api/v2/tasks", json={"taskType": 7}, headers=admin)
    claimed = await c.post("/api/v2/gpus/fp-gpu/claim", params={"wait": 0}, headers=worker)
    keys["task"] = claimed.json()["data"][0]["taskId"]
    return keys


def _cases(keys: dict[str, str]) -> list[tuple[str, bool, dict[str, Any]]]:
    """(name, whether the fast path answers it, request arguments)."""
    worker = {"X-API-Key": keys["worker"]}
    task = keys["task"]
    json_h = {**worker, "Content-Type": "application/json"}
    return [
        ("no body", True, {"headers": worker}),
        ("empty list", True, {"headers": worker, "json": {"running": []}}),
        ("listed task", True, {"headers": worker, "json": {"running": [
            {"taskId": task, "attempt": 1}]}}),
        ("unknown task", True, {"headers": worker, "json": {"running": [
            {"taskId": task, "attempt": 1}, {"taskId": "task_gone", "attempt": 3}]}}),
        ("bearer", True, {"headers": {"Authorization": f"Bearer {keys['worker']}"}}),
        ("json charset", True, {"headers": {**worker, "Content-Type":
            "application/json; charset=utf-8"}, "content": b'{"running": []}'}),
        ("unknown gpu", True, {"headers": worker, "path": "/api/v2/gpus/nope/heartbeat"}),
        ("no key", False, {}),
        ("unknown key", False, {"headers": {"X-API-Key": "gf_worker_nope"}}),
        ("first of two keys", False, {"headers": [("X-API-Key", "gf_worker_nope"),
            ("X-API-Key", keys["worker"])]}),
        ("client key", False, {"headers": {"X-API-Key": keys["client"]}}),
        ("viewer key", False, {"headers": {"X-API-Key": keys["viewer"]}}),
        ("wrong type", False, {"headers": worker, "json": {"running": [
            {"taskId": 5, "attempt": 1}]}}),
        ("attempt 0", False, {"headers": worker, "json": {"running": [
            {"taskId": task, "attempt": 0}]}}),
        ("not an object", False, {"headers": worker, "json": [1, 2]}),
        ("malformed", False, {"headers": json_h, "content": b'{"running": ['}),
        ("text body", False, {"headers": {**worker, "Content-Type": "text/plain"},
            "content": b'{"running": []}'}),
        ("query", False, {"headers": worker, "params": {"x": "1"}}),
    ]  # fmt: skip


async def _send(c: httpx.AsyncClient, args: dict[str, Any]) -> tuple[int, Any]:
    args = dict(args)
    path = args.pop("path", "/api/v2/gpus/fp-gpu/heartbeat")
    r = await c.post(path, **args)
    return r.status_code, r.json()


Send = Callable[[httpx.AsyncClient, dict[str, Any]], Awaitable[tuple[int, Any]]]


async def _compare(
    fast: httpx.AsyncClient,
    route: httpx.AsyncClient,
    state: Any,
    counter: str,
    cases: list[tuple[str, bool, dict[str, Any]]],
    send: Send,
) -> None:
    """Each case answers the same on both servers; the fast path took exactly the cases
    marked taken (its ``state.<counter>`` grew by one for each)."""
    for name, taken, args in cases:
        before = getattr(state, counter, 0)
        got = await send(fast, args)
        hits = getattr(state, counter, 0) - before
        want = await send(route, args)
        assert got == want, name
        assert hits == (1 if taken else 0), name


async def test_fast_path_answers_as_the_route(
    api_server: ApiServer, route_server: ApiServer
) -> None:
    async with (
        httpx.AsyncClient(base_url=api_server.url, timeout=30) as fast,
        httpx.AsyncClient(base_url=route_server.url, timeout=30) as route,
    ):
        keys = await _setup(fast, api_server.admin_key)
        state = api_server.app.state
        await _compare(fast, route, state, "fast_heartbeats", _cases(keys), _send)
        # Spot checks that the answers compared above are the right ones.
        case = {name: args for name, _, args in _cases(keys)}
        status, body = await _send(fast, case["unknown task"])
        assert (status, body["data"]) == (200, {"status": "ACTIVE", "stop": ["task_gone"]})
        status, body = await _send(fast, {"headers": {"X-API-Key": keys["client"]}})
        assert status == 403 and body["code"] == 403
        status, body = await _send(fast, case["wrong type"])
        assert status == 400 and "taskId" in body["message"]
    assert getattr(route_server.app.state, "fast_heartbeats", 0) == 0


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
async def test_fast_path_renews_the_listed_lease(
    api_server: ApiServer, store: Store, batch: bool
) -> None:
    """The fast path's writes are the route's, and a batch's are its beats' alone: the
    listed task's lease moves forward and an OFFLINE node comes back ACTIVE."""
    async with httpx.AsyncClient(base_url=api_server.url, timeout=30) as c:
        keys = await _setup(c, api_server.admin_key)
        worker = {"X-API-Key": keys["worker"]}
        await Gpus(store).set_status("fp-gpu", GpuStatus.OFFLINE, "missed heartbeats")
        lease = await store.redis.zscore(store.keys.leases, keys["task"])
        await asyncio.sleep(0.05)
        beat = {"running": [{"taskId": keys["task"], "attempt": 1}]}
        if batch:
            body = {"beats": [{"gpuId": "fp-gpu", **beat}]}
            r = await c.post("/api/v2/gpus/heartbeats", json=body, headers=worker)
            answer = r.json()["data"][0]
        else:
            r = await c.post("/api/v2/gpus/fp-gpu/heartbeat", json=beat, headers=worker)
            answer = r.json()["data"]
        assert (answer["status"], answer["stop"]) == ("ACTIVE", [])
        assert api_server.app.state.fast_heartbeats == 1
        assert await store.redis.zscore(store.keys.leases, keys["task"]) > lease
        assert await store.redis.hget(store.keys.gpu("fp-gpu"), "status") == "ACTIVE"


def _batch_cases(keys: dict[str, str]) -> list[tuple[str, bool, dict[str, Any]]]:
    """(name, whether the fast path answers it, request arguments) for the batch endpoint."""
    worker = {"X-API-Key": keys["worker"]}
    task = {"taskId": keys["task"], "attempt": 1}
    gone = {"taskId": "task_gone", "attempt": 2}
    mixed = {
        "beats": [
            {"gpuId": "fp-gpu", "running": [task, gone]},
            {"gpuId": "nope"},
            {"gpuId": "fp-gpu"},
        ]
    }
    return [
        ("mixed", True, {"headers": worker, "json": mixed}),
        ("one", True, {"headers": worker, "json": {"beats": [{"gpuId": "fp-gpu",
            "running": [task]}]}}),
        ("bearer", True, {"headers": {"Authorization": f"Bearer {keys['worker']}"},
            "json": mixed}),
        ("no key", False, {"json": mixed}),
        ("client key", False, {"headers": {"X-API-Key": keys["client"]}, "json": mixed}),
        ("no beats", False, {"headers": worker, "json": {"beats": []}}),
        ("too many", False, {"headers": worker, "json": {"beats": [{"gpuId": "fp-gpu"}] * 257}}),
        ("no gpuId", False, {"headers": worker, "json": {"beats": [{"running": []}]}}),
        ("gpuId a number", False, {"headers": worker, "json": {"beats": [{"gpuId": 3}]}}),
        ("not an object", False, {"headers": worker, "json": [{"gpuId": "fp-gpu"}]}),
        ("no body", False, {"headers": worker}),
        ("query", False, {"headers": worker, "json": mixed, "params": {"x": "1"}}),
    ]  # fmt: skip


async def _send_batch(c: httpx.AsyncClient, args: dict[str, Any]) -> tuple[int, Any]:
    r = await c.post("/api/v2/gpus/heartbeats", **args)
    return r.status_code, r.json()


async def test_batch_heartbeat_answers_as_the_route(
    api_server: ApiServer, route_server: ApiServer, store: Store
) -> None:
    """Each beat gets the single endpoint's answer, in order; a refused request (bad body,
    key, role) answers as a whole and renews nothing."""
    async with (
        httpx.AsyncClient(base_url=api_server.url, timeout=30) as fast,
        httpx.AsyncClient(base_url=route_server.url, timeout=30) as route,
    ):
        keys = await _setup(fast, api_server.admin_key)
        cases = _batch_cases(keys)
        await _compare(fast, route, api_server.app.state, "fast_heartbeats", cases, _send_batch)
        case = {name: args for name, _, args in cases}
        status, body = await _send_batch(fast, case["mixed"])
        assert status == 200
        assert body["data"] == [
            {"gpuId": "fp-gpu", "code": 200, "message": "heartbeat updated", "status": "ACTIVE",
             "stop": ["task_gone"]},
            {"gpuId": "nope", "code": 404, "message": "GPU nope not registered", "stop": []},
            {"gpuId": "fp-gpu", "code": 200, "message": "heartbeat updated", "status": "ACTIVE",
             "stop": []},
        ]  # fmt: skip
        await Gpus(store).set_status("fp-gpu", GpuStatus.OFFLINE, "missed heartbeats")
        for refused in ("too many", "no gpuId", "gpuId a number", "client key"):
            status, body = await _send_batch(fast, case[refused])
            assert status in (400, 403) and body["data"] is None, refused
        assert await store.redis.hget(store.keys.gpu("fp-gpu"), "status") == "OFFLINE"
        status, body = await _send_batch(fast, case["too many"])
        assert "beats" in body["message"]
    assert getattr(route_server.app.state, "fast_heartbeats", 0) == 0


VOLATILE = ("taskId", "displayId", "estimatedWaitTime", "createdAt", "updatedAt")


def _create_cases(keys: dict[str, str], admin_key: str) -> list[tuple[str, bool, dict[str, Any]]]:
    """(name, whether the create fast path answers it, request arguments)."""
    admin = {"X-API-Key": admin_key}
    client = {"X-API-Key": keys["client"]}
    body = {"taskType": 8, "payload": {"in": "a.jpg"}, "priority": 3, "maxRetries": 1}
    return [
        ("admin", True, {"headers": admin, "json": body}),
        ("bearer", True, {"headers": {"Authorization": f"Bearer {admin_key}"}, "json": body}),
        ("client, own user", True, {"headers": client, "json": {"taskType": 8}}),
        ("client, named own user", True, {"headers": client, "json": {"taskType": 8,
            "userId": "u1"}}),
        ("client, other user", True, {"headers": client, "json": {"taskType": 8,
            "userId": "u2"}}),
        ("wait 0", True, {"headers": admin, "json": body, "params": {"wait": "0"}}),
        ("wait runs out", True, {"headers": admin, "json": body, "params": {"wait": "0.1"}}),
        ("wait too long", False, {"headers": admin, "json": body, "params": {"wait": "61"}}),
        ("wait not a number", False, {"headers": admin, "json": body, "params": {"wait": "x"}}),
        ("other query", False, {"headers": admin, "json": body, "params": {"x": "1"}}),
        ("idempotency key", False, {"headers": {**admin, "Idempotency-Key": "fp-1"},
            "json": body}),
        ("no key", False, {"json": body}),
        ("unknown key", False, {"headers": {"X-API-Key": "gf_admin_nope"}, "json": body}),
        ("worker key", False, {"headers": {"X-API-Key": keys["worker"]}, "json": body}),
        ("viewer key", False, {"headers": {"X-API-Key": keys["viewer"]}, "json": body}),
        ("no body", False, {"headers": admin}),
        ("bad type", False, {"headers": admin, "json": {"taskType": -1}}),
        ("unknown field, ignored", True, {"headers": admin, "json": {"taskType": 8, "colour": 1}}),
        ("malformed", False, {"headers": {**admin, "Content-Type": "application/json"},
            "content": b'{"taskType": '}),
        ("text body", False, {"headers": {**admin, "Content-Type": "text/plain"},
            "content": b'{"taskType": 8}'}),
    ]  # fmt: skip


async def _create(c: httpx.AsyncClient, args: dict[str, Any]) -> tuple[int, Any]:
    """The answer with the values that differ between any two creates masked."""
    r = await c.post("/api/v2/tasks", **args)
    body = r.json()
    if isinstance(body.get("data"), dict):
        body["data"] = {k: "*" if k in VOLATILE else v for k, v in body["data"].items()}
    return r.status_code, body


async def test_create_fast_path_answers_as_the_route(
    api_server: ApiServer, route_server: ApiServer, store: Store
) -> None:
    async with (
        httpx.AsyncClient(base_url=api_server.url, timeout=30) as fast,
        httpx.AsyncClient(base_url=route_server.url, timeout=30) as route,
    ):
        keys = await _setup(fast, api_server.admin_key)
        cases = _create_cases(keys, api_server.admin_key)
        await _compare(fast, route, api_server.app.state, "fast_creates", cases, _create)
        case = {name: args for name, _, args in _create_cases(keys, api_server.admin_key)}
        r = await fast.post("/api/v2/tasks", **case["admin"])
        created = r.json()["data"]
        assert r.status_code == 200 and created["status"] == "QUEUED"
        stored = await store.redis.hgetall(store.keys.task(created["taskId"]))
        assert (stored["payload"], stored["priority"], stored["tier"]) == (
            '{"in":"a.jpg"}',
            "3",
            "VIP",
        )
        r = await fast.post("/api/v2/tasks", **case["client, own user"])
        stored = await store.redis.hgetall(store.keys.task(r.json()["data"]["taskId"]))
        assert stored["userId"] == "u1"
        status, body = await _create(fast, case["client, other user"])
        assert status == 403 and "u2" in body["message"]
        status, body = await _create(fast, case["wait runs out"])
        assert status == 200 and body["data"]["status"] == "QUEUED" and "payload" in body["data"]
    assert getattr(route_server.app.state, "fast_creates", 0) == 0


async def test_fast_paths_answer_503_as_the_routes_while_redis_is_down(settings: Settings) -> None:
    """With Redis unreachable during the key lookup, both fast paths answer what the routes
    answer: 503 in the envelope, with Retry-After."""
    from .test_client_support import closed_port_url

    nowhere = closed_port_url().replace("http://", "redis://")
    fast = start_api(settings, nowhere)
    route = start_api(settings, nowhere, fast_paths=False)
    headers = {"X-API-Key": "gf_worker_unknown-to-any-cache"}

    async def ask(server: ApiServer, path: str, body: Any) -> tuple[int, int, str | None]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            r = await c.post(path, json=body, headers=headers)
        return r.status_code, r.json()["code"], r.headers.get("Retry-After")

    try:
        calls = [("/api/v2/gpus/g1/heartbeat", None), ("/api/v2/tasks", {"taskType": 1})]
        got = await asyncio.gather(
            *(ask(server, path, body) for server in (fast, route) for path, body in calls)
        )
        assert got == [(503, 503, "1")] * 4
        assert getattr(fast.app.state, "fast_heartbeats", 0) == 0
        assert getattr(fast.app.state, "fast_creates", 0) == 0
    finally:
        fast.stop()
        route.stop()
