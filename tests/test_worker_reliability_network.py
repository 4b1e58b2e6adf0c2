"""Workers outlive their connections: a Redis restart (AOF), connections that die without a
word (a proxy that stops forwarding), and an API restart under an HTTP-only worker."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import uvicorn

from gpuflow.api.app import create_app
from gpuflow.config import Settings
from gpuflow.core.gpus import Gpus
from gpuflow.core.tasks import Tasks
from gpuflow.store import Store
from gpuflow.store.embedded import EmbeddedRedis
from gpuflow.worker import Agent, NodeSpec, Transport, detect_nodes
from gpuflow.worker.http_transport import HttpTransport
from gpuflow.worker.redis_transport import RedisTransport

from . import test_worker_handlers as support
from .servers import ApiServer
from .test_worker_support import (
    create,
    fast_settings,
    own_store,
    running,
    wait_for,
    wait_pid,
    wait_status,
)


def nodes(types: list[int], slots: int = 1) -> list[NodeSpec]:
    host = f"n{uuid.uuid4().hex[:6]}"
    return detect_nodes(types, gpus=1, max_concurrent_tasks=slots, hostname=host)


def agent(transport: Transport, specs: list[NodeSpec], claim_wait_s: float = 1.0) -> Agent:
    return Agent(
        support.worker,
        transport,
        specs,
        heartbeat_interval_s=0.1,
        claim_wait_s=claim_wait_s,
        stop_grace_s=0.3,
    )


@asynccontextmanager
async def redis_transport(url: str, settings: Settings, **kw: float) -> AsyncIterator[Transport]:
    transport = RedisTransport.connect(url, settings, **kw)
    try:
        yield transport
    finally:
        await transport.close()


async def test_worker_survives_a_redis_restart(namespace: str, tmp_path: Path) -> None:
    """Redis stops (SIGTERM) and starts again on the same data dir while a task runs: the task
    finishes while Redis is down, its report lands once Redis is back, and the worker goes on
    taking new tasks by itself."""
    server = EmbeddedRedis(tmp_path / "redis")
    url = await asyncio.to_thread(server.start)
    settings = fast_settings(namespace, tmp_path)
    marks = tmp_path / "marks"
    marks.mkdir()
    try:
        async with (
            own_store(url, settings) as store,
            redis_transport(url, settings, op_timeout_s=2.0) as transport,
            running(agent(transport, nodes([14, 18], slots=2))),
        ):
            tasks = Tasks(store, Gpus(store))
            before = await create(tasks, 14, "before")
            await wait_status(store, [before])
            across = await create(tasks, 18, json.dumps({"dir": str(marks)}))
            await wait_pid(store, across)
            await asyncio.to_thread(server.stop)
            (marks / "gate").touch()
            await wait_for(lambda: (marks / "finished").exists(), what="the handler's end")
            assert await asyncio.to_thread(server.start) == url
            after = await create(tasks, 14, "after")
            done = await wait_status(store, [across, after])
    finally:
        await asyncio.to_thread(server.stop)
    assert (done[across]["status"], done[across]["result"]) == ("COMPLETED", "through on attempt 1")
    assert done[across]["retryCount"] == "0"
    assert done[after]["result"] == "raw:after"


@dataclass(eq=False)
class Link:
    """One proxied connection: both sockets and the two pumps between them."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    pumps: list[asyncio.Task[None]] = field(default_factory=list)


