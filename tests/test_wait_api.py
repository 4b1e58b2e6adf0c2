"""Awaiting a task without polling: the long-poll (`wait`) on a task and its result, and the
server-sent-events stream, driven through the HTTP worker protocol. No sleeps: each step
waits for the server to have subscribed (PUBSUB NUMSUB) or for an event to arrive."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gpuflow.store import Store

from .servers import ApiServer

pytestmark = pytest.mark.asyncio


class Api:
    """The admin's view of the API plus a GPU node speaking the HTTP worker protocol."""

    def __init__(self, http: httpx.AsyncClient, store: Store) -> None:
        self.http = http
        self.store = store
        self.gpu = "gpu-wait-1"

    async def data(self, method: str, path: str, **kw: Any) -> Any:
        r = await self.http.request(method, path, **kw)
        assert r.status_code == 200, r.text
        return r.json()["data"]

    async def register(self) -> None:
        body = {"gpuId": self.gpu, "supportedTaskTypes": [1], "maxConcurrentTasks": 1}
        await self.data("POST", "/api/v2/gpus/register", json=body)

    async def create(self, **fields: Any) -> str:
        body = {"taskType": 1, **fields}
        task: dict[str, Any] = await self.data("POST", "/api/v2/tasks", json=body)
        return str(task["taskId"])

    async def claim(self) -> int:
        claimed = await self.data("POST", f"/api/v2/gpus/{self.gpu}/claim", params={"wait": 1})
        assert len(claimed) == 1, claimed
        return int(claimed[0]["attempt"])

    async def progress(self, task_id: str, attempt: int, pct: int) -> None:
        body = {"progress": pct, "attempt": attempt, "message": f"{pct} done"}
        await self.data("POST", f"/api/v2/tasks/{task_id}/progress", json=body)

    async def complete(self, task_id: str, attempt: int, result: Any) -> None:
        body = {"result": result, "attempt": attempt}
        await self.data("POST", f"/api/v2/tasks/{task_id}/result", json=body)

    async def subscribed(self, task_id: str, count: int = 1) -> None:
        """Until the API has subscribed to the task's channel (bounded)."""
        channel = f"{self.store.settings.namespace}ev:{task_id}"
        for _ in range(1000):
            ((_, n),) = await self.store.redis.pubsub_numsub(channel)
            if n >= count:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"nobody subscribed to {channel}")

    async def numsub(self, task_id: str) -> int:
        channel = f"{self.store.settings.namespace}ev:{task_id}"
        ((_, n),) = await self.store.redis.pubsub_numsub(channel)
        return int(n)


@pytest.fixture
async def api(api_server: ApiServer, store: Store) -> AsyncIterator[Api]:
    headers = {"X-API-Key": api_server.admin_key}
    async with httpx.AsyncClient(base_url=api_server.url, headers=headers, timeout=30) as http:
        yield Api(http, store)


async def test_long_poll_result_returns_right_after_completion(api: Api) -> None:
    await api.register()
    task_id = await api.create()
    attempt = await api.claim()
    started = time.monotonic()
    poll = asyncio.create_task(api.data("GET", f"/api/v2/tasks/{task_id}/result?wait=30"))
    await api.subscribed(task_id)
    assert not poll.done()
    await api.progress(task_id, attempt, 50)  # progress does not end the long-poll
    assert not poll.done()
    done = time.monotonic()
    await api.complete(task_id, attempt, {"url": "s3://x"})
    result = await asyncio.wait_for(poll, 5)
    answered = time.monotonic()
    assert result["status"] == "COMPLETED" and result["result"] == {"url": "s3://x"}
    assert answered - done < 1.0 and answered - started < 10


async def test_long_poll_task_returns_on_failure_and_cancel(api: Api) -> None:
    task_id = await api.create()
    poll = asyncio.create_task(api.data("GET", f"/api/v2/tasks/{task_id}?wait=30"))
    await api.subscribed(task_id)
    await api.data("POST", f"/api/v2/tasks/{task_id}/cancel")
    task = await asyncio.wait_for(poll, 5)
    assert task["status"] == "CANCELED" and task["taskId"] == task_id


async def test_long_poll_answers_the_current_state_after_wait(api: Api) -> None:
    task_id = await api.create()
    started = time.monotonic()
    task = await api.data("GET", f"/api/v2/tasks/{task_id}", params={"wait": 0.2})
    took = time.monotonic() - started
    assert task["status"] == "QUEUED" and 0.2 <= took < 5
    result = await api.data("GET", f"/api/v2/tasks/{task_id}/result", params={"wait": 0.1})
    assert result["status"] == "QUEUED" and result["result"] is None
    started = time.monotonic()
    assert (await api.data("GET", f"/api/v2/tasks/{task_id}?wait=0"))["status"] == "QUEUED"
    assert time.monotonic() - started < 2


