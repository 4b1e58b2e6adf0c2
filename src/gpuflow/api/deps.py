"""Dependencies: the process's System and the caller's Principal, as Annotated aliases."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from gpuflow.core.apikeys import Principal, Role
from gpuflow.core.errors import Forbidden, NotFound, Unauthorized
from gpuflow.core.system import System

_bearer = HTTPBearer(auto_error=False, description="An API key as a Bearer token.")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key.")


async def get_system(request: Request) -> System:
    # async on purpose: a plain def dependency would cost a threadpool hop per request.
    system: System = request.app.state.system
    return system


SystemDep = Annotated[System, Depends(get_system)]


async def get_principal(
    system: SystemDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_header)],
) -> Principal:
    key = header or (bearer.credentials if bearer else None)
    if not key:
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>` or `X-API-Key`")
    principal = await system.keys.lookup(key)
    if principal is None:
        raise Unauthorized("unknown API key")
    return principal


def allow(*roles: Role) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency that lets only ``roles`` through (admin always passes)."""
    allowed = {Role.ADMIN, *roles}

    async def check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if principal.role not in allowed:
            names = ", ".join(sorted(r.value for r in allowed))
            raise Forbidden(f"role {principal.role.value} may not do this (needs {names})")
        return principal

    return check


Reader = Annotated[Principal, Depends(allow(Role.VIEWER, Role.WORKER, Role.CLIENT))]
FleetReader = Annotated[Principal, Depends(allow(Role.VIEWER, Role.WORKER))]
Submitter = Annotated[Principal, Depends(allow(Role.CLIENT))]
WorkerRole = Annotated[Principal, Depends(allow(Role.WORKER))]
Admin = Annotated[Principal, Depends(allow())]


async def check_task_access(system: System, principal: Principal, task_id: str) -> None:
    """A client sees only its own user's tasks; others get 404, as if it did not exist."""
    owner = await system.tasks.owner_of(task_id)
    if principal.role is Role.CLIENT and owner != principal.user_id:
        raise NotFound(f"task {task_id} not found")
