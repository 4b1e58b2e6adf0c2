"""Status enums and the conversion of stored hashes into the seed's camelCase records."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any


class TaskStatus(StrEnum):
    QUEUED = "QUEUED"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    CANCELED = "CANCELED"


TERMINAL_STATUSES = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.TIMEOUT, TaskStatus.CANCELED}
)


class GpuStatus(StrEnum):
    ACTIVE = "ACTIVE"
    OFFLINE = "OFFLINE"
    FAULTY = "FAULTY"


class Tier(StrEnum):
    VIP = "VIP"
    NORMAL = "NORMAL"


TASK_INT_FIELDS = (
    "displayId",
    "taskType",
    "priority",
    "retryCount",
    "maxRetries",
    "timeout",
    "estimatedWaitTime",
    "createdAt",
    "startedAt",
    "completedAt",
    "updatedAt",
    "attempt",
    "progress",
)
TASK_STR_FIELDS = (
    "taskId",
    "status",
    "userId",
    "app",
    "gpuId",
    "payload",
    "result",
    "errorMessage",
    "env",
    "tier",
    "progressMessage",
)
TASK_FIELDS = (
    "taskId", "displayId", "taskType", "status", "userId", "app", "priority", "gpuId",
    "payload", "result", "errorMessage", "retryCount", "maxRetries", "timeout",
    "estimatedWaitTime", "createdAt", "startedAt", "completedAt", "updatedAt",
    "env", "tier", "attempt", "progress", "progressMessage",
)  # fmt: skip


def _int_or_none(v: str | None) -> int | None:
    if v is None or v == "":
        return None
    return int(float(v))


def task_view(h: dict[str, str]) -> dict[str, Any]:
    """A stored task hash as the seed's TaskDO (plus tier, attempt, progress)."""
    out: dict[str, Any] = {}
    for f in TASK_FIELDS:
        v = h.get(f)
        if f in TASK_INT_FIELDS:
            out[f] = _int_or_none(v)
        else:
            out[f] = v if v not in (None, "") else None
    if out["retryCount"] is None:
        out["retryCount"] = 0
    return out


#: Heartbeats one batch request (``POST /api/v2/gpus/heartbeats``) may carry: the api's
#: bound, and the most an HTTP agent puts in one (an agent's GPUs, 8 on a big box).
MAX_BEATS = 256

GPU_INT_FIELDS = (
    "port",
    "lastHeartbeat",
    "failureCount",
    "taskFailureCount",
    "maxConcurrentTasks",
    "registeredAt",
)
GPU_FIELDS = (
    "gpuId", "hostname", "vastInsId", "ip", "port", "supportedTaskTypes",
    "supportedTaskPriority", "status", "lastHeartbeat", "failureCount", "taskFailureCount",
    "version", "currentTasks", "maxConcurrentTasks", "metadata", "faultReason", "registeredAt",
)  # fmt: skip


def gpu_view(h: dict[str, str], current_tasks: int) -> dict[str, Any]:
    """A stored GPU hash as the seed's GpuNodeInfo (plus faultReason, registeredAt)."""
    out: dict[str, Any] = {}
    for f in GPU_FIELDS:
        v = h.get(f)
        if f in GPU_INT_FIELDS:
            out[f] = _int_or_none(v)
        elif f in ("supportedTaskTypes", "metadata"):
            out[f] = json.loads(v) if v else ([] if f == "supportedTaskTypes" else {})
        else:
            out[f] = v if v not in (None, "") else None
    out["currentTasks"] = current_tasks
    return out


#: The characters a JSON text can start with (json.loads also takes NaN and Infinity).
_JSON_START = frozenset('{["-0123456789tfnNI \t\r\n')


def parse_json_or_text(value: str | None) -> Any:
    """A payload / result as JSON when it parses, else the raw string."""
    if value is None:
        return None
    if not value or value[0] not in _JSON_START:  # text: skip the costly failed parse
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def json_text(value: Any) -> str:
    """A payload / result as stored: strings as they are, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