async def test_long_poll_of_a_finished_task_answers_at_once(api: Api) -> None:
    task_id = await api.create()
    await api.data("POST", f"/api/v2/tasks/{task_id}/cancel")
    started = time.monotonic()
    task = await api.data("GET", f"/api/v2/tasks/{task_id}", params={"wait": 60})
    assert task["status"] == "CANCELED" and time.monotonic() - started < 2


@pytest.mark.parametrize("wait", ["-1", "61", "soon"])
async def test_long_poll_bad_wait_is_a_400(api: Api, wait: str) -> None:
    task_id = await api.create()
    r = await api.http.get(f"/api/v2/tasks/{task_id}/result", params={"wait": wait})
    assert r.status_code == 400 and "wait" in r.json()["message"]


def parse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":")
        )
        if "data" in fields:
            events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


async def next_event(lines: AsyncIterator[str]) -> tuple[str, dict[str, Any]]:
    fields: dict[str, str] = {}
    async for line in lines:
        if not line:
            if "data" in fields:
                return fields.get("event", "message"), json.loads(fields["data"])
            continue
        if not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value
    raise AssertionError("stream ended")


async def test_events_stream_progress_then_end_and_close(api: Api) -> None:
    await api.register()
    task_id = await api.create()
    seen: list[tuple[str, str, int]] = []
    async with api.http.stream("GET", f"/api/v2/tasks/{task_id}/events") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        lines = r.aiter_lines()
        attempt = 0
        while not seen or seen[-1][0] != "end":
            kind, data = await asyncio.wait_for(next_event(lines), 10)
            assert data["taskId"] == task_id
            seen.append((kind, data["status"], data["progress"]))
            # React to what was observed: each step happens only after the last was seen.
            if data["status"] == "QUEUED":
                attempt = await api.claim()
            elif data["progress"] == 0:
                await api.progress(task_id, attempt, 50)
            elif data["progress"] == 50:
                await api.complete(task_id, attempt, "ok")
        rest = [line async for line in lines if line and not line.startswith(":")]
    assert seen == [
        ("progress", "QUEUED", 0),
        ("progress", "PROCESSING", 0),
        ("progress", "PROCESSING", 50),
        ("end", "COMPLETED", 100),
    ]
    assert rest == []  # the server closed the stream after `end`


async def test_late_subscriber_gets_one_final_event(api: Api) -> None:
    task_id = await api.create()
    await api.data("POST", f"/api/v2/tasks/{task_id}/cancel")
    started = time.monotonic()
    r = await api.http.get(f"/api/v2/tasks/{task_id}/events")
    assert r.status_code == 200 and time.monotonic() - started < 2
    events = parse_events(r.text)
    assert [(k, d["status"]) for k, d in events] == [("end", "CANCELED")]
    assert r.text.startswith("id: 1\nevent: end\ndata: {")


async def test_events_wait_bounds_the_stream(api: Api) -> None:
    task_id = await api.create()
    r = await api.http.get(f"/api/v2/tasks/{task_id}/events", params={"wait": 0})
    assert [(k, d["status"]) for k, d in parse_events(r.text)] == [("progress", "QUEUED")]
    started = time.monotonic()
    r = await api.http.get(f"/api/v2/tasks/{task_id}/events", params={"wait": 0.2})
    assert len(parse_events(r.text)) == 1 and 0.2 <= time.monotonic() - started < 5


async def test_a_closed_stream_unsubscribes(api: Api, api_server: ApiServer) -> None:
    task_id = await api.create()
    notifier = api_server.server.config.app.state.notifier  # type: ignore[attr-defined]
    async with api.http.stream("GET", f"/api/v2/tasks/{task_id}/events") as r:
        lines = r.aiter_lines()  # keep it: a collected iterator closes the connection
        await asyncio.wait_for(next_event(lines), 5)
        await api.subscribed(task_id)
        assert notifier.watchers == 1
    for _ in range(1000):  # the server notices the disconnect
        if notifier.watchers == 0:
            break
        await asyncio.sleep(0.005)
    assert notifier.watchers == 0