class FreezingProxy:
    """A TCP proxy to a Redis whose :meth:`freeze` stops forwarding on every open connection
    while keeping it open: to the client each one looks alive and never answers again, as
    after a failover or a cut network. New connections are forwarded as before."""

    def __init__(self, url: str) -> None:
        self.parts = urlsplit(url)
        self.links: list[Link] = []
        self.frozen: list[Link] = []
        self.accepted = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        netloc = f":{self.parts.password}@127.0.0.1:{port}"
        return urlunsplit(self.parts._replace(netloc=netloc))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        host, port = self.parts.hostname or "127.0.0.1", self.parts.port or 6379
        up_reader, up_writer = await asyncio.open_connection(host, port)
        link = Link(writer, up_writer)
        link.pumps = [
            asyncio.create_task(self._pump(reader, up_writer, writer)),
            asyncio.create_task(self._pump(up_reader, writer, up_writer)),
        ]
        self.links.append(link)

    @staticmethod
    async def _pump(
        src: asyncio.StreamReader, dst: asyncio.StreamWriter, src_writer: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except ConnectionError:
            pass
        dst.close()  # EOF on one side: close the other (not on freeze: cancelled before)
        src_writer.close()

    def freeze(self) -> int:
        for link in self.links:
            for pump in link.pumps:
                pump.cancel()
        self.frozen += self.links
        self.links = []
        return len(self.frozen)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in self.links + self.frozen:
            for pump in link.pumps:
                pump.cancel()
            await asyncio.gather(*link.pumps, return_exceptions=True)
            for w in (link.client, link.upstream):
                w.close()
                with suppress(ConnectionError):
                    await w.wait_closed()
        if self._server is not None:
            await self._server.wait_closed()


@asynccontextmanager
async def frozen_later(redis_url: str) -> AsyncIterator[tuple[FreezingProxy, str]]:
    """A FreezingProxy to ``redis_url`` and the URL through it; closed at the end (its
    counters stay readable)."""
    proxy = FreezingProxy(redis_url)
    try:
        yield proxy, await proxy.start()
    finally:
        await proxy.close()


async def wait_blocked_read(store: Store) -> None:
    """Until a claim waits in Redis: the agent's BLPOP of its inbox (push dispatch)."""
    for _ in range(500):
        clients = await store.redis.client_list()
        if any(c["cmd"] == "blpop" and "b" in c["flags"] for c in clients):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no claim blocked in BLPOP")


@pytest.mark.redis
async def test_claims_resume_after_connections_die_silently(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """Every connection of the worker stops answering without being closed (its blocking
    read would wait forever): the call deadline drops them and the worker reconnects; the
    task pushed to it meanwhile comes with its next claim."""
    settings = fast_settings(namespace, tmp_path)
    async with (
        frozen_later(redis_url) as (proxy, proxied),
        own_store(redis_url, settings) as store,
        redis_transport(proxied, settings, op_timeout_s=1.0) as transport,
        running(agent(transport, nodes([14]), claim_wait_s=0.5)),
    ):
        tasks = Tasks(store, Gpus(store))
        before = await create(tasks, 14, "before")
        await wait_status(store, [before])
        await wait_blocked_read(store)  # the worst moment: its claim waits in Redis
        frozen = proxy.freeze()
        assert frozen >= 2  # at least the command pool's and the blocking read's
        after = await create(tasks, 14, "after")
        done = await wait_status(store, [after], within_s=15)
    assert done[after]["result"] == "raw:after"
    assert proxy.accepted > frozen  # through new connections


@pytest.mark.redis
async def test_a_report_on_a_dead_connection_fails_by_its_deadline_then_lands(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """Reports go out in batches with one deadline per batch: on a connection that stopped
    answering, the report fails with TransportError after ``op_timeout_s`` (not the socket's
    10 s and its retries), the connections are dropped, and the repeat lands."""
    from gpuflow.core.gpus import GpuSpec
    from gpuflow.worker.transport import TransportError

    settings = fast_settings(namespace, tmp_path)
    async with (
        frozen_later(redis_url) as (proxy, proxied),
        own_store(redis_url, settings) as store,
        redis_transport(proxied, settings, op_timeout_s=0.5) as transport,
    ):
        tasks = Tasks(store, Gpus(store))
        await Gpus(store).register(GpuSpec("gd", [14]))
        task_id = await create(tasks, 14, "x")
        (claimed,) = await transport.claim("gd", 0)
        proxy.freeze()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TransportError, match=r"no answer within 0\.5 s"):
            await transport.complete(claimed, "late")
        assert loop.time() - started < 3
        await transport.complete(claimed, "through")  # on a fresh connection
        assert (await tasks.get(task_id))["result"] == "through"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_api_at(settings: Settings, redis_url: str, port: int) -> ApiServer:
    """As ``tests.servers.start_api``, on a given port (to start it again at the same URL)."""
    app = create_app(settings, redis_url)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("API server did not start")
        time.sleep(0.01)
    return ApiServer(f"http://127.0.0.1:{port}", settings.admin_key or "", server, thread, app)


@pytest.mark.redis
async def test_http_worker_survives_an_api_restart(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = fast_settings(namespace, tmp_path)
    port = _free_port()
    api = await asyncio.to_thread(start_api_at, settings, redis_url, port)
    try:
        async with httpx.AsyncClient(base_url=api.url) as c:
            r = await c.post(
                "/api/v2/keys",
                json={"role": "worker", "name": "restart-test"},
                headers={"X-API-Key": api.admin_key},
            )
            key = r.json()["data"]["key"]
        transport = HttpTransport(api.url, key, timeout_s=5)
        async with (
            own_store(redis_url, settings) as store,
            running(agent(transport, nodes([14]))),
        ):
            tasks = Tasks(store, Gpus(store))
            before = await create(tasks, 14, "before")
            await wait_status(store, [before])
            await asyncio.to_thread(api.stop)
            assert not api.thread.is_alive()
            after = await create(tasks, 14, "after")
            api = await asyncio.to_thread(start_api_at, settings, redis_url, port)
            done = await wait_status(store, [after])
        await transport.close()
    finally:
        await asyncio.to_thread(api.stop)
    assert done[after]["result"] == "raw:after"
