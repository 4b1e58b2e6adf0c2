"""The client's sans-I/O core, shared by ``Client`` and ``AsyncClient``.

Every API call is a :class:`Call`: what to send (method, path, query, JSON body) and how to
read the answer (``decode``, which unwraps the ``{code, message, data}`` envelope or raises
the matching error). The two clients only move bytes: they send a ``Call`` with httpx, retry
it on a connection failure if it is idempotent, and hand the response to ``decode``. The
pacing of ``wait`` / ``follow`` (deadline, long-poll and stream windows, poll interval, which
progress is new) lives in :class:`Poll`, and the reading of server-sent events in
:class:`EventReader`, so that the sync and async loops are a few lines each.

``wait`` long-polls (``GET /api/v2/tasks/{id}?wait=``, :data:`LONG_POLL_S` at a time);
``follow`` reads the task's event stream (``GET /api/v2/tasks/{id}/events``). Against a
server without them (an older gpuflow), both fall back to polling every ``poll_interval``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast
from urllib.parse import quote

import httpx

from gpuflow import __version__
from gpuflow.client._exceptions import (
    GpuflowError,
    TransportError,
    ValidationError,
    WaitTimeout,
    error_for,
)
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
from gpuflow.core.models import TERMINAL_STATUSES

T = TypeVar("T")

DEFAULT_API_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 2
RETRY_BACKOFF_S = 0.1
LONG_POLL_S = 30.0  # one long-poll of ``wait`` (the server allows up to 60)
STREAM_S = 3600.0  # one event stream of ``follow`` (the server's most)
STREAM_READ_S = 45.0  # an event stream sends a keep-alive every 15 s: silent longer is dead
# Only these methods are ever sent twice: a POST that may have reached the server is not.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Failures after which an idempotent call is tried again (not read timeouts: a slow server
# would only be asked the same question again).
RETRYABLE_ERRORS = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)

Params = dict[str, str | int]


@dataclass(frozen=True, slots=True)
class Config:
    """Where and how to connect, resolved once from arguments and the environment."""

    base_url: str
    headers: dict[str, str]
    timeout: float
    retries: int

    @classmethod
    def resolve(
        cls, base_url: str | None, api_key: str | None, timeout: float, retries: int
    ) -> Config:
        """``base_url`` defaults to $GPUFLOW_API_URL, ``api_key`` to $GPUFLOW_API_KEY."""
        url = (base_url or os.environ.get("GPUFLOW_API_URL") or DEFAULT_API_URL).rstrip("/")
        try:
            scheme = httpx.URL(url).scheme
        except httpx.InvalidURL as exc:
            raise ValidationError(f"invalid API URL {url!r}: {exc}") from exc
        if scheme not in ("http", "https"):
            raise ValidationError(f"invalid API URL {url!r}: use http:// or https://")
        key = api_key if api_key is not None else os.environ.get("GPUFLOW_API_KEY")
        headers = {"User-Agent": f"gpuflow-client/{__version__}", "Accept": "application/json"}
        if key:
            headers["X-API-Key"] = key
        return cls(url, headers, timeout, max(retries, 0))


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One request to the API and the decoder of its answer."""

    method: str
    path: str
    decode: Callable[[httpx.Response], T]
    params: Params | None = None
    body: Any = None
    wait: float = 0.0  # seconds the server may hold the answer (a long-poll)

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT_METHODS

    def retry_delays(self, retries: int) -> Iterator[float]:
        """Pauses before each retry: none for a call that must not be sent twice."""
        return retry_delays(retries if self.idempotent else 0)


def retry_delays(retries: int) -> Iterator[float]:
    """Pauses before each of ``retries`` retries of a read."""
    return iter([RETRY_BACKOFF_S * 2**i for i in range(retries)])


# --- answers ----------------------------------------------------------------------------


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _message(body: Any, response: httpx.Response) -> str:
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    snippet = response.text.strip()[:200] or response.reason_phrase
    return f"HTTP {response.status_code} from {response.url}: {snippet}"


def data(response: httpx.Response) -> Any:
    """The envelope's ``data``; the matching :class:`GpuflowError` for an error status."""
    body = _body(response)
    if response.is_error:
        raise error_for(response.status_code, _message(body, response))
    if not isinstance(body, dict) or "data" not in body:
        raise GpuflowError(
            f"not a gpuflow answer: {_message(None, response)}", response.status_code
        )
    return body["data"]