@pytest.mark.parametrize(
    "path", ["/api/v2/tasks/task_nope?wait=5", "/api/v2/tasks/task_nope/result?wait=5",
             "/api/v2/tasks/task_nope/events"],
)  # fmt: skip
async def test_unknown_task_is_404_and_no_key_is_401(api: Api, path: str) -> None:
    r = await api.http.get(path)
    assert r.status_code == 404 and r.json()["message"] == "task task_nope not found"
    r = await api.http.get(path, headers={"X-API-Key": ""})
    assert r.status_code == 401 and r.json()["code"] == 401


async def test_a_client_key_awaits_only_its_own_tasks(api: Api) -> None:
    key = await api.data("POST", "/api/v2/keys", json={"role": "client", "userId": "bob"})
    theirs = await api.create(userId="alice")
    own = await api.create(userId="bob")
    bob = {"X-API-Key": key["key"]}
    for path in (f"/{theirs}?wait=5", f"/{theirs}/result?wait=5", f"/{theirs}/events"):
        r = await api.http.get("/api/v2/tasks" + path, headers=bob)
        assert r.status_code == 404, path
    r = await api.http.get(f"/api/v2/tasks/{own}/events", params={"wait": 0}, headers=bob)
    assert r.status_code == 200 and parse_events(r.text)[0][1]["status"] == "QUEUED"


async def test_openapi_documents_wait_and_the_event_stream(api: Api) -> None:
    doc = (await api.http.get("/openapi.json")).json()
    events = doc["paths"]["/api/v2/tasks/{taskId}/events"]["get"]
    assert "text/event-stream" in events["responses"]["200"]["content"]
    assert "late subscriber" in events["description"]
    for path in ("/api/v2/tasks/{taskId}", "/api/v2/tasks/{taskId}/result"):
        params = {p["name"]: p for p in doc["paths"][path]["get"]["parameters"]}
        assert params["wait"]["schema"]["maximum"] == 60


async def test_create_and_wait_answers_when_the_task_ends(api: Api) -> None:
    """POST ?wait= creates the task and answers with its detail once it is final."""
    await api.register()
    post = asyncio.create_task(
        api.http.post("/api/v2/tasks", params={"wait": 20}, json={"taskType": 1, "payload": "x"})
    )
    claimed = await api.data("POST", f"/api/v2/gpus/{api.gpu}/claim", params={"wait": 10})
    task_id, attempt = claimed[0]["taskId"], claimed[0]["attempt"]
    # Watched since before it existed, through the api's own pattern: no SUBSCRIBE of its own.
    assert await api.numsub(task_id) == 0
    assert not post.done()
    await api.complete(task_id, attempt, {"frames": 3})
    r = await asyncio.wait_for(post, 10)
    assert r.status_code == 200
    task = r.json()["data"]
    assert (task["taskId"], task["status"]) == (task_id, "COMPLETED")
    assert json.loads(task["result"]) == {"frames": 3}
    assert task["payload"] == "x" and task["gpuId"] == api.gpu  # the detail, not TaskCreated


async def test_create_and_wait_runs_out_with_the_current_state(api: Api) -> None:
    """No GPU serves the type: after `wait` the answer is the queued task, which stays."""
    started = time.monotonic()
    task = await api.data("POST", "/api/v2/tasks", params={"wait": 0.3}, json={"taskType": 1})
    assert 0.3 <= time.monotonic() - started < 5
    assert task["status"] == "QUEUED" and task["taskType"] == 1 and "createdAt" in task
    assert (await api.data("GET", f"/api/v2/tasks/{task['taskId']}"))["status"] == "QUEUED"


async def test_create_and_wait_of_an_idempotent_repeat_awaits_the_first_task(api: Api) -> None:
    headers = {"Idempotency-Key": "order-77"}
    body = {"taskType": 1, "payload": "same"}
    first = await api.data("POST", "/api/v2/tasks", json=body, headers=headers)
    again = await api.data(
        "POST", "/api/v2/tasks", params={"wait": 0.2}, json=body, headers=headers
    )
    assert again["taskId"] == first["taskId"] and again["status"] == "QUEUED"
    assert again["payload"] == "same"
    _, total = await _count(api)
    assert total == 1


async def test_create_and_wait_refuses_bad_wait_and_creates_nothing(api: Api) -> None:
    for wait in ("61", "-1", "soon"):
        r = await api.http.post("/api/v2/tasks", params={"wait": wait}, json={"taskType": 1})
        assert r.status_code == 400 and "wait" in r.json()["message"], r.text
    _, total = await _count(api)
    assert total == 0


async def _count(api: Api) -> tuple[list[Any], int]:
    r = await api.http.get("/api/v2/tasks")
    return r.json()["data"], int(r.headers["X-Total-Count"])
