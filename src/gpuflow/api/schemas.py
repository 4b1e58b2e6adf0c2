"""Request and response models: the seed's camelCase shapes, strict on input."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict

from gpuflow.core.apikeys import Role
from gpuflow.core.models import MAX_BEATS, TaskStatus, Tier

JsonValue = dict[str, Any] | list[Any] | str | int | float | bool | None


def _json_integer(value: Any) -> Any:
    """JSON Schema's integer: 2 and 2.0, never "2" or true."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("Input should be a valid integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("Input should be a valid integer, got a fraction")
        return int(value)
    return value


# Strict scalars: a wrongly typed JSON field ("2" for 2, 1 for true) is refused, not coerced.
INTEGER = BeforeValidator(_json_integer)
SInt = Annotated[int, INTEGER]  # constraints go before INTEGER: Annotated[int, Field(..), INTEGER]
SStr = Annotated[str, Strict()]
SBool = Annotated[bool, Strict()]


class Input(BaseModel):
    """Input models: unknown fields are ignored, scalars are strict."""

    model_config = ConfigDict(extra="ignore")


class TaskCreate(Input):
    taskType: SInt = Field(ge=0, le=1_000_000, description="Task type code.")
    userId: SStr | None = Field(default=None, max_length=128)
    app: SStr | None = Field(default=None, max_length=128)
    priority: SInt = Field(default=0, ge=0, le=100, description=">= vipPriority (2) goes VIP.")
    payload: JsonValue = Field(
        default="", description="A string (kept as is) or any JSON value (stored as JSON text)."
    )
    env: SStr | None = Field(default=None, max_length=64)
    maxRetries: Annotated[int, Field(ge=0, le=100), INTEGER] | None = None
    timeout: Annotated[int, Field(ge=1000, le=86_400_000), INTEGER] | None = Field(
        default=None, description="ms"
    )


class TaskCreated(BaseModel):
    taskId: str
    displayId: int
    status: TaskStatus
    estimatedWaitTime: int = Field(description="Seconds; -1 when no active GPU serves the type.")


class TaskOut(BaseModel):
    """The seed's TaskDO, plus tier, attempt (fencing token) and progress."""

    taskId: str
    displayId: int
    taskType: int
    status: TaskStatus
    userId: str | None
    app: str | None
    priority: int
    gpuId: str | None
    payload: str | None
    result: str | None
    errorMessage: str | None
    retryCount: int
    maxRetries: int
    timeout: int
    estimatedWaitTime: int | None
    createdAt: int
    startedAt: int | None
    completedAt: int | None
    updatedAt: int
    env: str | None = None
    tier: Tier | None = None
    attempt: int = 0
    progress: int = 0
    progressMessage: str | None = None


class TaskProgressOut(BaseModel):
    taskId: str
    status: TaskStatus
    progress: int
    message: str | None
    estimatedRemainingTime: int
    gpuId: str | None
    startTime: int | None
    updateTime: int
    queuePosition: int = Field(description="1-based place in line while QUEUED, else 0.")


class TaskResultOut(BaseModel):
    taskId: str
    status: TaskStatus
    result: JsonValue = Field(description="Parsed JSON when the stored result is JSON.")
    errorMessage: str | None
    gpuId: str | None
    completedAt: int | None


class Report(Input):
    """Fields every worker report may carry; ``attempt`` fences off stale attempts."""

    gpuId: SStr | None = Field(default=None, max_length=128)
    attempt: Annotated[int, Field(ge=1), INTEGER] | None = None


class TaskStatusUpdate(Report):
    status: Literal["PROCESSING", "COMPLETED", "FAILED", "TIMEOUT", "QUEUED"] = Field(
        description="QUEUED hands the task back without counting a failure."
    )
    message: SStr | None = Field(default=None, description="Error text for FAILED / TIMEOUT.")
    retryable: SBool = True
    result: JsonValue = None


class TaskResultUpdate(Report):
    result: JsonValue = Field(description="A string (kept as is) or JSON (stored as JSON).")


class TaskProgressUpdate(Report):
    progress: SInt = Field(ge=0, le=100)
    message: SStr | None = Field(default=None, max_length=1000)


