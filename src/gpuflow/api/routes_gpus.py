"""/api/v2/gpus: the node registry, and the claim long-poll of the HTTP worker protocol."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.responses import Response

from gpuflow.api.deps import Admin, FleetReader, SystemDep, WorkerRole
from gpuflow.api.envelope import ERROR_RESPONSES, Envelope, envelope
from gpuflow.api.schemas import GpuOut, GpuRegister, HeartbeatIn, HeartbeatOut, TaskOut
from gpuflow.core.gpus import GpuSpec
from gpuflow.core.models import GpuStatus, Tier

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