def _page(response: httpx.Response) -> TaskPage:
    items = data(response)
    total = response.headers.get("X-Total-Count", "")
    return TaskPage(items, int(total) if total.isdigit() else len(items))


def _health(response: httpx.Response) -> Health:
    """``/health`` answers 503 with a full body when Redis is down: return it, not raise."""
    body = _body(response)
    if response.status_code == 503 and isinstance(body, dict) and body.get("data"):
        health: Health = body["data"]
        return health
    result: Health = data(response)
    return result


# --- requests ---------------------------------------------------------------------------


def _seg(what: str, value: str | int) -> str:
    text = str(value)
    if not text:
        raise ValidationError(f"{what} must not be empty")
    return quote(text, safe="")


def _compact(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def raw(method: str, path: str, params: Params | None = None, body: Any = None) -> Call[Any]:
    return Call(method.upper(), path, data, params, body)


def create_task(
    task_type: int,
    payload: Any = None,
    *,
    priority: int = 0,
    user_id: str | None = None,
    app: str | None = None,
    env: str | None = None,
    max_retries: int | None = None,
    timeout_ms: int | None = None,
) -> Call[TaskCreated]:
    body = _compact(
        taskType=task_type,
        payload=payload,
        priority=priority,
        userId=user_id,
        app=app,
        env=env,
        maxRetries=max_retries,
        timeout=timeout_ms,
    )
    return Call("POST", "/api/v2/tasks", data, body=body)


def run_task(new: Call[TaskCreated], wait: float) -> Call[Task]:
    """``new`` (a :func:`create_task` call) with ``wait``: the server creates the task and
    answers with its detail once it is final or ``wait`` seconds have passed."""
    return Call(new.method, new.path, data, _wait(wait), new.body, wait=wait)


def list_tasks(
    status: str | None = None,
    task_type: int | None = None,
    gpu_id: str | None = None,
    user_id: str | None = None,
    page: int = 1,
    size: int = 20,
) -> Call[TaskPage]:
    params = _compact(
        status=status, taskType=task_type, gpuId=gpu_id, userId=user_id, page=page, size=size
    )
    return Call("GET", "/api/v2/tasks", _page, params)


def _wait(wait: float) -> Params | None:
    if wait < 0:
        raise ValidationError("wait must be >= 0")
    return {"wait": f"{wait:.3f}"} if wait > 0 else None


def get_task(task_id: str, wait: float = 0) -> Call[Task]:
    return Call("GET", f"/api/v2/tasks/{_seg('task_id', task_id)}", data, _wait(wait), wait=wait)


def get_progress(task_id: str) -> Call[TaskProgress]:
    return Call("GET", f"/api/v2/tasks/{_seg('task_id', task_id)}/progress", data)


def get_result(task_id: str, wait: float = 0) -> Call[TaskResult]:
    path = f"/api/v2/tasks/{_seg('task_id', task_id)}/result"
    return Call("GET", path, data, _wait(wait), wait=wait)


def events_path(task_id: str) -> str:
    return f"/api/v2/tasks/{_seg('task_id', task_id)}/events"


def list_gpus() -> Call[list[Gpu]]:
    return Call("GET", "/api/v2/gpus", data)


def get_gpu(gpu_id: str) -> Call[Gpu]:
    return Call("GET", f"/api/v2/gpus/{_seg('gpu_id', gpu_id)}", data)


def gpus_by_task_type(task_type: int, priority: str | None = None) -> Call[list[Gpu]]:
    path = f"/api/v2/gpus/by-task-type/{_seg('task_type', task_type)}"
    return Call("GET", path, data, _compact(priority=priority))


def fault_gpu(gpu_id: str, reason: str = "") -> Call[str]:
    path = f"/api/v2/gpus/{_seg('gpu_id', gpu_id)}/fault"
    return Call("POST", path, data, {"reason": reason} if reason else None)


def recover_gpu(gpu_id: str) -> Call[str]:
    return Call("POST", f"/api/v2/gpus/{_seg('gpu_id', gpu_id)}/recover", data)


def delete_gpu(gpu_id: str) -> Call[str]:
    return Call("DELETE", f"/api/v2/gpus/{_seg('gpu_id', gpu_id)}", data)


def create_key(role: str, user_id: str | None = None, name: str | None = None) -> Call[NewApiKey]:
    return Call("POST", "/api/v2/keys", data, body=_compact(role=role, userId=user_id, name=name))


def list_keys() -> Call[list[ApiKey]]:
    return Call("GET", "/api/v2/keys", data)


def health() -> Call[Health]:
    return Call("GET", "/health", _health)


# --- transport helpers ------------------------------------------------------------------


def retry_after(exc: httpx.TransportError, delays: Iterator[float], base_url: str) -> float:
    """The pause before trying a call again after ``exc``; raises TransportError when the
    call may not, or may no longer, be retried."""
    delay = next(delays, None) if isinstance(exc, RETRYABLE_ERRORS) else None
    if delay is None:
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            raise TransportError(f"no answer from gpuflow at {base_url}: {detail}") from exc
        raise TransportError(f"cannot reach gpuflow at {base_url}: {detail}") from exc
    return delay


def is_final(status: str) -> bool:
    return status in TERMINAL_STATUSES


def answered_early(window: float, took: float) -> bool:
    """A long-poll that came back unfinished well before its window: the server does not
    long-poll (an older one ignores ``wait``), so the caller paces itself."""
    return took < window / 2


def is_event_stream(response: httpx.Response) -> bool:
    content_type = response.headers.get("content-type", "")
    return response.status_code == 200 and content_type.startswith("text/event-stream")


def raise_unless_no_stream(response: httpx.Response) -> None:
    """After an answer that is not an event stream (its body read): return when the caller
    should fall back to polling (no such route: an older server; or an unknown task, which
    polling reports), raise the matching error for any other error."""
    if response.status_code not in (404, 405) and response.is_error:
        data(response)


class EventReader:
    """Server-sent events, line by line (sans I/O): ``feed`` returns each complete event's
    task progress; an ``error`` event raises :class:`GpuflowError`."""

    def __init__(self) -> None:
        self._event = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> TaskProgress | None:
        if not line:
            event, lines = self._event, self._data
            self._event, self._data = "message", []
            return _event_data(event, "\n".join(lines)) if lines else None
        if line.startswith(":"):
            return None  # a comment: keep-alive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


def _event_data(event: str, text: str) -> TaskProgress:
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise GpuflowError(f"bad event from the server: {text[:200]!r}") from exc
    if event == "error" or not isinstance(body, dict) or "status" not in body:
        message = body.get("message") if isinstance(body, dict) else None
        raise GpuflowError(f"event stream ended: {message or text[:200]}")
    return cast(TaskProgress, body)


class Poll:
    """The pacing of a polling loop: deadline, interval, and which progress is news."""

    def __init__(
        self,
        what: str,
        timeout: float | None,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0:
            raise ValueError("poll_interval must be > 0")
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be >= 0")
        self._what = what
        self._timeout = timeout
        self._interval = interval
        self._clock = clock
        self._deadline = None if timeout is None else clock() + timeout
        self._last: tuple[str, int, str | None] | None = None

    def window(self, status: str | None, cap: float) -> float:
        """Seconds the next long-poll or stream may last: ``cap``, or what is left before
        the deadline; WaitTimeout once past it (never before the first call, status None)."""
        if self._deadline is None:
            return cap
        left = self._deadline - self._clock()
        if left <= 0 and status is not None:
            raise WaitTimeout(f"{self._what} is still {status} after {self._timeout:g} s")
        return max(0.0, min(cap, left))

    def delay(self, status: str) -> float:
        """Seconds to sleep before the next poll; WaitTimeout once the deadline is past."""
        if self._deadline is None:
            return self._interval
        left = self._deadline - self._clock()
        if left <= 0:
            raise WaitTimeout(f"{self._what} is still {status} after {self._timeout:g} s")
        return min(self._interval, left)

    def is_news(self, progress: TaskProgress) -> bool:
        """True when status, percentage or message changed since the last one reported."""
        key = (progress["status"], progress["progress"], progress["message"])
        news = key != self._last
        self._last = key
        return news
