"""API keys (admin only) and the unauthenticated health check."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from gpuflow import __version__
from gpuflow.api.deps import Admin, SystemDep
from gpuflow.api.envelope import ERROR_RESPONSES, Envelope, envelope
from gpuflow.api.schemas import HealthOut, KeyCreate, KeyOut

router = APIRouter(responses=ERROR_RESPONSES)


@router.post("/api/v2/keys", response_model=Envelope[KeyOut], tags=["keys"], summary="New key")
async def create_key(body: KeyCreate, system: SystemDep, _: Admin) -> Response:
    """The key is returned once and stored only as a hash. A `client` key needs a userId."""
    return envelope(await system.keys.create(body.role, body.userId, body.name))


@router.get("/api/v2/keys", response_model=Envelope[list[KeyOut]], tags=["keys"])
async def list_keys(system: SystemDep, _: Admin) -> Response:
    """Every key's id, role and user (never the key itself)."""
    return envelope(await system.keys.all())


@router.get(
    "/health",
    response_model=Envelope[HealthOut],
    tags=["health"],
    responses={503: {"model": Envelope[HealthOut], "description": "Redis unreachable"}},
)
async def health(system: SystemDep) -> Response:
    """200 once Redis answers, 503 otherwise. Needs no key."""
    up = await system.ping()
    data = {"status": "UP" if up else "DOWN", "redis": "UP" if up else "DOWN",
            "version": __version__}  # fmt: skip
    return envelope(data, "success" if up else "redis unreachable", 200 if up else 503)
