"""Bad input gets a 4xx envelope naming the problem, and writes nothing."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from gpuflow.store import Store

from .servers import ApiServer

BIG = "x" * 1_100_000
GPU = {"gpuId": "g1", "supportedTaskTypes": [1], "maxConcurrentTasks": 1}

# (method, path, body or raw bytes, expected status, words the message must contain)
CASES: list[tuple[str, str, Any, int, str]] = [
    ("POST", "/api/v2/tasks", {}, 400, "taskType"),
    ("POST", "/api/v2/tasks", {"taskType": "1"}, 400, "taskType"),
    ("POST", "/api/v2/tasks", {"taskType": 1.5}, 400, "taskType"),
    ("POST", "/api/v2/tasks", {"taskType": True}, 400, "taskType"),
    ("POST", "/api/v2/tasks", {"taskType": -1}, 400, "taskType"),
    ("POST", "/api/v2/tasks", {"taskType": 1, "priority": "high"}, 400, "priority"),
    ("POST", "/api/v2/tasks", {"taskType": 1, "maxRetries": -1}, 400, "maxRetries"),
    ("POST", "/api/v2/tasks", {"taskType": 1, "userId": 7}, 400, "userId"),
    ("POST", "/api/v2/tasks", {"taskType": 1, "payload": BIG}, 413, "payload"),
    ("POST", "/api/v2/tasks", b'{"taskType": 1', 400, "JSON"),
    ("POST", "/api/v2/tasks", [1, 2], 400, "object"),
    ("POST", "/api/v2/tasks/task_nope/status", {"status": "FAILED"}, 404, "not found"),
    ("POST", "/api/v2/tasks/task_nope/status", {"status": "DONE"}, 400, "status"),
    ("POST", "/api/v2/tasks/task_nope/status", {}, 400, "status"),
    ("POST", "/api/v2/tasks/task_nope/result", {"result": "r"}, 404, "not found"),
    ("POST", "/api/v2/tasks/task_nope/result", {}, 400, "result"),
    ("POST", "/api/v2/tasks/task_nope/progress", {"progress": 5}, 404, "not found"),
    ("POST", "/api/v2/tasks/task_nope/progress", {"progress": 101}, 400, "progress"),
    ("POST", "/api/v2/tasks/task_nope/progress", {"progress": "5"}, 400, "progress"),
    ("POST", "/api/v2/gpus/register", {}, 400, "gpuId"),
    ("POST", "/api/v2/gpus/register", {**GPU, "supportedTaskTypes": []}, 400, "supportedTask"),
    ("POST", "/api/v2/gpus/register", {**GPU, "supportedTaskTypes": ["a"]}, 400, "supported"),
    ("POST", "/api/v2/gpus/register", {**GPU, "gpuId": "a b"}, 400, "gpuId"),
    ("POST", "/api/v2/gpus/register", {**GPU, "supportedTaskPriority": "GOLD"}, 400, "Priority"),
    ("POST", "/api/v2/gpus/register", {**GPU, "maxConcurrentTasks": 0}, 400, "maxConcurrent"),
    ("POST", "/api/v2/gpus/register", {**GPU, "port": 70000}, 400, "port"),
    ("POST", "/api/v2/gpus/nope/heartbeat", None, 404, "not registered"),
    ("POST", "/api/v2/gpus/keep/heartbeat", {"running": "x"}, 400, "running"),
    ("POST", "/api/v2/gpus/keep/heartbeat", {"running": [{"taskId": "t"}]}, 400, "attempt"),
    ("POST", "/api/v2/gpus/heartbeats", {"beats": []}, 400, "beats"),
    ("POST", "/api/v2/gpus/heartbeats", {"beats": [{"gpuId": ""}]}, 400, "gpuId"),
    (
        "POST",
        "/api/v2/gpus/heartbeats",
        {"beats": [{"gpuId": "keep", "running": "x"}]},
        400,
        "running",
    ),
    ("POST", "/api/v2/gpus/heartbeats", None, 400, "body"),
    ("POST", "/api/v2/tasks/task_nope/cancel", None, 404, "not found"),
    ("POST", "/api/v2/gpus/nope/fault?reason=x", None, 404, "not registered"),
    ("POST", "/api/v2/gpus/nope/recover", None, 404, "not registered"),
    ("DELETE", "/api/v2/gpus/nope", None, 404, "not registered"),
    ("POST", "/api/v2/gpus/nope/claim?wait=0", None, 404, "not registered"),
    ("POST", "/api/v2/gpus/nope/claim?wait=-1", None, 400, "wait"),
    ("GET", "/api/v2/gpus/by-task-type/abc", None, 400, "taskType"),
    ("GET", "/api/v2/gpus/by-task-type/1?priority=GOLD", None, 400, "priority"),
    ("GET", "/api/v2/tasks?status=NOPE", None, 400, "status"),
    ("GET", "/api/v2/tasks?page=0", None, 400, "page"),
    ("GET", "/api/v2/tasks?size=100000", None, 400, "size"),
    ("GET", "/api/v2/tasks/task_nope", None, 404, "not found"),
    ("GET", "/api/v2/tasks/task_nope/result", None, 404, "not found"),
    ("GET", "/api/v2/tasks/task_nope/result?wait=1", None, 404, "not found"),
    ("GET", "/api/v2/tasks/task_nope?wait=1", None, 404, "not found"),
    ("GET", "/api/v2/tasks/task_nope/progress", None, 404, "not found"),
    ("GET", "/api/v2/tasks/task_nope/events", None, 404, "not found"),
    ("POST", "/api/v2/keys", {"role": "root"}, 400, "role"),
    ("PUT", "/api/v2/task-types/3", {"timeout": 5}, 400, "timeout"),
    ("PUT", "/api/v2/task-types/3", {"exclusive": "yes"}, 400, "exclusive"),
    ("PUT", "/api/v2/task-types/-1", {}, 400, "taskType"),
    ("POST", "/api/v2/monitoring/alerts/alert_nope/acknowledge", None, 404, "not found"),
    ("POST", "/api/v1/monitoring/lock/release?gpuId=nope", None, 404, "not registered"),
    ("POST", "/api/v1/monitoring/lock/release", None, 400, "gpuId"),
]


async def snapshot(store: Store) -> dict[str, Any]:
    """Every key of the test's namespace with its content."""
    r = store.redis
    out: dict[str, Any] = {}
    async for key in r.scan_iter(match=f"{store.settings.namespace}*", count=1000):
        kind = await r.type(key)
        if kind == "hash":
            out[key] = await r.hgetall(key)
        elif kind == "zset":
            out[key] = await r.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            out[key] = sorted(await r.smembers(key))
        elif kind == "stream":
            out[key] = await r.xrange(key)
        else:
            out[key] = await r.get(key)
    return out


