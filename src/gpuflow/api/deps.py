"""Dependencies: the process's System and the caller's Principal, as Annotated aliases."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated

from fastapi import Depends, Request

from gpuflow.core.apikeys import Principal, Role
from gpuflow.core.errors import Forbidden, NotFound, Unauthorized
from gpuflow.core.system import System

#: The OpenAPI security schemes of every route but the public ones (see api/app.py). The
#: credential is read from the headers by :func:`get_principal` itself: FastAPI's security
#: dependencies cost a dependency resolution each on every request.
SECURITY_SCHEMES: dict[str, dict[str, str]] = {
    "HTTPBearer": {
        "type": "http",
        "description": "An API key as a Bearer token.",
        "scheme": "bearer",
    },
    "APIKeyHeader": {
        "type": "apiKey",
        "description": "An API key.",
        "in": "header",
        "name": "X-API-Key",
    },
}


async def get_system(request: Request) -> System:
    # async on purpose: a plain def dependency would cost a threadpool hop per request.
    system: System = request.app.state.system
    return system


SystemDep = Annotated[System, Depends(get_system)]


def credential(headers: Mapping[str, str]) -> str | None:
    """The API key of ``X-API-Key``, else of ``Authorization: Bearer`` (``headers`` keyed
    by lower-case name)."""
    key = headers.get("x-api-key")
    if key:
        return key
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


async def get_principal(request: Request) -> Principal:
    key = credential(request.headers)
    if not key:
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>` or `X-API-Key`")
    system: System = request.app.state.system
    principal = await system.keys.lookup(key)
    if principal is None:
        raise Unauthorized("unknown API key")
    return principal


def allow(*roles: Role) -> Callable[[Request], Awaitable[Principal]]:
    """A dependency that lets only ``roles`` through (admin always passes)."""
    allowed = {Role.ADMIN, *roles}

    async def check(request: Request) -> Principal:
        principal = await get_principal(request)
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


async def check_task_access(
    system: System, principal: Principal, task_id: str, *, confirm_exists: bool = False
) -> None:
    """A client sees only its own user's tasks; others get 404, as if it did not exist.
    Other roles see every task and pay no read here (the route's own read answers 404 for a
    missing task), unless ``confirm_exists``: for routes that answer before reading it."""
    if principal.role is not Role.CLIENT:
        if confirm_exists:
            await system.tasks.owner_of(task_id)
        return
    owner = await system.tasks.owner_of(task_id)
    if owner != principal.user_id:
        raise NotFound(f"task {task_id} not found")
