"""The blocking client against a real API server: every method, every error class."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator

import httpx
import pytest

from gpuflow.client import (
    AsyncClient,
    AuthError,
    Client,
    ConflictError,
    GpuflowError,
    NotFoundError,
    ServerError,
    TransportError,
    ValidationError,
    WaitTimeout,
)
from gpuflow.client import _calls as calls

from .servers import ApiServer
from .test_client_support import Node, closed_port_url


@pytest.fixture
def admin(api_server: ApiServer) -> Iterator[Client]:
    with Client(api_server.url, api_server.admin_key) as client:
        yield client


def test_health_needs_no_key(api_server: ApiServer) -> None:
    with Client(api_server.url, "") as gf:
        health = gf.health()
    assert health["status"] == "UP" and health["redis"] == "UP" and health["version"]


def test_defaults_come_from_the_environment(
    api_server: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUFLOW_API_URL", api_server.url + "/")
    monkeypatch.setenv("GPUFLOW_API_KEY", api_server.admin_key)
    with Client() as gf:
        assert gf.base_url == api_server.url
        assert gf.list_keys() == []


def test_create_then_read_a_task(admin: Client) -> None:
    created = admin.create_task(
        1, {"prompt": "a cat"}, priority=3, user_id="alice", app="studio", env="test",
        max_retries=0, timeout_ms=5000,
    )  # fmt: skip
    assert created["status"] == "QUEUED" and created["displayId"] >= 1
    assert created["estimatedWaitTime"] == -1  # no GPU serves type 1 yet
    task = admin.get_task(created["taskId"])
    assert task["taskId"] == created["taskId"]
    assert (task["taskType"], task["priority"], task["tier"]) == (1, 3, "VIP")
    assert (task["userId"], task["app"], task["env"]) == ("alice", "studio", "test")
    assert (task["maxRetries"], task["timeout"]) == (0, 5000)
    assert task["payload"] == '{"prompt":"a cat"}'  # JSON payloads are stored as JSON text
    progress = admin.get_progress(created["taskId"])
    assert (progress["status"], progress["progress"], progress["queuePosition"]) == ("QUEUED", 0, 1)
    result = admin.get_result(created["taskId"])
    assert (result["status"], result["result"], result["completedAt"]) == ("QUEUED", None, None)


def test_string_payload_is_kept_as_is(admin: Client) -> None:
    created = admin.create_task(2, "just text")
    assert admin.get_task(created["taskId"])["payload"] == "just text"
    assert admin.get_task(admin.create_task(2)["taskId"])["payload"] is None


def test_list_tasks_filters_pages_and_total(admin: Client) -> None:
    ids = [admin.create_task(t, user_id=u)["taskId"] for t, u in ((1, "a"), (2, "b"), (1, "a"))]
    assert [t["taskId"] for t in admin.list_tasks()] == ids[::-1]  # newest first
    items, total = admin.list_tasks_page(task_type=1, size=1)
    assert total == 2 and [t["taskId"] for t in items] == [ids[2]]
    page2 = admin.list_tasks_page(task_type=1, page=2, size=1)
    assert page2.total == 2 and [t["taskId"] for t in page2.items] == [ids[0]]
    assert [t["taskId"] for t in admin.list_tasks(user_id="b")] == [ids[1]]
    assert admin.list_tasks_page(status="QUEUED").total == 3
    assert admin.list_tasks(status="COMPLETED") == []
    assert admin.list_tasks_page(gpu_id="nowhere") == ([], 0)


def test_follow_and_wait_track_a_task_to_its_end(admin: Client) -> None:
    node = Node(admin)
    task_id = admin.create_task(1, {"n": 1})["taskId"]
    seen: list[tuple[str, int, str | None]] = []
    attempt = 0
    for p in admin.follow(task_id, timeout=20, poll_interval=0.01):
        seen.append((p["status"], p["progress"], p["message"]))
        # React to what was observed: each step happens only after the last was seen.
        if p["status"] == "QUEUED":
            attempt = node.claim()[1]
        elif p["progress"] == 0:
            node.progress(task_id, attempt, 50, "half way")
        elif p["progress"] == 50:
            node.complete(task_id, attempt, {"url": "s3://out.mp4"})
    assert seen[:3] == [
        ("QUEUED", 0, None),
        ("PROCESSING", 0, None),
        ("PROCESSING", 50, "half way"),
    ]
    assert len(seen) == 4 and seen[3][:2] == ("COMPLETED", 100), seen
    task = admin.wait(task_id, timeout=5)
    assert task["status"] == "COMPLETED" and task["gpuId"] == node.gpu_id
    result = admin.get_result(task_id)
    assert result["result"] == {"url": "s3://out.mp4"} and result["completedAt"]


def test_wait_returns_failed_tasks_too(admin: Client) -> None:
    node = Node(admin)
    task_id = admin.create_task(1, max_retries=0)["taskId"]
    claimed, attempt = node.claim()
    node.fail(claimed, attempt, "out of memory")
    task = admin.wait(task_id, timeout=5, poll_interval=0.01)
    assert (task["status"], task["errorMessage"]) == ("FAILED", "out of memory")
    assert [p["status"] for p in admin.follow(task_id, timeout=5)] == ["FAILED"]


def test_wait_is_bounded(admin: Client) -> None:
    task_id = admin.create_task(1)["taskId"]
    with pytest.raises(WaitTimeout) as info:
        admin.wait(task_id, timeout=0.05, poll_interval=0.01)
    assert isinstance(info.value, TimeoutError) and "still QUEUED" in info.value.message
    with pytest.raises(TimeoutError):
        list(admin.follow(task_id, timeout=0.05, poll_interval=0.01))
    with pytest.raises(ValueError):
        admin.wait(task_id, poll_interval=0)


def test_gpu_methods(admin: Client) -> None:
    node = Node(admin, "gpu-a", [1, 7])
    assert [g["gpuId"] for g in admin.list_gpus()] == ["gpu-a"]
    gpu = admin.get_gpu("gpu-a")
    assert gpu["status"] == "ACTIVE" and gpu["supportedTaskTypes"] == [1, 7]
    assert (gpu["currentTasks"], gpu["maxConcurrentTasks"]) == (0, 1)
    assert [g["gpuId"] for g in admin.gpus_by_task_type(7)] == ["gpu-a"]
    assert [g["gpuId"] for g in admin.gpus_by_task_type(7, "NORMAL")] == ["gpu-a"]
    assert admin.gpus_by_task_type(8) == []
    assert admin.fault_gpu("gpu-a", "fan broken")
    gpu = admin.get_gpu("gpu-a")
    assert (gpu["status"], gpu["faultReason"]) == ("FAULTY", "fan broken")
    assert admin.recover_gpu("gpu-a")
    assert admin.get_gpu("gpu-a")["status"] == "ACTIVE"
    assert "unregistered" in admin.delete_gpu(node.gpu_id)
    with pytest.raises(NotFoundError):
        admin.get_gpu("gpu-a")


def test_keys_and_a_client_key_sees_only_its_own_tasks(
    admin: Client, api_server: ApiServer
) -> None:
    new = admin.create_key("client", "alice", "alice's laptop")
    assert new["key"] and (new["role"], new["userId"], new["name"]) == (
        "client", "alice", "alice's laptop",
    )  # fmt: skip
    listed = admin.list_keys()
    assert [k["keyId"] for k in listed] == [new["keyId"]] and "key" not in listed[0]
    other = admin.create_task(1, user_id="bob")["taskId"]
    with Client(api_server.url, new["key"]) as alice:
        mine = alice.create_task(1)["taskId"]
        assert alice.get_task(mine)["userId"] == "alice"
        assert [t["taskId"] for t in alice.list_tasks()] == [mine]
        assert alice.list_tasks_page().total == 1
        with pytest.raises(NotFoundError):
            alice.get_task(other)
        with pytest.raises(NotFoundError):
            alice.get_result(other)
        with pytest.raises(AuthError) as info:
            alice.create_task(1, user_id="bob")
        assert info.value.status == 403
        with pytest.raises(AuthError) as info:
            alice.list_gpus()
        assert info.value.status == 403
        with pytest.raises(AuthError):
            alice.create_key("admin")


@pytest.mark.parametrize(
    "call",
    [
        lambda gf: gf.get_task("task_nope"),
        lambda gf: gf.get_progress("task_nope"),
        lambda gf: gf.get_result("task_nope"),
        lambda gf: gf.get_gpu("nope"),
        lambda gf: gf.fault_gpu("nope", "x"),
        lambda gf: gf.recover_gpu("nope"),
        lambda gf: gf.delete_gpu("nope"),
        lambda gf: gf.request("GET", "/api/v2/nothing-here"),
    ],
)
def test_unknown_ids_raise_not_found(admin: Client, call: Callable[[Client], object]) -> None:
    with pytest.raises(NotFoundError) as info:
        call(admin)
    assert info.value.status == 404 and info.value.message


def test_missing_or_unknown_key_raises_auth_error(api_server: ApiServer) -> None:
    for key in ("", "gf_client_unknown"):
        with Client(api_server.url, key) as gf, pytest.raises(AuthError) as info:
            gf.list_tasks()
        assert info.value.status == 401
    with Client(api_server.url, "") as gf, pytest.raises(AuthError, match="missing API key"):
        gf.create_task(1)


def test_bad_input_raises_validation_error(admin: Client) -> None:
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: admin.create_task(-1), "taskType"),
        (lambda: admin.create_task(1, priority=1000), "priority"),
        (lambda: admin.create_task(1, timeout_ms=5), "timeout"),
        (lambda: admin.create_key("client"), "userId"),
        (lambda: admin.create_key("root", "x"), "role"),
        (lambda: admin.list_tasks(status="DONE"), "status"),
        (lambda: admin.list_tasks(size=0), "size"),
        (lambda: admin.gpus_by_task_type(1, "GOLD"), "priority"),
    ]
    for call, field in cases:
        with pytest.raises(ValidationError) as info:
            call()
        assert info.value.status == 400 and field in info.value.message, info.value
    with pytest.raises(ValidationError) as info:
        admin.create_task(1, "x" * 1_100_000)
    assert info.value.status == 413
    assert admin.list_tasks() == []  # nothing half written


def test_a_refused_transition_raises_conflict_error(admin: Client) -> None:
    task_id = admin.create_task(1)["taskId"]
    with pytest.raises(ConflictError, match="not PROCESSING") as info:
        admin.request("POST", f"/api/v2/tasks/{task_id}/result", json={"result": "x"})
    assert info.value.status == 409


def test_empty_ids_are_refused_before_sending(admin: Client) -> None:
    with pytest.raises(ValidationError, match="task_id") as info:
        admin.get_task("")
    assert info.value.status is None


def test_not_an_envelope_raises_gpuflow_error(admin: Client) -> None:
    with pytest.raises(GpuflowError, match="not a gpuflow answer") as info:
        admin.request("GET", "/docs")  # HTML, 200
    assert type(info.value) is GpuflowError and info.value.status == 200


def test_status_classes_for_answers_without_envelope() -> None:
    def decode(status: int, body: bytes) -> None:
        calls.data(httpx.Response(status, content=body, request=httpx.Request("GET", "http://x/")))

    with pytest.raises(ServerError, match="bad gateway") as info:
        decode(502, b"bad gateway")
    assert info.value.status == 502
    with pytest.raises(GpuflowError) as other:
        decode(429, b'{"code":429,"message":"slow down","data":null}')
    assert type(other.value) is GpuflowError and other.value.message == "slow down"
    with pytest.raises(ServerError, match="internal error"):
        decode(500, b'{"code":500,"message":"internal error: KeyError","data":null}')


class CountingTransport(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        return super().handle_request(request)


def test_connection_errors_retry_reads_but_never_a_create() -> None:
    url = closed_port_url()
    transport = CountingTransport()
    with Client(url, "k", retries=2, transport=transport) as gf:
        with pytest.raises(TransportError, match=f"cannot reach gpuflow at {url}") as info:
            gf.get_task("task_x")
        assert info.value.status is None and transport.sent == 3
        with pytest.raises(TransportError):
            gf.create_task(1)
        assert transport.sent == 4  # the POST went once
        with pytest.raises(TransportError):
            gf.fault_gpu("g", "x")
        assert transport.sent == 5


def test_invalid_base_url_is_refused() -> None:
    with pytest.raises(ValidationError, match="http:// or https://"):
        Client("ftp://example.com")


def test_async_client_mirrors_the_sync_one() -> None:
    def public(cls: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(fn)
            for name, fn in vars(cls).items()
            if callable(fn) and not name.startswith("_")
        }

    sync, asyn = public(Client), public(AsyncClient)
    assert set(sync) - {"close"} == set(asyn) - {"aclose"}
    for name, sig in sync.items():
        if name in ("close", "wait", "follow", "run_task"):
            continue
        assert sig.parameters == asyn[name].parameters, name
        assert inspect.iscoroutinefunction(getattr(AsyncClient, name)), name
    # Async callers bound waits with asyncio.timeout() instead of a timeout argument.
    for name in ("wait", "follow", "run_task"):
        expected = [p for p in sync[name].parameters if p != "timeout"]
        assert list(asyn[name].parameters) == expected
