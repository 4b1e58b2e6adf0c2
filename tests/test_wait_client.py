"""The clients' ``wait`` (long-poll) and ``follow`` (server-sent events), against a real API,
and their fallback to polling against a server that has neither (a MockTransport)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from gpuflow.client import AsyncClient, Client, GpuflowError, NotFoundError, WaitTimeout
from gpuflow.client._calls import EventReader
from gpuflow.config import Settings

from .servers import ApiServer
from .test_client_support import Node


class Recorder(httpx.HTTPTransport):
    """A real transport that remembers every request's path and query."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request.url.raw_path.decode())
        return super().handle_request(request)


class AsyncRecorder(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request.url.raw_path.decode())
        return await super().handle_async_request(request)


@pytest.fixture
def admin(api_server: ApiServer) -> Iterator[Client]:
    with Client(api_server.url, api_server.admin_key) as client:
        yield client


@pytest.fixture
def subscribed(redis_url: str, settings: Settings) -> Iterator[Callable[[str], None]]:
    """Blocks until the API has subscribed to a task's channel (bounded)."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)

    def wait_for(task_id: str) -> None:
        channel = f"{settings.namespace}ev:{task_id}"
        for _ in range(2000):
            if r.pubsub_numsub(channel)[0][1] >= 1:
                return
            time.sleep(0.005)
        raise AssertionError(f"nobody subscribed to {channel}")

    yield wait_for
    r.close()


def in_thread(fn: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_wait_long_polls_and_returns_at_completion(
    api_server: ApiServer, admin: Client, subscribed: Callable[[str], None]
) -> None:
    node = Node(admin)
    admin.create_task(1)
    task_id, attempt = node.claim()
    finished: list[float] = []

    def finish_once_waited_for() -> None:
        subscribed(task_id)
        node.progress(task_id, attempt, 50)
        finished.append(time.monotonic())
        node.complete(task_id, attempt, "ok")

    recorder = Recorder()
    worker = in_thread(finish_once_waited_for)
    with Client(api_server.url, api_server.admin_key, transport=recorder) as gf:
        task = gf.wait(task_id, timeout=20, poll_interval=5)
    returned = time.monotonic()
    worker.join(10)
    assert task["status"] == "COMPLETED"
    assert returned - finished[0] < 2  # pushed: well under the 5 s poll interval
    (only,) = recorder.seen  # one long-poll of (nearly) the whole timeout
    assert only.startswith(f"/api/v2/tasks/{task_id}?wait=19.9") or only.endswith("=20.000")


def test_wait_timeout_is_a_bounded_long_poll(api_server: ApiServer) -> None:
    recorder = Recorder()
    with Client(api_server.url, api_server.admin_key, transport=recorder) as gf:
        task_id = gf.create_task(1)["taskId"]
        started = time.monotonic()
        with pytest.raises(WaitTimeout, match=r"still QUEUED after 0\.2 s"):
            gf.wait(task_id, timeout=0.2)
        assert 0.2 <= time.monotonic() - started < 5
        (only,) = recorder.seen[1:]
        assert only.startswith(f"/api/v2/tasks/{task_id}?wait=0.")
        assert gf.get_result(task_id, wait=0.05)["status"] == "QUEUED"


def test_follow_reads_the_event_stream(
    api_server: ApiServer, admin: Client, subscribed: Callable[[str], None]
) -> None:
    node = Node(admin)
    task_id = admin.create_task(1)["taskId"]

    def run() -> None:
        subscribed(task_id)
        claimed, attempt = node.claim()
        for pct in (30, 60):
            node.progress(claimed, attempt, pct, f"at {pct}")
        node.complete(claimed, attempt, "done")

    recorder = Recorder()
    worker = in_thread(run)
    with Client(api_server.url, api_server.admin_key, transport=recorder) as gf:
        seen = [(p["status"], p["progress"]) for p in gf.follow(task_id, timeout=20)]
    worker.join(10)
    # The node may start before the stream's first read, and quick changes may coalesce
    # (each event is the state when read); never out of order, and the end is certain.
    assert seen[0][0] in ("QUEUED", "PROCESSING") and seen[-1] == ("COMPLETED", 100)
    assert seen == sorted(seen, key=lambda s: (s[0] != "QUEUED", s[0] == "COMPLETED", s[1]))
    (only,) = recorder.seen  # one stream, no polling
    assert only.startswith(f"/api/v2/tasks/{task_id}/events?wait=")


def test_follow_of_an_unknown_task_raises_not_found(admin: Client) -> None:
    with pytest.raises(NotFoundError):
        list(admin.follow("task_nope", timeout=5))


async def test_async_wait_and_follow_use_push(
    api_server: ApiServer, admin: Client, subscribed: Callable[[str], None]
) -> None:
    node = Node(admin)
    task_id = admin.create_task(1)["taskId"]
    claimed, attempt = node.claim()

    def finish() -> None:
        subscribed(claimed)
        node.complete(claimed, attempt, {"n": 1})

    recorder = AsyncRecorder()
    async with AsyncClient(api_server.url, api_server.admin_key, transport=recorder) as gf:
        worker = in_thread(finish)
        async with asyncio.timeout(20):
            task = await gf.wait(task_id, poll_interval=5)
        worker.join(10)
        assert task["status"] == "COMPLETED"
        async with asyncio.timeout(5):
            seen = [p["status"] async for p in gf.follow(task_id)]
        assert seen == ["COMPLETED"]
        result = await gf.get_result(task_id, wait=1)
    assert result["result"] == {"n": 1}
    assert recorder.seen[0] == f"/api/v2/tasks/{task_id}?wait=30.000"
    assert recorder.seen[1] == f"/api/v2/tasks/{task_id}/events?wait=3600.000"


class OldServer:
    """A server without long-poll and events: ignores `wait`, 404 on /events."""

    def __init__(self) -> None:
        self.statuses = iter(["QUEUED", "PROCESSING", "PROCESSING", "COMPLETED"])
        self.requests: list[str] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.requests.append(path)
        if path.endswith("/events"):
            return httpx.Response(404, json={"code": 404, "message": "Not Found", "data": None})
        status = next(self.statuses)
        data: dict[str, Any] = {"taskId": "t", "status": status, "message": None}
        data["progress"] = 100 if status == "COMPLETED" else 0
        return httpx.Response(200, json={"code": 200, "message": "success", "data": data})


def test_wait_and_follow_fall_back_to_polling_an_old_server() -> None:
    old = OldServer()
    with Client("http://old", "k", transport=httpx.MockTransport(old.handle)) as gf:
        assert gf.wait("t", timeout=10, poll_interval=0.01)["status"] == "COMPLETED"
    assert old.requests == ["/api/v2/tasks/t"] * 4
    old = OldServer()
    with Client("http://old", "k", transport=httpx.MockTransport(old.handle)) as gf:
        seen = [p["status"] for p in gf.follow("t", timeout=10, poll_interval=0.01)]
    assert seen == ["QUEUED", "PROCESSING", "COMPLETED"]
    assert old.requests == ["/api/v2/tasks/t/events"] + ["/api/v2/tasks/t/progress"] * 4


async def test_async_follow_falls_back_to_polling_an_old_server() -> None:
    old = OldServer()
    transport = httpx.MockTransport(old.handle)
    async with AsyncClient("http://old", "k", transport=transport) as gf, asyncio.timeout(10):
        seen = [p["status"] async for p in gf.follow("t", poll_interval=0.01)]
    assert seen == ["QUEUED", "PROCESSING", "COMPLETED"]


def test_event_reader() -> None:
    reader = EventReader()
    lines = [
        ": keep-alive", "", "id: 1", "event: progress", 'data: {"status": "QUEUED",',
        'data: "progress": 0}', "", "id: 2", "event:end", 'data:{"status":"FAILED"}', "",
    ]  # fmt: skip
    events = [e for e in map(reader.feed, lines) if e is not None]
    assert events == [{"status": "QUEUED", "progress": 0}, {"status": "FAILED"}]
    with pytest.raises(GpuflowError, match="task t not found"):
        for line in ["event: error", "data: " + json.dumps({"message": "task t not found"}), ""]:
            reader.feed(line)
    with pytest.raises(GpuflowError, match="bad event"):
        for line in ["data: {", ""]:
            reader.feed(line)


def test_run_task_creates_and_awaits_in_one_request(api_server: ApiServer, admin: Client) -> None:
    node = Node(admin)

    def run_once_queued() -> None:
        task_id, attempt = node.claim(wait=10)  # watched since before it was created
        node.complete(task_id, attempt, {"ok": True})

    recorder = Recorder()
    worker = in_thread(run_once_queued)
    with Client(api_server.url, api_server.admin_key, transport=recorder) as gf:
        task = gf.run_task(1, {"n": 1}, timeout=20)
    worker.join(10)
    assert task["status"] == "COMPLETED" and json.loads(task["result"] or "") == {"ok": True}
    (only,) = recorder.seen
    assert only.startswith("/api/v2/tasks?wait=")


def test_run_task_timeout_leaves_the_task_queued(api_server: ApiServer, admin: Client) -> None:
    with Client(api_server.url, api_server.admin_key) as gf:
        started = time.monotonic()
        with pytest.raises(WaitTimeout, match=r"still QUEUED"):
            gf.run_task(1, timeout=0.3)
        assert 0.3 <= time.monotonic() - started < 5
    (queued,) = admin.list_tasks(status="QUEUED")
    assert queued["taskType"] == 1


async def test_async_run_task_returns_a_failed_task(api_server: ApiServer, admin: Client) -> None:
    """The async client: a failed task ends the call too, with its error."""
    node = Node(admin)
    recorder = AsyncRecorder()

    def run_late() -> None:
        task_id, attempt = node.claim(wait=10)
        node.fail(task_id, attempt, "bad input")

    worker = in_thread(run_late)
    async with AsyncClient(api_server.url, api_server.admin_key, transport=recorder) as gf:
        async with asyncio.timeout(20):
            task = await gf.run_task(1)
    worker.join(10)
    assert task["status"] == "FAILED" and task["errorMessage"] == "bad input"
    assert recorder.seen[0].startswith("/api/v2/tasks?wait=30.000")
