"""A lean path for ``POST /api/v2/tasks``, in front of FastAPI's routing.

Creating tasks is the API's busiest request. Through FastAPI's route matching, dependency
resolution and request objects, one create costs the api about as much again as its Redis
call and its own work. :class:`CreateFastPath` answers the common case itself (an authorized
submitter key, a JSON body that ``TaskCreate`` accepts, no query or only ``wait=<seconds>``)
with the same model, the same domain calls (``new_task_of`` and ``submit`` in
``api/routes_tasks.py``) and the same envelope as the route. Everything else (no or unknown
key, a role that may not create, an ``Idempotency-Key``, a body the model refuses, any
other query, chunked or oversized bodies) goes on to that route untouched, so every error
answer has one definition and the route stays what the OpenAPI document describes.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Receive, Scope, Send

from gpuflow.api.envelope import envelope, error_for
from gpuflow.api.fastpath import MAX_BODY, read_headers, validated_body
from gpuflow.api.routes_tasks import MAX_WAIT_S, new_task_of, submit
from gpuflow.api.schemas import TaskCreate
from gpuflow.core.apikeys import Role
from gpuflow.core.system import System

PATH = "/api/v2/tasks"
ROLES = frozenset({Role.ADMIN, Role.CLIENT})
#: The one query this path takes: ``wait`` as plain decimal seconds (anything else, the
#: route parses and, if need be, refuses).
_WAIT = re.compile(rb"wait=(\d{1,6}(?:\.\d{1,9})?)")


def _wait(query: bytes) -> float | None:
    """The request's ``wait`` (0 without a query), or None: the route's to parse."""
    if not query:
        return 0.0
    match = _WAIT.fullmatch(query)
    if match is None:
        return None
    wait = float(match.group(1))
    return wait if wait <= MAX_WAIT_S else None


class CreateFastPath:
    """ASGI middleware: ``POST /api/v2/tasks`` without FastAPI's per-request machinery;
    counts the requests it answered in ``app.state.fast_creates``."""

    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY) -> None:
        self.app = app
        self.max_body = min(max_body, MAX_BODY)  # never past the app's body limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != PATH:
            await self.app(scope, receive, send)
            return
        wait = _wait(scope.get("query_string", b""))
        key, length, json_body = read_headers(scope["headers"])
        if (
            wait is None
            or key is None
            or not length
            or length > self.max_body
            or not json_body
            or any(name == b"idempotency-key" for name, _ in scope["headers"])
        ):
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        system: System = state.system
        parse = TaskCreate.model_validate_json
        taken = await validated_body(self.app, scope, receive, send, key, ROLES, parse)
        if taken is None:
            return
        principal, task = taken
        state.fast_creates = getattr(state, "fast_creates", 0) + 1
        try:
            new = new_task_of(task, principal)
            answer = envelope(await submit(system, state.notifier, new, wait))
        except Exception as exc:
            answer = error_for(exc)
        await answer(scope, receive, send)
