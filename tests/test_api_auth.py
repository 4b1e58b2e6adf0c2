"""Access control, checked on every route the OpenAPI document lists (not a hand-made list)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .servers import ApiServer

PUBLIC = {("GET", "/health")}
# Routes each role may call; everything else must answer 403 for that role.
ALLOWED: dict[str, set[tuple[str, str]]] = {
    "viewer": {
        ("GET", "/api/v2/tasks"),
        ("GET", "/api/v2/tasks/{taskId}"),
        ("GET", "/api/v2/tasks/{taskId}/progress"),
        ("GET", "/api/v2/tasks/{taskId}/result"),
        ("GET", "/api/v2/tasks/{taskId}/events"),
        ("GET", "/api/v2/gpus"),
        ("GET", "/api/v2/gpus/{gpuId}"),
        ("GET", "/api/v2/gpus/by-task-type/{taskType}"),
        ("GET", "/api/v2/task-types"),
        ("GET", "/api/v2/task-types/{taskType}"),
        ("GET", "/api/v2/monitoring/alerts"),
        ("GET", "/api/v2/monitoring/alerts/stats"),
        ("GET", "/api/v1/monitoring/gpu-lock/status"),
        ("GET", "/api/v2/cluster/status"),
        ("GET", "/api/v2/cluster/instances"),
    },
    "client": {
        ("POST", "/api/v2/tasks"),
        ("POST", "/api/v2/tasks/{taskId}/cancel"),
        ("GET", "/api/v2/tasks"),
        ("GET", "/api/v2/tasks/{taskId}"),
        ("GET", "/api/v2/tasks/{taskId}/progress"),
        ("GET", "/api/v2/tasks/{taskId}/result"),
        ("GET", "/api/v2/tasks/{taskId}/events"),
        ("GET", "/api/v2/task-types"),
        ("GET", "/api/v2/task-types/{taskType}"),
    },
}
WORKER_WRITES = {
    ("POST", "/api/v2/gpus/register"),
    ("POST", "/api/v2/gpus/{gpuId}/heartbeat"),
    ("POST", "/api/v2/gpus/heartbeats"),
    ("POST", "/api/v2/gpus/{gpuId}/claim"),
    ("POST", "/api/v2/gpus/{gpuId}/fault"),
    ("POST", "/api/v2/tasks/{taskId}/status"),
    ("POST", "/api/v2/tasks/{taskId}/result"),
    ("POST", "/api/v2/tasks/{taskId}/progress"),
}
ALLOWED["worker"] = (ALLOWED["viewer"] | WORKER_WRITES) - set()


def operations(server: ApiServer) -> Iterator[tuple[str, str]]:
    spec: dict[str, Any] = httpx.get(f"{server.url}/openapi.json").json()
    for path, item in spec["paths"].items():
        for method in item:
            yield method.upper(), path


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: "1" if m.group(1) == "taskType" else "x1", path)


def call(server: ApiServer, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.request(method, server.url + concrete(path), headers=headers, json={}, timeout=10)


def make_key(server: ApiServer, role: str, user: str | None = None) -> str:
    body = {"role": role, "userId": user}
    r = httpx.post(f"{server.url}/api/v2/keys", json=body, headers={"X-API-Key": server.admin_key})
    assert r.status_code == 200, r.text
    key: str = r.json()["data"]["key"]
    return key


def test_openapi_lists_the_seed_surface(api_server: ApiServer) -> None:
    ops = set(operations(api_server))
    assert len(ops) >= 20
    assert ("POST", "/api/v2/gpus/{gpuId}/claim") in ops
    assert ("DELETE", "/api/v2/gpus/{gpuId}") in ops


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-API-Key": "nope"}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic x"}],
)
def test_every_protected_route_needs_a_key(api_server: ApiServer, headers: dict[str, str]) -> None:
    checked = 0
    ops = list(operations(api_server))
    for method, path in ops:
        if (method, path) in PUBLIC:
            continue
        r = call(api_server, method, path, headers)
        assert r.status_code == 401, (method, path, r.text)
        assert r.json() == {"code": 401, "message": r.json()["message"], "data": None}
        checked += 1
    assert checked == len(ops) - len(PUBLIC) >= 19


@pytest.mark.parametrize("role", ["viewer", "client", "worker"])
def test_roles_are_enforced_on_every_route(api_server: ApiServer, role: str) -> None:
    key = make_key(api_server, role, "alice" if role == "client" else None)
    for method, path in operations(api_server):
        if (method, path) in PUBLIC:
            continue
        r = call(api_server, method, path, {"X-API-Key": key})
        if (method, path) in ALLOWED[role]:
            assert r.status_code not in (401, 403), (role, method, path, r.text)
        else:
            assert r.status_code == 403, (role, method, path, r.text)
            assert r.json()["code"] == 403


def test_bearer_and_header_both_work(api_server: ApiServer) -> None:
    for headers in ({"X-API-Key": api_server.admin_key},
                    {"Authorization": f"Bearer {api_server.admin_key}"}):  # fmt: skip
        r = httpx.get(f"{api_server.url}/api/v2/tasks", headers=headers)
        assert r.status_code == 200


def test_client_sees_and_creates_only_its_own_tasks(api_server: ApiServer) -> None:
    url = api_server.url
    alice = {"X-API-Key": make_key(api_server, "client", "alice")}
    bob = {"X-API-Key": make_key(api_server, "client", "bob")}
    r = httpx.post(f"{url}/api/v2/tasks", json={"taskType": 1, "payload": "a"}, headers=alice)
    task_id = r.json()["data"]["taskId"]
    assert httpx.get(f"{url}/api/v2/tasks/{task_id}", headers=alice).json()["data"]["userId"] == (
        "alice"
    )
    for suffix in ("", "/progress", "/result"):
        r = httpx.get(f"{url}/api/v2/tasks/{task_id}{suffix}", headers=bob)
        assert r.status_code == 404, suffix
    r = httpx.post(f"{url}/api/v2/tasks", json={"taskType": 1, "userId": "alice"}, headers=bob)
    assert r.status_code == 403
    assert httpx.get(f"{url}/api/v2/tasks", headers=bob).json()["data"] == []
    r = httpx.get(f"{url}/api/v2/tasks", params={"userId": "alice"}, headers=bob)
    assert r.status_code == 403
    listed = httpx.get(f"{url}/api/v2/tasks", headers=alice).json()["data"]
    assert [t["taskId"] for t in listed] == [task_id]


def test_client_key_needs_a_user(api_server: ApiServer) -> None:
    r = httpx.post(
        f"{api_server.url}/api/v2/keys",
        json={"role": "client"},
        headers={"X-API-Key": api_server.admin_key},
    )
    assert r.status_code == 400
    assert "userId" in r.json()["message"]


def test_keys_are_stored_hashed(api_server: ApiServer) -> None:
    key = make_key(api_server, "viewer")
    listed = httpx.get(
        f"{api_server.url}/api/v2/keys", headers={"X-API-Key": api_server.admin_key}
    ).json()["data"]
    assert listed and all(k.get("key") is None for k in listed)
    assert key not in str(listed)
