"""/api/v2/gpus: the node registry, and the claim long-poll of the HTTP worker protocol."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from starlette.responses import Response

from gpuflow.api.deps import Admin, FleetReader, SystemDep, WorkerRole
from gpuflow.api.envelope import ERROR_RESPONSES, Envelope, envelope
from gpuflow.api.schemas import (
    BeatOut,
    GpuOut,
    GpuRegister,
    HeartbeatIn,
    HeartbeatOut,
    HeartbeatsIn,
    TaskOut,
)
from gpuflow.core.errors import GpuflowError
from gpuflow.core.gpus import GpuSpec
from gpuflow.core.models import GpuStatus, Tier
from gpuflow.core.system import System

router = APIRouter(prefix="/api/v2/gpus", tags=["gpus"], responses=ERROR_RESPONSES)
GpuId = Annotated[str, "GPU id"]


@router.get("", response_model=Envelope[list[GpuOut]], summary="List GPU nodes")
async def list_gpus(system: SystemDep, _: FleetReader) -> Response:
    return envelope(await system.gpus.all())


@router.get(
    "/by-task-type/{taskType}",
    response_model=Envelope[list[GpuOut]],
    summary="GPU nodes that serve a task type",
)
async def by_task_type(
    taskType: int, system: SystemDep, _: FleetReader, priority: Tier | None = None
) -> Response:
    """With `priority=VIP`: every node of that type (NORMAL nodes take VIP first);
    with `priority=NORMAL`: NORMAL nodes only (VIP nodes take only VIP tasks)."""
    return envelope(await system.gpus.by_task_type(taskType, priority))


@router.get("/{gpuId}", response_model=Envelope[GpuOut], summary="One GPU node")
async def get_gpu(gpuId: GpuId, system: SystemDep, _: FleetReader) -> Response:
    return envelope(await system.gpus.get(gpuId))


@router.post("/register", response_model=Envelope[str], summary="Register a GPU node")
async def register(body: GpuRegister, system: SystemDep, _: WorkerRole) -> Response:
    """Registering again updates the node; a FAULTY node stays FAULTY until recovered."""
    await system.gpus.register(
        GpuSpec(
            gpu_id=body.gpuId,
            supported_task_types=body.supportedTaskTypes,
            supported_task_priority=body.supportedTaskPriority,
            max_concurrent_tasks=body.maxConcurrentTasks,
            hostname=body.hostname,
            ip=body.ip,
            port=body.port,
            version=body.version,
            vast_ins_id=body.vastInsId,
            metadata=body.metadata,
        )
    )
    return envelope("GPU registered")


@router.post("/heartbeats", response_model=Envelope[list[BeatOut]], summary="Heartbeat many nodes")
async def heartbeats(body: HeartbeatsIn, system: SystemDep, _: WorkerRole) -> Response:
    """The heartbeats of several nodes (an agent beats for all its GPUs at once) in one
    request; each applies as if sent alone to `/{gpuId}/heartbeat`, in order, and gets its
    own answer in `data`, in the same order: `code` 200 with `status` and `stop`, or the
    code and message that endpoint would have answered (404: not registered; register it
    again). The request itself fails only as a whole (401, 403, 400, 503)."""
    return envelope(await beat_answers(system, body))


async def beat_answers(system: System, body: HeartbeatsIn) -> list[dict[str, Any]]:
    """The ``data`` of a batch heartbeat; shared with the fast path (api/fastpath.py)."""
    beats = [
        (b.gpuId, None if b.running is None else {t.taskId: t.attempt for t in b.running})
        for b in body.beats
    ]
    replies = await system.gpus.heartbeats(beats)
    out: list[dict[str, Any]] = []
    for (gpu_id, _), reply in zip(beats, replies, strict=True):
        if isinstance(reply, GpuflowError):
            out.append(
                {"gpuId": gpu_id, "code": reply.status_code, "message": str(reply), "stop": []}
            )
        else:
            out.append(
                {"gpuId": gpu_id, "code": 200, "message": "heartbeat updated",
                 "status": reply.status, "stop": reply.stop}
            )  # fmt: skip
    return out


@router.post("/{gpuId}/heartbeat", response_model=Envelope[str | HeartbeatOut], summary="Heartbeat")
async def heartbeat(
    gpuId: GpuId, system: SystemDep, _: WorkerRole, body: HeartbeatIn | None = None
) -> Response:
    """Refreshes `lastHeartbeat` and brings an OFFLINE node back. Without a body (the seed's
    form) it renews the leases of all the node's tasks and answers a string; with
    `{"running": [{taskId, attempt}]}` it renews those, reaps the node's other tasks and
    answers `{status, stop}`: the listed tasks the node must stop."""
    if body is None:
        await system.gpus.heartbeat(gpuId)
        return envelope("heartbeat updated")
    running = {t.taskId: t.attempt for t in body.running}
    reply = await system.gpus.heartbeat(gpuId, running)
    return envelope({"status": reply.status, "stop": reply.stop})


@router.post("/{gpuId}/fault", response_model=Envelope[str], summary="Mark a GPU FAULTY")
async def fault(
    gpuId: GpuId,
    system: SystemDep,
    _: WorkerRole,
    reason: Annotated[str, Query(max_length=500)] = "",
) -> Response:
    await system.gpus.set_status(gpuId, GpuStatus.FAULTY, reason or "marked faulty")
    return envelope("GPU marked FAULTY")


@router.post("/{gpuId}/recover", response_model=Envelope[str], summary="Recover a GPU")
async def recover(gpuId: GpuId, system: SystemDep, _: Admin) -> Response:
    """Back to ACTIVE, with failureCount and taskFailureCount reset."""
    await system.gpus.set_status(gpuId, GpuStatus.ACTIVE)
    return envelope("GPU recovered")


@router.delete("/{gpuId}", response_model=Envelope[str], summary="Unregister a GPU")
async def unregister(gpuId: GpuId, system: SystemDep, _: Admin) -> Response:
    """Its running tasks go back to their queues."""
    requeued = await system.gpus.delete(gpuId)
    return envelope(f"GPU unregistered ({requeued} running tasks requeued)")


@router.post(
    "/{gpuId}/claim", response_model=Envelope[list[TaskOut]], summary="Claim tasks (long-poll)"
)
async def claim(
    gpuId: GpuId,
    system: SystemDep,
    _: WorkerRole,
    wait: Annotated[float, Query(ge=0, le=3600, description="Seconds to wait for work")] = 20,
    recover: Annotated[bool, Query(description="Re-deliver this node's unstarted claims")] = False,
) -> Response:
    """Starts up to the node's free capacity of tasks (VIP first) and returns them, each
    with its `attempt` to quote in reports. With nothing queued it waits up to `wait`
    seconds (capped by GPUFLOW_CLAIM_WAIT_MAX_S) and returns an empty list."""
    wait_s = min(wait, system.settings.claim_wait_max_s)
    return envelope(await system.dispatch.claim(gpuId, wait_s, recover=recover))
