"""The asyncio client against a real API server (the sync client drives the fake node)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator

import pytest

from gpuflow.client import (
    AsyncClient,
    AuthError,
    Client,
    ConflictError,
    GpuflowError,
    NotFoundError,
    TransportError,
    ValidationError,
)

from .servers import ApiServer
from .test_client_support import Node, closed_port_url


@pytest.fixture(params=["httpx", "aiohttp"])
async def gf(api_server: ApiServer, request: pytest.FixtureRequest) -> AsyncIterator[AsyncClient]:
    """Every test runs over httpx's own transport and over aiohttp (transport="aiohttp")."""
    transport = "aiohttp" if request.param == "aiohttp" else None
    async with AsyncClient(api_server.url, api_server.admin_key, transport=transport) as client:
        yield client


@pytest.fixture
def node(api_server: ApiServer) -> Iterator[Node]:
    with Client(api_server.url, api_server.admin_key) as admin:
        yield Node(admin)


async def test_tasks_from_create_to_result(gf: AsyncClient, node: Node) -> None:
    assert (await gf.health())["status"] == "UP"
    created = await gf.create_task(1, {"k": "v"}, priority=2, user_id="u1", app="a")
    task_id = created["taskId"]
    assert (await gf.get_task(task_id))["tier"] == "VIP"
    assert [t["taskId"] for t in await gf.list_tasks(user_id="u1")] == [task_id]
    assert (await gf.list_tasks_page(task_type=1)).total == 1
    seen: list[tuple[str, int]] = []
    attempt = 0
    async with asyncio.timeout(20):
        async for p in gf.follow(task_id, poll_interval=0.01):
            seen.append((p["status"], p["progress"]))
            if p["status"] == "QUEUED":
                attempt = node.claim()[1]
            elif p["progress"] == 0:
                node.progress(task_id, attempt, 40)
            elif p["progress"] == 40:
                node.complete(task_id, attempt, "done")
    assert seen == [("QUEUED", 0), ("PROCESSING", 0), ("PROCESSING", 40), ("COMPLETED", 100)]
    async with asyncio.timeout(5):
        assert (await gf.wait(task_id, poll_interval=0.01))["status"] == "COMPLETED"
    assert (await gf.get_progress(task_id))["progress"] == 100
    assert (await gf.get_result(task_id))["result"] == "done"


async def test_wait_is_bounded_by_asyncio_timeout(gf: AsyncClient) -> None:
    task_id = (await gf.create_task(1))["taskId"]
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await gf.wait(task_id, poll_interval=0.01)


async def test_gpus_and_keys(gf: AsyncClient, node: Node) -> None:
    assert [g["gpuId"] for g in await gf.list_gpus()] == [node.gpu_id]
    assert [g["gpuId"] for g in await gf.gpus_by_task_type(1, "VIP")] == [node.gpu_id]
    assert "FAULTY" in await gf.fault_gpu(node.gpu_id, "hot")
    assert (await gf.get_gpu(node.gpu_id))["faultReason"] == "hot"
    assert "recovered" in await gf.recover_gpu(node.gpu_id)
    assert "unregistered" in await gf.delete_gpu(node.gpu_id)
    key = await gf.create_key("viewer", name="dash")
    assert [k["keyId"] for k in await gf.list_keys()] == [key["keyId"]]


async def test_errors_map_to_the_same_classes(gf: AsyncClient, api_server: ApiServer) -> None:
    with pytest.raises(NotFoundError):
        await gf.get_task("task_nope")
    with pytest.raises(NotFoundError):
        await gf.delete_gpu("nope")
    with pytest.raises(ValidationError):
        await gf.create_task(-1)
    task_id = (await gf.create_task(1))["taskId"]
    with pytest.raises(ConflictError):
        await gf.request("POST", f"/api/v2/tasks/{task_id}/progress", json={"progress": 5})
    async with AsyncClient(api_server.url, "wrong") as stranger:
        with pytest.raises(AuthError):
            await stranger.list_tasks()
    for transport in (None, "aiohttp"):
        async with AsyncClient(closed_port_url(), "k", retries=1, transport=transport) as nowhere:
            with pytest.raises(TransportError, match="cannot reach gpuflow"):
                await nowhere.health()


def test_the_aiohttp_transport_needs_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "httpx_aiohttp", None)  # as if not installed
    with pytest.raises(ImportError, match=r"gpuflow\[aiohttp\]"):
        AsyncClient("http://127.0.0.1:1", "k", transport="aiohttp")


class ForwardProxy:
    """An HTTP proxy on 127.0.0.1 that notes each request line and answers a health body
    of its own, so a test can tell whether a call went through it."""

    BODY = b'{"code":200,"message":"success","data":{"status":"UP","version":"via proxy"}}'

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.lines.append(head.split(b"\r\n", 1)[0].decode())
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(self.BODY), self.BODY)
        )
        await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.mark.parametrize("transport", [None, "aiohttp"])
async def test_the_environments_proxy_is_used_as_httpx_uses_it(
    api_server: ApiServer, monkeypatch: pytest.MonkeyPatch, transport: str | None
) -> None:
    """HTTP_PROXY sends calls through the proxy and NO_PROXY exempts hosts, on both
    transports (the aiohttp one reads the environment once, not per request)."""
    proxy = ForwardProxy()
    for name in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", await proxy.start())
    try:
        async with AsyncClient(api_server.url, api_server.admin_key, transport=transport) as gf:
            assert (await gf.health())["version"] == "via proxy"
            assert (await gf.health())["version"] == "via proxy"
        assert proxy.lines == [f"GET {api_server.url}/health HTTP/1.1"] * 2
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        async with AsyncClient(api_server.url, api_server.admin_key, transport=transport) as gf:
            assert (await gf.health())["version"] != "via proxy"
        assert len(proxy.lines) == 2
    finally:
        await proxy.close()


async def test_an_answer_that_is_no_envelope_names_its_url(
    gf: AsyncClient, api_server: ApiServer
) -> None:
    """The aiohttp path builds the request of an answer only when a message needs it."""
    with pytest.raises(GpuflowError, match="not a gpuflow answer") as info:
        await gf.request("GET", "/docs", params={"x": "1"})  # HTML, 200
    assert f"from {api_server.url}/docs?x=1" in str(info.value)
    assert type(info.value) is GpuflowError and info.value.status == 200
