"""``AsyncClient``: the asyncio client, a thin httpx transport over :mod:`._calls`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import httpx

from gpuflow.client import _calls as calls
from gpuflow.client._calls import DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, Call, Config, Params, Poll

if TYPE_CHECKING:
    from gpuflow.client._aiohttp import AiohttpSender
from gpuflow.client._types import (
    ApiKey,
    Gpu,
    Health,
    NewApiKey,
    Task,
    TaskCreated,
    TaskPage,
    TaskProgress,
    TaskResult,
)

T = TypeVar("T")


def _transport(
    choice: httpx.AsyncBaseTransport | Literal["aiohttp"] | None,
) -> httpx.AsyncBaseTransport | None:
    if choice != "aiohttp":
        return choice
    try:
        from httpx_aiohttp import AiohttpTransport
    except ImportError as exc:
        raise ImportError(
            "transport='aiohttp' needs the aiohttp extra: pip install 'gpuflow[aiohttp]'"
        ) from exc
    return AiohttpTransport()


class _NoStream(Exception):
    """The server does not stream events: fall back to polling."""


class AsyncClient:
    """An asyncio client for gpuflow's HTTP API, the twin of :class:`Client`.

    ``base_url`` defaults to $GPUFLOW_API_URL (else http://127.0.0.1:8000), ``api_key`` to
    $GPUFLOW_API_KEY; the key is sent as ``X-API-Key``. Methods return the API's ``data``
    as plain dicts with the API's camelCase fields, and raise the errors of
    :mod:`gpuflow.client` (``NotFoundError``, ``AuthError`` …). GET calls are retried
    ``retries`` times on a connection failure; other calls are sent exactly once.
    ``transport`` is an httpx transport (e.g. ``httpx.MockTransport`` for tests), or
    ``"aiohttp"``: requests go through aiohttp (the ``gpuflow[aiohttp]`` extra), which holds
    up far better under many concurrent calls (about 3× the creates per second at 32
    concurrent calls, measured in bench/); one-shot calls skip httpx altogether
    (``_aiohttp.py``: about 1.5 ms less per call here), streams go through httpx-aiohttp.

    Use it as an async context manager, or await :meth:`aclose`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        transport: httpx.AsyncBaseTransport | Literal["aiohttp"] | None = None,
    ) -> None:
        self._config = Config.resolve(base_url, api_key, timeout, retries)
        self._http = httpx.AsyncClient(
            base_url=self._config.base_url,
            headers=self._config.headers,
            timeout=timeout,
            transport=_transport(transport),
        )
        self._direct: AiohttpSender | None = None
        if transport == "aiohttp":
            from gpuflow.client._aiohttp import AiohttpSender

            self._direct = AiohttpSender(self._config.base_url, self._config.headers)

    @property
    def base_url(self) -> str:
        return self._config.base_url

    async def aclose(self) -> None:
        await self._http.aclose()
        if self._direct is not None:
            await self._direct.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _send(self, call: Call[T]) -> T:
        """Send one prepared call and decode its answer."""
        delays = call.retry_delays(self._config.retries)
        while True:
            try:
                if self._direct is not None:
                    response = await self._direct.send(
                        call.method,
                        call.path,
                        call.params,
                        call.body,
                        self._config.timeout,
                        self._config.timeout + call.wait,
                    )
                else:
                    response = await self._http.request(
                        call.method,
                        call.path,
                        params=call.params,
                        json=call.body,
                        timeout=self._timeout(call.wait),
                    )
            except httpx.TransportError as exc:
                await asyncio.sleep(calls.retry_after(exc, delays, self.base_url))
                continue
            return call.decode(response)

    def _timeout(self, wait: float) -> httpx.Timeout:
        """The timeouts of a call the server may hold ``wait`` seconds."""
        return httpx.Timeout(self._config.timeout, read=self._config.timeout + wait)

    async def request(
        self, method: str, path: str, *, params: Params | None = None, json: Any = None
    ) -> Any:
        """Any API route, e.g. one this client does not wrap yet; returns the ``data``."""
        return await self._send(calls.raw(method, path, params, json))

    # --- tasks --------------------------------------------------------------------------

    async def create_task(
        self,
        task_type: int,
        payload: Any = None,
        *,
        priority: int = 0,
        user_id: str | None = None,
        app: str | None = None,
        env: str | None = None,
        max_retries: int | None = None,
        timeout_ms: int | None = None,
    ) -> TaskCreated:
        """Queue a task (POST /api/v2/tasks; never retried). ``payload`` is any JSON value
        (a string is kept as is). A client key creates tasks for its own user only."""
        return await self._send(
            calls.create_task(
                task_type,
                payload,
                priority=priority,
                user_id=user_id,
                app=app,
                env=env,
                max_retries=max_retries,
                timeout_ms=timeout_ms,
            )
        )

    async def run_task(
        self,
        task_type: int,
        payload: Any = None,
        *,
        priority: int = 0,
        user_id: str | None = None,
        app: str | None = None,
        env: str | None = None,
        max_retries: int | None = None,
        timeout_ms: int | None = None,
        poll_interval: float = 0.5,
    ) -> Task:
        """Queue a task and wait until it is final; return it (as :meth:`wait` does). One
        request when the task ends within 30 s (``POST /api/v2/tasks?wait=``, never retried),
        then long-polls. Bound it with ``asyncio.timeout()``; a timeout leaves the task
        queued or running."""
        new = calls.create_task(
            task_type,
            payload,
            priority=priority,
            user_id=user_id,
            app=app,
            env=env,
            max_retries=max_retries,
            timeout_ms=timeout_ms,
        )
        task = await self._send(calls.run_task(new, calls.LONG_POLL_S))
        if calls.is_final(task["status"]):
            return task
        return await self.wait(task["taskId"], poll_interval)

    async def list_tasks(
        self,
        status: str | None = None,
        task_type: int | None = None,
        gpu_id: str | None = None,
        user_id: str | None = None,
        page: int = 1,
        size: int = 20,
    ) -> list[Task]:
        """One page of tasks, newest first (see :meth:`list_tasks_page` for the total)."""
        return (await self.list_tasks_page(status, task_type, gpu_id, user_id, page, size)).items

    async def list_tasks_page(
        self,
        status: str | None = None,
        task_type: int | None = None,
        gpu_id: str | None = None,
        user_id: str | None = None,
        page: int = 1,
        size: int = 20,
    ) -> TaskPage:
        """``(items, total)``: one page of tasks and the number of all matches."""
        return await self._send(calls.list_tasks(status, task_type, gpu_id, user_id, page, size))

    async def get_task(self, task_id: str, wait: float = 0) -> Task:
        """The task; with ``wait`` (seconds, at most 60), a long-poll: the answer comes as
        soon as the task is final, or after ``wait`` seconds with its current state."""
        return await self._send(calls.get_task(task_id, wait))

    async def get_progress(self, task_id: str) -> TaskProgress:
        return await self._send(calls.get_progress(task_id))

    async def get_result(self, task_id: str, wait: float = 0) -> TaskResult:
        """The result; with ``wait`` (seconds, at most 60), a long-poll: the answer comes as
        soon as the task is final, or after ``wait`` seconds with its current state."""
        return await self._send(calls.get_result(task_id, wait))

    async def wait(self, task_id: str, poll_interval: float = 0.5) -> Task:
        """Wait until the task is COMPLETED / FAILED / TIMEOUT / CANCELED and return it.
        Long-polls the server (one request per 30 s, answered the moment the task ends);
        polls every ``poll_interval`` seconds a server that does not long-poll. Bound it the
        asyncio way: ``async with asyncio.timeout(60): await gf.wait(id)``
        (``TimeoutError``, as the sync client's ``WaitTimeout`` is)."""
        poll = Poll(f"task {task_id}", None, poll_interval)
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            task = await self.get_task(task_id, wait=calls.LONG_POLL_S)
            if calls.is_final(task["status"]):
                return task
            if calls.answered_early(calls.LONG_POLL_S, loop.time() - started):
                await asyncio.sleep(poll.delay(task["status"]))

    async def follow(self, task_id: str, poll_interval: float = 0.5) -> AsyncIterator[TaskProgress]:
        """Yield the task's progress each time its status, percentage or message changes,
        ending with the final one; bound it with ``asyncio.timeout()`` as :meth:`wait`.
        Reads the server's event stream (pushed, no polling); polls every
        ``poll_interval`` seconds a server that does not stream."""
        poll = Poll(f"task {task_id}", None, poll_interval)
        delays = calls.retry_delays(self._config.retries)
        while True:
            try:
                async for progress in self._events(task_id, calls.STREAM_S):
                    if poll.is_news(progress):
                        yield progress
                    if calls.is_final(progress["status"]):
                        return
            except _NoStream:
                break
            except httpx.TransportError as exc:
                await asyncio.sleep(calls.retry_after(exc, delays, self.base_url))
        while True:
            progress = await self.get_progress(task_id)
            if poll.is_news(progress):
                yield progress
            if calls.is_final(progress["status"]):
                return
            await asyncio.sleep(poll.delay(progress["status"]))

    async def _events(self, task_id: str, window: float) -> AsyncIterator[TaskProgress]:
        """One event stream of the task, at most ``window`` seconds long."""
        timeout = httpx.Timeout(self._config.timeout, read=calls.STREAM_READ_S)
        params = {"wait": f"{window:.3f}"}
        async with self._http.stream(
            "GET", calls.events_path(task_id), params=params, timeout=timeout
        ) as response:
            if not calls.is_event_stream(response):
                await response.aread()
                calls.raise_unless_no_stream(response)
                raise _NoStream
            reader = calls.EventReader()
            async for line in response.aiter_lines():
                progress = reader.feed(line)
                if progress is not None:
                    yield progress

    # --- GPU nodes ----------------------------------------------------------------------

    async def list_gpus(self) -> list[Gpu]:
        return await self._send(calls.list_gpus())

    async def get_gpu(self, gpu_id: str) -> Gpu:
        return await self._send(calls.get_gpu(gpu_id))

    async def gpus_by_task_type(self, task_type: int, priority: str | None = None) -> list[Gpu]:
        """Nodes serving ``task_type``; ``priority`` VIP or NORMAL narrows to the nodes
        that would take a task of that tier."""
        return await self._send(calls.gpus_by_task_type(task_type, priority))

    async def fault_gpu(self, gpu_id: str, reason: str = "") -> str:
        """Mark a node FAULTY: it takes no more tasks until recovered."""
        return await self._send(calls.fault_gpu(gpu_id, reason))

    async def recover_gpu(self, gpu_id: str) -> str:
        """Back to ACTIVE, failure counters reset (admin)."""
        return await self._send(calls.recover_gpu(gpu_id))

    async def delete_gpu(self, gpu_id: str) -> str:
        """Unregister a node; its running tasks are requeued (admin)."""
        return await self._send(calls.delete_gpu(gpu_id))

    # --- keys and health ----------------------------------------------------------------

    async def create_key(
        self, role: str, user_id: str | None = None, name: str | None = None
    ) -> NewApiKey:
        """A new API key (admin); ``key`` is shown only in this answer. A ``client`` key
        needs ``user_id`` and sees only that user's tasks."""
        return await self._send(calls.create_key(role, user_id, name))

    async def list_keys(self) -> list[ApiKey]:
        return await self._send(calls.list_keys())

    async def health(self) -> Health:
        """``{status, redis, version}``; needs no key. A server whose Redis is down answers
        ``status: DOWN`` (returned, not raised)."""
        return await self._send(calls.health())
