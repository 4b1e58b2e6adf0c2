"""/api/v2/tasks: create, list, read, and the worker-side reports."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from functools import partial
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from redis.exceptions import RedisError
from starlette.responses import Response, StreamingResponse

from gpuflow.api.deps import Reader, Submitter, SystemDep, WorkerRole, check_task_access
from gpuflow.api.envelope import ERROR_RESPONSES, Envelope, envelope
from gpuflow.api.schemas import (
    TaskCreate,
    TaskCreated,
    TaskOut,
    TaskProgressOut,
    TaskProgressUpdate,
    TaskResultOut,
    TaskResultUpdate,
    TaskStatusUpdate,
)
from gpuflow.core.apikeys import Principal, Role
from gpuflow.core.errors import Forbidden, GpuflowError, InvalidInput
from gpuflow.core.models import TERMINAL_STATUSES, TaskStatus, json_text
from gpuflow.core.notify import TaskNotifier, settle
from gpuflow.core.system import System
from gpuflow.core.tasks import Idempotency, NewTask, view_from_note

router = APIRouter(prefix="/api/v2/tasks", tags=["tasks"], responses=ERROR_RESPONSES)
TaskId = Annotated[str, "task id"]

MAX_WAIT_S = 60.0  # longest long-poll
MAX_STREAM_S = 3600.0  # longest event stream; a client reconnects after it
HEARTBEAT_S = 15.0  # an event stream sends a comment after this long without an event

Wait = Annotated[
    float,
    Query(
        ge=0,
        le=MAX_WAIT_S,
        description="Long-poll: answer as soon as the task is final (COMPLETED, FAILED, "
        "TIMEOUT, CANCELED), or after this many seconds with its current state. 0 (the "
        "default) answers at once.",
    ),
]
StreamWait = Annotated[
    float,
    Query(
        ge=0,
        le=MAX_STREAM_S,
        description="Close the stream after this many seconds even if the task has not "
        "ended (0: send the current state only). Reconnect to go on.",
    ),
]


def get_notifier(request: Request) -> TaskNotifier:
    notifier: TaskNotifier = request.app.state.notifier
    return notifier


NotifierDep = Annotated[TaskNotifier, Depends(get_notifier)]


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        pattern=r"^[\x21-\x7e]+$",
        description="Repeat-safe creation: the same key and body within 24 h returns the "
        "first task; the same key with another body answers 409.",
    ),
]


CreateWait = Annotated[
    float,
    Query(
        ge=0,
        le=MAX_WAIT_S,
        description="Create and await in one call: answer with the task's detail (`TaskOut`) "
        "as soon as it is final, or after this many seconds with its current state. The task "
        "is queued either way. 0 (the default) answers at once with `TaskCreated`.",
    ),
]


@router.post(
    "", response_model=Envelope[TaskCreated | TaskOut], summary="Create a task (and await it)"
)
async def create_task(
    body: TaskCreate,
    system: SystemDep,
    request: Request,
    who: Submitter,
    idempotency_key: IdempotencyKey = None,
    wait: CreateWait = 0,
) -> Response:
    """Queue a task. A `client` key creates tasks for its own user only. With `wait`, one
    request does what create plus a long-poll of `GET /api/v2/tasks/{taskId}?wait=` do,
    a round trip less: the answer is the task's detail, final or as it stands when `wait`
    runs out (then await it with that long-poll). 503 (nothing created) when too many
    requests already wait."""
    new = new_task_of(body, who)
    idem = None
    if idempotency_key is not None:
        digest = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
        idem = Idempotency(who.key_id or who.role.value, idempotency_key, digest)
    # The notifier is not a dependency: most creates do not wait.
    return envelope(await submit(system, get_notifier(request), new, wait, idem))


def new_task_of(body: TaskCreate, who: Principal) -> NewTask:
    """The task a create asks for; a `client` key creates for its own user only. Shared
    with the create fast path (api/fastpath_create.py)."""
    user_id = body.userId
    if who.role is Role.CLIENT:
        if user_id is not None and user_id != who.user_id:
            raise Forbidden(f"a client key of user {who.user_id} cannot create tasks for {user_id}")
        user_id = who.user_id
    return NewTask(
        task_type=body.taskType,
        payload="" if body.payload is None else json_text(body.payload),
        user_id=user_id,
        app=body.app,
        priority=body.priority,
        env=body.env,
        max_retries=body.maxRetries,
        timeout=body.timeout,
    )


async def submit(
    system: System,
    notifier: TaskNotifier,
    new: NewTask,
    wait: float,
    idem: Idempotency | None = None,
) -> dict[str, Any]:
    """Create, and with ``wait`` > 0 await the task: its ``TaskCreated`` view, or its
    detail once final or when ``wait`` runs out."""
    if wait <= 0:
        return await system.tasks.create(new, idem)
    deadline = asyncio.get_running_loop().time() + wait
    task_id = notifier.own_task_id()
    # Watched before the task exists (an id of this process's own channels: no SUBSCRIBE to
    # wait for), so even a task that ends at once wakes this request; only its end wakes it.
    async with notifier.watch(task_id, final=True) as watch:
        created = await system.tasks.create(new, idem, task_id, awaited=True)
        read = partial(system.tasks.get, created["taskId"])
        if created["taskId"] == task_id:
            return await settle(watch, deadline, read, view_of=view_from_note)
    # An idempotent repeat: the first request's task, awaited like GET ?wait= does.
    left = max(deadline - asyncio.get_running_loop().time(), 0.0)
    return await notifier.until_final(created["taskId"], left, read)


@router.get("", response_model=Envelope[list[TaskOut]], summary="List tasks, newest first")
async def list_tasks(
    system: SystemDep,
    who: Reader,
    status: TaskStatus | None = None,
    taskType: Annotated[int | None, Query(ge=0)] = None,
    gpuId: Annotated[str | None, Query(max_length=128)] = None,
    userId: Annotated[str | None, Query(max_length=128)] = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    size: Annotated[int, Query(ge=1, le=200)] = 20,
) -> Response:
    """The total number of matches is in the `X-Total-Count` header. A `client` key
    lists only its own user's tasks."""
    if who.role is Role.CLIENT:
        if userId is not None and userId != who.user_id:
            raise Forbidden("a client key lists only its own user's tasks")
        userId = who.user_id
    items, total = await system.tasks.list(
        status=status, task_type=taskType, gpu_id=gpuId, user_id=userId, page=page, size=size
    )
    resp = envelope(items)
    resp.headers["X-Total-Count"] = str(total)
    return resp


