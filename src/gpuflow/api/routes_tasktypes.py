"""/api/v2/task-types: per-type defaults (timeout, maxRetries) and the exclusive-GPU flag."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from starlette.responses import Response

from gpuflow.api.deps import Admin, Reader, SystemDep
from gpuflow.api.envelope import ERROR_RESPONSES, Envelope, envelope
from gpuflow.api.schemas import TaskTypeIn, TaskTypeOut
from gpuflow.core.tasktypes import TaskTypeConfig

router = APIRouter(prefix="/api/v2/task-types", tags=["task types"], responses=ERROR_RESPONSES)
TaskType = Annotated[int, Path(ge=0, le=1_000_000)]


@router.get("", response_model=Envelope[list[TaskTypeOut]], summary="Configured task types")
async def list_types(system: SystemDep, _: Reader) -> Response:
    return envelope([t.view() for t in await system.task_types.all()])


@router.get("/{taskType}", response_model=Envelope[TaskTypeOut], summary="One task type")
async def get_type(taskType: TaskType, system: SystemDep, _: Reader) -> Response:
    return envelope((await system.task_types.require(taskType)).view())


@router.put("/{taskType}", response_model=Envelope[TaskTypeOut], summary="Configure a type")
async def put_type(taskType: TaskType, body: TaskTypeIn, system: SystemDep, _: Admin) -> Response:
    """Defaults for tasks of this type that do not set their own `timeout` / `maxRetries`
    (system defaults: GPUFLOW_DEFAULT_TIMEOUT_MS, GPUFLOW_DEFAULT_MAX_RETRIES). With
    `exclusive`, a task of this type runs alone on its GPU: it holds the GPU's lock (renewed
    by heartbeats, released when the task ends, expiring when its worker dies)."""
    cfg = TaskTypeConfig(taskType, body.name or "", body.timeout, body.maxRetries, body.exclusive)
    await system.task_types.put(cfg)
    return envelope(cfg.view())
