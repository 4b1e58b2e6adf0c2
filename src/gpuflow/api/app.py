"""The FastAPI application factory: routers, envelope handlers, lifespan resources."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from gpuflow import __version__
from gpuflow.api import (
    routes_admin,
    routes_cluster,
    routes_gpus,
    routes_monitoring,
    routes_tasks,
    routes_tasktypes,
)
from gpuflow.api.deps import SECURITY_SCHEMES
from gpuflow.api.envelope import error, install_error_handlers
from gpuflow.api.fastpath import HeartbeatFastPath
from gpuflow.api.fastpath_create import CreateFastPath
from gpuflow.config import Settings
from gpuflow.core.cluster import Membership, new_instance_id
from gpuflow.core.leader import Leadership
from gpuflow.core.loops import Maintenance
from gpuflow.core.notify import TaskNotifier
from gpuflow.core.system import System

DESCRIPTION = """
gpuflow's HTTP API. Every response is the envelope `{code, message, data}` with `code` equal
to the HTTP status. Authenticate with `Authorization: Bearer <key>` or `X-API-Key: <key>`.
Timestamps are epoch milliseconds.
"""


def create_app(
    settings: Settings, redis_url: str, *, background: bool = True, fast_paths: bool = True
) -> FastAPI:
    """An app bound to one Redis; ``background`` campaigns for leadership and, while
    leading, runs the maintenance loops in-process. ``fast_paths`` answers heartbeats and
    creates without FastAPI's routing (api/fastpath.py, api/fastpath_create.py); off, the
    routes answer them all."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        system = System.connect(redis_url, settings)
        instance_id = new_instance_id("api")
        leadership = Leadership(system.store, instance_id)
        app.state.system = system
        app.state.leadership = leadership
        notifier = TaskNotifier(redis_url, settings.namespace)
        notifier.start()
        app.state.notifier = notifier
        stop = asyncio.Event()
        membership = Membership(
            system.store,
            instance_id,
            lambda: "LEADER" if leadership.is_leader else "FOLLOWER",
        )
        loops = [asyncio.create_task(membership.run(stop))]
        if background:
            maintenance = Maintenance(system, leadership)
            loops += [
                asyncio.create_task(leadership.run(stop)),
                asyncio.create_task(maintenance.run(stop)),
            ]
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*loops, return_exceptions=True)
            await notifier.close()
            await system.close()

    app = GpuflowApp(
        title="gpuflow",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    install_error_handlers(app)
    limit = settings.max_payload_bytes * 2 + 65_536
    app.add_middleware(BodyLimit, limit=limit)
    if fast_paths:
        app.fast = CreateFastPath(HeartbeatFastPath(app.full_call, max_body=limit), max_body=limit)

    for module in (
        routes_tasks,
        routes_gpus,
        routes_tasktypes,
        routes_monitoring,
        routes_cluster,
        routes_admin,
    ):
        app.include_router(module.router)
    _document_400_not_422(app)
    return app


class GpuflowApp(FastAPI):
    """FastAPI with the two hot POSTs (create, heartbeat) answered ahead of its per-request
    machinery: the telemetry provider checks FastAPI makes on every request, Starlette's
    middleware stack and its error middleware (each fast path answers its own errors, and
    hands every other request to :meth:`full_call`, the whole stack)."""

    fast: ASGIApp | None = None

    async def full_call(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fast is not None and scope["type"] == "http" and scope["method"] == "POST":
            scope["app"] = self
            await self.fast(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


#: Routes that need no credential (every other one answers 401 without one).
PUBLIC_PATHS = frozenset({"/health"})


def _document_400_not_422(app: FastAPI) -> None:
    """Validation errors answer 400 in the envelope: drop FastAPI's default 422 entries. Add
    the security requirement of every route but the public ones (checked in api/deps.py)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for path, item in schema.get("paths", {}).items():
                for op in item.values():
                    op.get("responses", {}).pop("422", None)
                    if path not in PUBLIC_PATHS:
                        op["security"] = [{name: []} for name in SECURITY_SCHEMES]
            schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class BodyLimit:
    """Refuse a declared Content-Length over ``limit`` with 413. A plain ASGI middleware:
    Starlette's BaseHTTPMiddleware costs a task group and streams per request."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"content-length":
                    if value.isdigit() and int(value) > self.limit:
                        resp = error(413, f"request body over {self.limit} bytes")
                        await resp(scope, receive, send)
                        return
                    break
        await self.app(scope, receive, send)