@router.get("/{taskId}", response_model=Envelope[TaskOut], summary="Task detail")
async def get_task(
    taskId: TaskId, system: SystemDep, notifier: NotifierDep, who: Reader, wait: Wait = 0
) -> Response:
    """With `wait`, a long-poll: answers when the task is final or after `wait` seconds."""
    await check_task_access(system, who, taskId)
    return envelope(await notifier.until_final(taskId, wait, partial(system.tasks.get, taskId)))


@router.get("/{taskId}/progress", response_model=Envelope[TaskProgressOut], summary="Progress")
async def get_progress(taskId: TaskId, system: SystemDep, who: Reader) -> Response:
    await check_task_access(system, who, taskId)
    return envelope(await system.tasks.progress_view(taskId))


@router.get("/{taskId}/result", response_model=Envelope[TaskResultOut], summary="Result")
async def get_result(
    taskId: TaskId, system: SystemDep, notifier: NotifierDep, who: Reader, wait: Wait = 0
) -> Response:
    """With `wait`, a long-poll: answers when the task is final or after `wait` seconds."""
    await check_task_access(system, who, taskId)
    read = partial(system.tasks.result_view, taskId)
    return envelope(await notifier.until_final(taskId, wait, read))


@router.post("/{taskId}/cancel", response_model=Envelope[str], summary="Cancel a task")
async def cancel_task(taskId: TaskId, system: SystemDep, who: Submitter) -> Response:
    """A QUEUED task ends CANCELED at once. A PROCESSING one ends CANCELED too: its attempt
    is fenced off (late reports get 409) and its worker is told to stop the handler at its
    next heartbeat. A finished task answers 409. A `client` key cancels its own tasks only."""
    await check_task_access(system, who, taskId)
    previous = await system.tasks.cancel(taskId, f"canceled by {who.role.value}")
    return envelope(f"task canceled (was {previous.value})")


@router.post("/{taskId}/result", response_model=Envelope[str], summary="Report a result")
async def post_result(
    taskId: TaskId, body: TaskResultUpdate, system: SystemDep, _: WorkerRole
) -> Response:
    """Completes the task's current attempt with this result (409 if it is not running,
    or if `attempt` / `gpuId` name an attempt that is no longer current)."""
    await system.tasks.finish(
        taskId,
        TaskStatus.COMPLETED,
        json_text(body.result),
        gpu_id=body.gpuId,
        attempt=body.attempt,
    )
    return envelope("task result updated")


@router.post("/{taskId}/progress", response_model=Envelope[str], summary="Report progress")
async def post_progress(
    taskId: TaskId, body: TaskProgressUpdate, system: SystemDep, _: WorkerRole
) -> Response:
    """Records progress (0-100) and renews the attempt's lease."""
    await system.tasks.report_progress(
        taskId, body.progress, body.message, gpu_id=body.gpuId, attempt=body.attempt
    )
    return envelope("task progress updated")


