"""Alerts (seed 002 §4) and the GPU lock endpoints (seed 000, /api/v1/monitoring)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from starlette.responses import Response

from gpuflow.api.deps import Admin, FleetReader, SystemDep
from gpuflow.api.envelope import ERROR_RESPONSES, Envelope, envelope
from gpuflow.api.schemas import AlertOut, AlertStats, GpuLockOut

router = APIRouter(tags=["monitoring"], responses=ERROR_RESPONSES)
GpuIdQuery = Annotated[str, Query(min_length=1, max_length=128, description="GPU id")]


@router.get("/api/v2/monitoring/alerts", response_model=Envelope[list[AlertOut]], summary="Alerts")
async def list_alerts(
    system: SystemDep,
    _: FleetReader,
    level: Literal["CRITICAL", "WARNING", "INFO"] | None = None,
    status: Literal["ACTIVE", "ACKNOWLEDGED"] | None = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    size: Annotated[int, Query(ge=1, le=200)] = 20,
) -> Response:
    """Newest first; the total is in `X-Total-Count`."""
    rows, total = await system.alerts.list(level, status, page, size)
    resp = envelope(rows)
    resp.headers["X-Total-Count"] = str(total)
    return resp


@router.get(
    "/api/v2/monitoring/alerts/stats", response_model=Envelope[AlertStats], summary="Alert counts"
)
async def alert_stats(system: SystemDep, _: FleetReader) -> Response:
    return envelope(await system.alerts.stats())


@router.post(
    "/api/v2/monitoring/alerts/{alertId}/acknowledge",
    response_model=Envelope[str],
    summary="Acknowledge an alert",
)
async def acknowledge(alertId: str, system: SystemDep, who: Admin) -> Response:
    await system.alerts.acknowledge(alertId, who.key_id or who.role.value)
    return envelope("alert acknowledged")


@router.get(
    "/api/v1/monitoring/gpu-lock/status",
    response_model=Envelope[GpuLockOut],
    summary="A GPU's exclusive lock",
)
async def gpu_lock_status(gpuId: GpuIdQuery, system: SystemDep, _: FleetReader) -> Response:
    return envelope(await system.gpus.lock(gpuId))


@router.post(
    "/api/v1/monitoring/lock/release", response_model=Envelope[str], summary="Release a GPU lock"
)
async def release_lock(gpuId: GpuIdQuery, system: SystemDep, _: Admin) -> Response:
    """Frees the GPU for other tasks; the owner task keeps running until it ends."""
    owner = await system.gpus.release_lock(gpuId)
    return envelope(f"lock of {gpuId} released" + (f" (held by {owner})" if owner else ""))
