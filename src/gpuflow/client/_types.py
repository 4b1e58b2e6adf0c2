"""The API's ``data`` shapes as TypedDicts: plain dicts at run time, typed for editors.

Field names are the API's own (camelCase, timestamps in epoch milliseconds); see
``gpuflow.api.schemas`` for the server side of each.
"""

from __future__ import annotations

from typing import Any, NamedTuple, TypedDict


class TaskCreated(TypedDict):
    taskId: str
    displayId: int
    status: str
    estimatedWaitTime: int  # seconds; -1 when no active GPU serves the task type


class Task(TypedDict):
    taskId: str
    displayId: int
    taskType: int
    status: str  # QUEUED PROCESSING COMPLETED FAILED TIMEOUT CANCELED
    userId: str | None
    app: str | None
    priority: int
    gpuId: str | None
    payload: str | None
    result: str | None
    errorMessage: str | None
    retryCount: int
    maxRetries: int
    timeout: int  # ms
    estimatedWaitTime: int | None
    createdAt: int
    startedAt: int | None
    completedAt: int | None
    updatedAt: int
    env: str | None
    tier: str | None  # VIP / NORMAL
    attempt: int
    progress: int
    progressMessage: str | None


class TaskPage(NamedTuple):
    """One page of ``list_tasks_page``: the items and the total number of matches."""

    items: list[Task]
    total: int


class TaskProgress(TypedDict):
    taskId: str
    status: str
    progress: int  # 0-100
    message: str | None
    estimatedRemainingTime: int  # seconds
    gpuId: str | None
    startTime: int | None
    updateTime: int
    queuePosition: int  # 1-based while QUEUED, else 0


class TaskResult(TypedDict):
    taskId: str
    status: str
    result: Any  # parsed JSON when the stored result is JSON, else the text
    errorMessage: str | None
    gpuId: str | None
    completedAt: int | None


class Gpu(TypedDict):
    gpuId: str
    hostname: str | None
    vastInsId: str | None
    ip: str | None
    port: int | None
    supportedTaskTypes: list[int]
    supportedTaskPriority: str  # VIP / NORMAL
    status: str  # ACTIVE OFFLINE FAULTY
    lastHeartbeat: int | None
    failureCount: int | None
    taskFailureCount: int | None
    version: str | None
    currentTasks: int
    maxConcurrentTasks: int
    metadata: dict[str, Any]
    faultReason: str | None
    registeredAt: int | None


class ApiKey(TypedDict):
    keyId: str
    role: str  # admin client worker viewer
    userId: str | None
    name: str | None
    createdAt: int


class NewApiKey(ApiKey):
    key: str  # shown once, at creation; only its hash is stored


class Health(TypedDict):
    status: str  # UP / DOWN
    redis: str
    version: str
