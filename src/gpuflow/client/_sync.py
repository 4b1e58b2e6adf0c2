"""``Client``: the blocking client, a thin httpx transport over :mod:`._calls`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any, TypeVar

import httpx

from gpuflow.client import _calls as calls
from gpuflow.client._calls import DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, Call, Config, Params, Poll
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


class _NoStream(Exception):
    """The server does not stream events: fall back to polling."""


class Client:
    """A blocking client for gpuflow's HTTP API.

    ``base_url`` defaults to $GPUFLOW_API_URL (else http://127.0.0.1:8000), ``api_key`` to
    $GPUFLOW_API_KEY; the key is sent as ``X-API-Key``. Methods return the API's ``data``
    as plain dicts with the API's camelCase fields, and raise the errors of
    :mod:`gpuflow.client` (``NotFoundError``, ``AuthError`` …). GET calls are retried
    ``retries`` times on a connection failure; other calls are sent exactly once.
    ``transport`` is an httpx transport (e.g. ``httpx.MockTransport``) for tests.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._config = Config.resolve(base_url, api_key, timeout, retries)
        self._http = httpx.Client(
            base_url=self._config.base_url,
            headers=self._config.headers,
            timeout=timeout,
            transport=transport,
        )

    @property
    def base_url(self) -> str:
        return self._config.base_url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _send(self, call: Call[T]) -> T:
        """Send one prepared call and decode its answer."""
        delays = call.retry_delays(self._config.retries)
        while True:
            try:
                response = self._http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    json=call.body,
                    timeout=self._timeout(call.wait),
                )
            except httpx.TransportError as exc:
                time.sleep(calls.retry_after(exc, delays, self.base_url))
                continue
            return call.decode(response)

    def _timeout(self, wait: float) -> httpx.Timeout:
        """The timeouts of a call the server may hold ``wait`` seconds."""
        return httpx.Timeout(self._config.timeout, read=self._config.timeout + wait)

    def request(
        self, method: str, path: str, *, params: Params | None = None, json: Any = None
    ) -> Any:
        """Any API route, e.g. one this client does not wrap yet; returns the ``data``."""
        return self._send(calls.raw(method, path, params, json))

    # --- tasks --------------------------------------------------------------------------

    def create_task(
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
        return self._send(
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

    def run_task(
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
        timeout: float | None = None,
        poll_interval: float = 0.5,
    ) -> Task:
        """Queue a task and wait until it is final; return it (as :meth:`wait` does). One
        request when the task ends within 30 s or ``timeout`` (``POST /api/v2/tasks?wait=``,
        never retried), then long-polls; ``WaitTimeout`` after ``timeout`` seconds, leaving
        the task queued or running."""
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
        poll = Poll("the new task", timeout, poll_interval)
        task = self._send(calls.run_task(new, poll.window(None, calls.LONG_POLL_S)))
        if calls.is_final(task["status"]):
            return task
        left = None if timeout is None else poll.window(task["status"], timeout)
        return self.wait(task["taskId"], left, poll_interval)

    def list_tasks(
        self,
        status: str | None = None,
        task_type: int | None = None,
        gpu_id: str | None = None,
        user_id: str | None = None,
        page: int = 1,
        size: int = 20,
    ) -> list[Task]:
        """One page of tasks, newest first (see :meth:`list_tasks_page` for the total)."""
        return self.list_tasks_page(status, task_type, gpu_id, user_id, page, size).items

    def list_tasks_page(
        self,
        status: str | None = None,
        task_type: int | None = None,
        gpu_id: str | None = None,
        user_id: str | None = None,
        page: int = 1,
        size: int = 20,
    ) -> TaskPage:
        """``(items, total)``: one page of tasks and the number of all matches."""
        return self._send(calls.list_tasks(status, task_type, gpu_id, user_id, page, size))

    def get_task(self, task_id: str, wait: float = 0) -> Task:
        """The task; with ``wait`` (seconds, at most 60), a long-poll: the answer comes as
        soon as the task is final, or after ``wait`` seconds with its current state."""
        return self._send(calls.get_task(task_id, wait))

    def get_progress(self, task_id: str) -> TaskProgress:
        return self._send(calls.get_progress(task_id))

    def get_result(self, task_id: str, wait: float = 0) -> TaskResult:
        """The result; with ``wait`` (seconds, at most 60), a long-poll: the answer comes as
        soon as the task is final, or after ``wait`` seconds with its current state."""
        return self._send(calls.get_result(task_id, wait))

    def wait(self, task_id: str, timeout: float | None = None, poll_interval: float = 0.5) -> Task:
        """Wait until the task is COMPLETED / FAILED / TIMEOUT / CANCELED and return it;
        ``WaitTimeout`` (a ``TimeoutError``) after ``timeout`` seconds. Long-polls the
        server (one request per 30 s, answered the moment the task ends); polls every
        ``poll_interval`` seconds a server that does not long-poll."""
        poll = Poll(f"task {task_id}", timeout, poll_interval)
        status: str | None = None
        while True:
            window = poll.window(status, calls.LONG_POLL_S)
            started = time.monotonic()
            task = self.get_task(task_id, wait=window)
            status = task["status"]
            if calls.is_final(status):
                return task
            if calls.answered_early(window, time.monotonic() - started):
                time.sleep(poll.delay(status))

    def follow(
        self, task_id: str, timeout: float | None = None, poll_interval: float = 0.5
    ) -> Iterator[TaskProgress]:
        """Yield the task's progress each time its status, percentage or message changes,
        ending with the final one; ``WaitTimeout`` after ``timeout`` seconds. Reads the
        server's event stream (pushed, no polling); polls every ``poll_interval`` seconds
        a server that does not stream."""
        poll = Poll(f"task {task_id}", timeout, poll_interval)
        delays = calls.retry_delays(self._config.retries)
        status: str | None = None
        while True:
            window = poll.window(status, calls.STREAM_S)
            try:
                for progress in self._events(task_id, window):
                    status = progress["status"]
                    if poll.is_news(progress):
                        yield progress
                    if calls.is_final(status):
                        return
            except _NoStream:
                break
            except httpx.TransportError as exc:
                time.sleep(calls.retry_after(exc, delays, self.base_url))
        yield from self._poll_progress(task_id, poll)

    def _events(self, task_id: str, window: float) -> Iterator[TaskProgress]:
        """One event stream of the task, at most ``window`` seconds long."""
        timeout = httpx.Timeout(self._config.timeout, read=calls.STREAM_READ_S)
        params = {"wait": f"{window:.3f}"}
        with self._http.stream(
            "GET", calls.events_path(task_id), params=params, timeout=timeout
        ) as response:
            if not calls.is_event_stream(response):
                response.read()
                calls.raise_unless_no_stream(response)
                raise _NoStream
            reader = calls.EventReader()
            for line in response.iter_lines():
                progress = reader.feed(line)
                if progress is not None:
                    yield progress

    def _poll_progress(self, task_id: str, poll: Poll) -> Iterator[TaskProgress]:
        while True:
            progress = self.get_progress(task_id)
            if poll.is_news(progress):
                yield progress
            if calls.is_final(progress["status"]):
                return
            time.sleep(poll.delay(progress["status"]))

    # --- GPU nodes ----------------------------------------------------------------------

    def list_gpus(self) -> list[Gpu]:
        return self._send(calls.list_gpus())

    def get_gpu(self, gpu_id: str) -> Gpu:
        return self._send(calls.get_gpu(gpu_id))

    def gpus_by_task_type(self, task_type: int, priority: str | None = None) -> list[Gpu]:
        """Nodes serving ``task_type``; ``priority`` VIP or NORMAL narrows to the nodes
        that would take a task of that tier."""
        return self._send(calls.gpus_by_task_type(task_type, priority))

    def fault_gpu(self, gpu_id: str, reason: str = "") -> str:
        """Mark a node FAULTY: it takes no more tasks until recovered."""
        return self._send(calls.fault_gpu(gpu_id, reason))

    def recover_gpu(self, gpu_id: str) -> str:
        """Back to ACTIVE, failure counters reset (admin)."""
        return self._send(calls.recover_gpu(gpu_id))

    def delete_gpu(self, gpu_id: str) -> str:
        """Unregister a node; its running tasks are requeued (admin)."""
        return self._send(calls.delete_gpu(gpu_id))

    # --- keys and health ----------------------------------------------------------------

    def create_key(
        self, role: str, user_id: str | None = None, name: str | None = None
    ) -> NewApiKey:
        """A new API key (admin); ``key`` is shown only in this answer. A ``client`` key
        needs ``user_id`` and sees only that user's tasks."""
        return self._send(calls.create_key(role, user_id, name))

    def list_keys(self) -> list[ApiKey]:
        return self._send(calls.list_keys())

    def health(self) -> Health:
        """``{status, redis, version}``; needs no key. A server whose Redis is down answers
        ``status: DOWN`` (returned, not raised)."""
        return self._send(calls.health())
