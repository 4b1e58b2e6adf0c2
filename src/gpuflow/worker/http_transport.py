"""The HTTP transport: the agent speaks the worker protocol of ``/api/v2`` only.

Every response is the envelope ``{code, message, data}``. 409 (stale or duplicate report) is
:class:`StaleAttempt`; 404 is :class:`NodeUnknown` for node calls and :class:`StaleAttempt`
for task reports (the task is gone); connection errors, timeouts and 5xx are
:class:`TransportError`; any other refusal is :class:`TransportRejected`. Nothing is retried
here: the agent decides (heartbeat and claim with backoff, fenced reports a few times).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from typing import Any
from urllib.parse import quote

import httpx

from gpuflow.core.coalesce import Coalescer
from gpuflow.core.models import MAX_BEATS
from gpuflow.worker.transport import (
    ClaimedTask,
    NodeSpec,
    NodeUnknown,
    StaleAttempt,
    TransportError,
    TransportRejected,
)

CLAIM_EXTRA_S = 15.0
BEATS_PATH = "/api/v2/gpus/heartbeats"
Beat = tuple[str, Mapping[str, int]]
log = logging.getLogger("gpuflow.worker")


def _seg(value: str) -> str:
    return quote(value, safe="")


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict):
        return str(body.get("message") or body.get("detail") or body)
    return str(body)


def _data(path: str, response: httpx.Response, node: bool) -> Any:
    """The envelope's ``data`` of a success, else the exception the status means."""
    status = response.status_code
    if status < 300:
        try:
            return response.json().get("data")
        except (ValueError, AttributeError) as exc:
            raise TransportError(f"{path}: not an envelope: {response.text[:200]}") from exc
    raise _refusal(status, f"{path}: {status} {_message(response)}", node)


def _refusal(status: int, text: str, node: bool) -> Exception:
    if status == 409:
        return StaleAttempt(text)
    if status == 404:
        return (NodeUnknown if node else StaleAttempt)(text)
    if status >= 500 or status in (408, 429):
        return TransportError(text)
    return TransportRejected(text)


def _running(running: Mapping[str, int]) -> list[dict[str, Any]]:
    return [{"taskId": t, "attempt": a} for t, a in running.items()]


async def _outcome(call: Awaitable[list[str]]) -> list[str] | Exception:
    try:
        return await call
    except Exception as exc:
        return exc