@pytest.mark.parametrize(("method", "path", "body", "status", "words"), CASES)
async def test_bad_input_is_refused_and_writes_nothing(
    api_server: ApiServer,
    store: Store,
    method: str,
    path: str,
    body: Any,
    status: int,
    words: str,
) -> None:
    headers = {"X-API-Key": api_server.admin_key}
    async with httpx.AsyncClient(base_url=api_server.url, headers=headers) as c:
        # Something to leave untouched: a GPU and a queued task.
        await c.post("/api/v2/gpus/register", json={**GPU, "gpuId": "keep"})
        await c.post("/api/v2/tasks", json={"taskType": 9})
        before = await snapshot(store)
        if isinstance(body, bytes):
            r = await c.request(
                method, path, content=body, headers={"Content-Type": "application/json"}
            )
        else:
            r = await c.request(method, path, json=body)
        after = await snapshot(store)
    assert r.status_code == status, r.text
    envelope = r.json()
    assert envelope["code"] == status and envelope["data"] is None
    assert words.lower() in envelope["message"].lower(), envelope["message"]
    assert after == before


async def test_every_write_endpoint_has_a_bad_input_case(api_server: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=api_server.url) as c:
        spec = (await c.get("/openapi.json")).json()
    writes = {
        (m.upper(), p)
        for p, item in spec["paths"].items()
        for m in item
        if m in ("post", "put", "patch", "delete")
    }

    def pattern(path: str) -> str:
        return re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(path))

    covered = {
        (m, p)
        for m, p in writes
        if any(cm == m and re.fullmatch(pattern(p), cp.split("?")[0]) for cm, cp, *_ in CASES)
    }
    assert covered == writes
