"""/api/v2/cluster: the seed's cluster view, from the instance records and the leader lease."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from gpuflow.api.deps import FleetReader, SystemDep
from gpuflow.api.envelope import ERROR_RESPONSES, Envelope, envelope
from gpuflow.api.schemas import ClusterStatus, InstanceOut
from gpuflow.core.cluster import instances
from gpuflow.core.system import System

router = APIRouter(prefix="/api/v2/cluster", tags=["cluster"], responses=ERROR_RESPONSES)


async def _instances(system: System) -> tuple[str | None, list[dict[str, Any]]]:
    leader = await system.store.redis.get(system.store.keys.leader)
    rows = await instances(system.store)
    for r in rows:  # the lease, not a possibly stale self-report, says who leads
        if r["role"] in ("LEADER", "FOLLOWER"):
            r["role"] = "LEADER" if r["instance_id"] == leader else "FOLLOWER"
    return leader, rows


@router.get("/status", response_model=Envelope[ClusterStatus], summary="Cluster status")
async def status(system: SystemDep, _: FleetReader) -> Response:
    leader, rows = await _instances(system)
    return envelope(
        {
            "cluster_id": system.settings.namespace.rstrip(":"),
            "leader_instance": leader,
            "total_instances": len(rows),
            "active_instances": sum(r["status"] == "ACTIVE" for r in rows),
            "instances": rows,
        }
    )


@router.get("/instances", response_model=Envelope[list[InstanceOut]], summary="Instances")
async def list_instances(system: SystemDep, _: FleetReader) -> Response:
    """Every live process: api (LEADER / FOLLOWER) and worker agents (WORKER)."""
    return envelope((await _instances(system))[1])