class GpuRegister(Input):
    gpuId: SStr = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")
    hostname: SStr = Field(default="", max_length=255)
    vastInsId: SStr = Field(default="", max_length=128)
    ip: SStr = Field(default="", max_length=64)
    port: Annotated[int, Field(ge=0, le=65535), INTEGER] | None = None
    supportedTaskTypes: list[Annotated[int, Field(ge=0, le=1_000_000), INTEGER]] = Field(
        min_length=1, max_length=256
    )
    supportedTaskPriority: Tier = Tier.NORMAL
    version: SStr = Field(default="", max_length=64)
    maxConcurrentTasks: SInt = Field(default=1, ge=1, le=1024)
    metadata: dict[str, Any] = Field(default_factory=dict)


class RunningTask(Input):
    taskId: SStr = Field(min_length=1, max_length=128)
    attempt: Annotated[int, Field(ge=1), INTEGER]


class HeartbeatIn(Input):
    """Optional: the tasks the node runs now. With it, the server renews exactly those
    leases, reaps the node's tasks it no longer runs, and answers which to stop."""

    running: list[RunningTask] = Field(max_length=4096)


class HeartbeatOut(BaseModel):
    status: str
    stop: list[str] = Field(description="Task ids the node must stop (canceled, timed out).")


class BeatIn(Input):
    gpuId: SStr = Field(min_length=1, max_length=128)
    running: list[RunningTask] | None = Field(
        default=None, max_length=4096, description="As in HeartbeatIn; absent: the seed's form."
    )


class HeartbeatsIn(Input):
    """The heartbeats of several nodes (all the GPUs of one agent) in one request."""

    beats: list[BeatIn] = Field(min_length=1, max_length=MAX_BEATS)


class BeatOut(BaseModel):
    """One node's answer: `code` 200 with `status` and `stop`, or the code and message the
    single-node endpoint would have answered (404: not registered)."""

    gpuId: str
    code: int
    message: str
    status: str | None = None
    stop: list[str] = Field(default_factory=list)


class GpuOut(BaseModel):
    """The seed's GpuNodeInfo, plus faultReason and registeredAt."""

    gpuId: str
    hostname: str | None
    vastInsId: str | None
    ip: str | None
    port: int | None
    supportedTaskTypes: list[int]
    supportedTaskPriority: Tier
    status: str
    lastHeartbeat: int | None
    failureCount: int | None
    taskFailureCount: int | None
    version: str | None
    currentTasks: int
    maxConcurrentTasks: int
    metadata: dict[str, Any]
    faultReason: str | None = None
    registeredAt: int | None = None


class KeyCreate(Input):
    role: Role
    userId: SStr | None = Field(default=None, max_length=128)
    name: SStr | None = Field(default=None, max_length=128)


class KeyOut(BaseModel):
    keyId: str
    role: Role
    userId: str | None
    name: str | None
    createdAt: int
    key: str | None = Field(default=None, description="Shown once, at creation.")


class HealthOut(BaseModel):
    status: Literal["UP", "DOWN"]
    redis: Literal["UP", "DOWN"]
    version: str


class TaskTypeIn(Input):
    name: SStr | None = Field(default=None, max_length=128)
    timeout: Annotated[int, Field(ge=1000, le=86_400_000), INTEGER] | None = Field(
        default=None, description="Default task timeout, ms."
    )
    maxRetries: Annotated[int, Field(ge=0, le=100), INTEGER] | None = None
    exclusive: SBool = Field(default=False, description="Tasks of this type need a GPU alone.")


class TaskTypeOut(BaseModel):
    taskType: int
    name: str | None
    timeout: int | None
    maxRetries: int | None
    exclusive: bool


class AlertOut(BaseModel):
    """The seed's AlertInfo."""

    id: str
    title: str
    message: str
    level: Literal["CRITICAL", "WARNING", "INFO"]
    status: Literal["ACTIVE", "ACKNOWLEDGED"]
    source: str
    timestamp: int
    acknowledgedAt: int | None
    acknowledgedBy: str | None


class AlertStats(BaseModel):
    total_alerts: int
    critical_alerts: int
    warning_alerts: int
    info_alerts: int
    acknowledged_alerts: int
    active_alerts: int


class GpuLockOut(BaseModel):
    gpuId: str
    locked: bool
    owner: str | None = Field(description="Task id holding the GPU alone.")
    ttlMs: int | None


class InstanceOut(BaseModel):
    instance_id: str
    status: str
    role: Literal["LEADER", "FOLLOWER", "WORKER"]
    last_heartbeat: int
    start_time: int
    version: str
    host: str
    pid: int


class ClusterStatus(BaseModel):
    cluster_id: str
    leader_instance: str | None
    total_instances: int
    active_instances: int
    instances: list[InstanceOut]