@router.post("/{taskId}/status", response_model=Envelope[str], summary="Report a status")
async def post_status(
    taskId: TaskId, body: TaskStatusUpdate, system: SystemDep, _: WorkerRole
) -> Response:
    """PROCESSING starts a QUEUED task on `gpuId` (push style); COMPLETED / FAILED / TIMEOUT
    end the current attempt (a retryable failure with retries left goes back to QUEUED);
    QUEUED hands the task back without counting a failure."""
    await _apply_status(system, taskId, body)
    return envelope("task status updated")


async def _apply_status(system: System, task_id: str, body: TaskStatusUpdate) -> None:
    tasks = system.tasks
    if body.status == "PROCESSING":
        if not body.gpuId:
            raise InvalidInput("gpuId: required when status is PROCESSING")
        await tasks.start(task_id, body.gpuId, body.message)
    elif body.status == "QUEUED":
        await tasks.requeue(task_id, body.attempt)
    elif body.status == "COMPLETED":
        text = json_text(body.result) if body.result is not None else (body.message or "")
        await tasks.finish(
            task_id, TaskStatus.COMPLETED, text, gpu_id=body.gpuId, attempt=body.attempt
        )
    else:
        await tasks.finish(
            task_id,
            TaskStatus(body.status),
            body.message or f"task reported {body.status}",
            gpu_id=body.gpuId,
            attempt=body.attempt,
            retryable=body.retryable,
        )


ERROR_SCHEMA = "#/components/schemas/ErrorEnvelope"


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"


EVENTS_DOC = """Server-sent events of one task's progress, until it ends.

The first event is the task's current state, so a late subscriber misses nothing. Then one
event per change of status, percentage or message, as it happens (pushed, not polled).
Each event's `data` is the JSON of `GET /api/v2/tasks/{taskId}/progress`'s `data`
(`TaskProgressOut`); its `event` is `progress`, or `end` for the final state (COMPLETED,
FAILED, TIMEOUT, CANCELED), after which the server closes the stream. A stream also closes
after `wait` seconds (default and most: 3600) without an `end`: reconnect to go on.
A comment line (`: keep-alive`) goes out after 15 s without an event. If the task
disappears or the server cannot read it, an `error` event (`data: {"message": ...}`) ends
the stream. Browser `EventSource`s must `close()` on `end`, or they would reconnect.

    id: 1
    event: progress
    data: {"taskId":"task_…","status":"PROCESSING","progress":40,...}

    id: 2
    event: end
    data: {"taskId":"task_…","status":"COMPLETED","progress":100,...}
"""


@router.get(
    "/{taskId}/events",
    response_class=EventStreamResponse,
    summary="Stream a task's progress (SSE)",
    description=EVENTS_DOC,
    responses={
        200: {
            "description": "A `text/event-stream` of `progress` events and a final `end`.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        # Errors come before the stream starts, as JSON envelopes like everywhere else.
        **{
            status: {
                "description": doc["description"],
                "content": {"application/json": {"schema": {"$ref": ERROR_SCHEMA}}},
            }
            for status, doc in ERROR_RESPONSES.items()
        },
    },
)
async def task_events(
    taskId: TaskId,
    system: SystemDep,
    notifier: NotifierDep,
    who: Reader,
    wait: StreamWait = MAX_STREAM_S,
) -> Response:
    await check_task_access(system, who, taskId, confirm_exists=True)
    notifier.check_capacity()
    return EventStreamResponse(
        _events(system, notifier, taskId, wait),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _sse(seq: int, kind: str, data: Any) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, kind.encode(), orjson.dumps(data))


async def _events(
    system: System, notifier: TaskNotifier, task_id: str, wait: float
) -> AsyncIterator[bytes]:
    try:
        async for chunk in _progress_events(system, notifier, task_id, wait):
            yield chunk
    except (GpuflowError, RedisError) as exc:
        yield b"event: error\ndata: %s\n\n" % orjson.dumps({"message": str(exc)})


async def _progress_events(
    system: System, notifier: TaskNotifier, task_id: str, wait: float
) -> AsyncIterator[bytes]:
    """The stream's body: an event per new (status, progress, message), ``end`` last."""
    seq = 0
    read = partial(system.tasks.progress_view, task_id)
    async for view in notifier.changes(task_id, wait, read, HEARTBEAT_S):
        if view is None:
            yield b": keep-alive\n\n"
            continue
        seq += 1
        yield _sse(seq, "end" if view["status"] in TERMINAL_STATUSES else "progress", view)