class HttpTransport:
    """Transport over the HTTP API at ``base_url`` with an API key (role ``worker``)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"X-API-Key": api_key},
            timeout=timeout_s,
            transport=transport,
        )
        self._batch_beats = True
        self._beats: Coalescer[Beat, list[str]] = Coalescer(self._heartbeats, MAX_BEATS)

    async def _send(
        self,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        params: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> httpx.Response:
        kwargs: dict[str, Any] = {"json": body, "params": params}
        if timeout_s is not None:
            kwargs["timeout"] = timeout_s
        try:
            return await self._client.post(path, **kwargs)
        except httpx.HTTPError as exc:
            raise TransportError(f"{path}: {type(exc).__name__}: {exc}") from exc

    async def _post(
        self,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        node: bool = False,
        params: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        return _data(path, await self._send(path, body, params=params, timeout_s=timeout_s), node)

    async def register(self, node: NodeSpec) -> None:
        body = {
            "gpuId": node.gpu_id,
            "hostname": node.hostname,
            "ip": node.ip,
            "port": node.port,
            "supportedTaskTypes": list(node.supported_task_types),
            "supportedTaskPriority": node.supported_task_priority,
            "version": node.version,
            "maxConcurrentTasks": node.max_concurrent_tasks,
            "metadata": dict(node.metadata),
        }
        await self._post("/api/v2/gpus/register", body, node=True)

    async def heartbeat(self, gpu_id: str, running: Mapping[str, int]) -> list[str]:
        """Beats made together (the agent beats for all its nodes at once) leave as one
        ``POST /api/v2/gpus/heartbeats``; a server without that endpoint gets one
        ``POST /api/v2/gpus/{gpuId}/heartbeat`` each."""
        return await self._beats.submit((gpu_id, dict(running)))

    async def _heartbeats(self, beats: list[Beat]) -> list[list[str] | Exception]:
        if len(beats) == 1 or not self._batch_beats:
            return [await _outcome(self._heartbeat_one(*beat)) for beat in beats]
        body = {"beats": [{"gpuId": g, "running": _running(r)} for g, r in beats]}
        response = await self._send(BEATS_PATH, body)
        if response.status_code in (404, 405):  # an older api: beat one node at a time
            log.info("%s: %s; heartbeats go one node at a time", BEATS_PATH, response.status_code)
            self._batch_beats = False
            return await self._heartbeats(beats)
        data = _data(BEATS_PATH, response, node=True)
        if not isinstance(data, list) or len(data) != len(beats):
            raise TransportError(f"{BEATS_PATH}: {len(beats)} beats sent, answer: {data!r:.200}")
        out: list[list[str] | Exception] = []
        for (gpu_id, _), item in zip(beats, data, strict=True):
            answer: dict[str, Any] = (
                item if isinstance(item, dict) else {"code": 500, "message": repr(item)}
            )
            code = int(answer.get("code", 500))
            if code < 300:
                out.append([str(t) for t in answer.get("stop") or []])
            else:
                text = f"{BEATS_PATH} [{gpu_id}]: {code} {answer.get('message')}"
                out.append(_refusal(code, text, node=True))
        return out

    async def _heartbeat_one(self, gpu_id: str, running: Mapping[str, int]) -> list[str]:
        body = {"running": _running(running)}
        data = await self._post(f"/api/v2/gpus/{_seg(gpu_id)}/heartbeat", body, node=True)
        if isinstance(data, dict):  # a server without the running list answers a string
            return [str(t) for t in data.get("stop") or []]
        return []

    async def presence(self, stop: asyncio.Event) -> None:
        return None

    async def claim(
        self, gpu_id: str, wait_s: float, *, recover: bool = False
    ) -> list[ClaimedTask]:
        data = await self._post(
            f"/api/v2/gpus/{_seg(gpu_id)}/claim",
            node=True,
            params={"wait": f"{wait_s:g}", "recover": "true" if recover else "false"},
            timeout_s=wait_s + CLAIM_EXTRA_S,
        )
        return [ClaimedTask.from_view(v) for v in data or []]

    async def stop_waiting(self, gpu_id: str) -> bool:
        """Nothing to do: the api starts a task for a node only within its claim request,
        and a claim abandoned with its connection leaves nothing started."""
        return False

    def _fence(self, task: ClaimedTask) -> dict[str, Any]:
        return {"gpuId": task.gpu_id, "attempt": task.attempt}

    async def progress(self, task: ClaimedTask, percent: int, message: str | None) -> None:
        body = {"progress": percent, **self._fence(task)}
        if message is not None:
            body["message"] = message
        await self._post(f"/api/v2/tasks/{_seg(task.task_id)}/progress", body)

    async def complete(self, task: ClaimedTask, result: str) -> None:
        body = {"result": result, **self._fence(task)}
        await self._post(f"/api/v2/tasks/{_seg(task.task_id)}/result", body)

    async def _status(self, task: ClaimedTask, status: str, **extra: Any) -> None:
        body = {"status": status, **self._fence(task), **extra}
        await self._post(f"/api/v2/tasks/{_seg(task.task_id)}/status", body)

    async def fail(self, task: ClaimedTask, error: str, *, retryable: bool = True) -> None:
        await self._status(task, "FAILED", message=error, retryable=retryable)

    async def time_out(self, task: ClaimedTask, error: str) -> None:
        await self._status(task, "TIMEOUT", message=error)

    async def release(self, task: ClaimedTask) -> None:
        await self._status(task, "QUEUED")

    async def close(self) -> None:
        await self._client.aclose()
