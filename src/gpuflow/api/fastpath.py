"""A lean path for the worker protocol's heartbeats, in front of FastAPI's routing.

10,000 GPUs beating every 5 s over HTTP are 2,000 requests a second, and through FastAPI's
route matching, dependency resolution and request objects one heartbeat costs the api
several times what its Redis call costs. :class:`HeartbeatFastPath` answers the common case
itself (an authorized key and a body that ``HeartbeatIn`` accepts, or no body; or, for the
batch endpoint ``POST /api/v2/gpus/heartbeats``, a body that ``HeartbeatsIn`` accepts), with
the same models, the same domain calls and the same envelopes as the routes in
``api/routes_gpus.py``. Everything else (no or unknown key, a role that may not beat, a body
the model refuses, chunked or oversized bodies, query strings) goes on to that route
untouched, so every error answer has one definition. The route also stays what the OpenAPI
document describes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

from pydantic import ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpuflow.api.deps import credential
from gpuflow.api.envelope import envelope, error_for
from gpuflow.api.routes_gpus import beat_answers
from gpuflow.api.schemas import HeartbeatIn, HeartbeatsIn
from gpuflow.core.apikeys import Principal, Role
from gpuflow.core.system import System

PREFIX = "/api/v2/gpus/"
SUFFIX = "/heartbeat"
BATCH_PATH = "/api/v2/gpus/heartbeats"
#: Bodies up to this size take the fast path (a full ``running`` list is far smaller);
#: larger ones go to the route, behind the app's body limit.
MAX_BODY = 1 << 20
ROLES = frozenset({Role.ADMIN, Role.WORKER})
T = TypeVar("T")
_AUTH_HEADERS = {b"x-api-key": "x-api-key", b"authorization": "authorization"}


class HeartbeatFastPath:
    """ASGI middleware: ``POST /api/v2/gpus/{gpuId}/heartbeat`` and ``POST
    /api/v2/gpus/heartbeats`` without FastAPI's per-request machinery; counts the requests
    it answered in ``app.state.fast_heartbeats``."""

    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY) -> None:
        self.app = app
        self.max_body = min(max_body, MAX_BODY)  # never past the app's body limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        batch = _is_post(scope) and scope["path"] == BATCH_PATH
        gpu_id = None if batch else _heartbeat_gpu(scope)
        if gpu_id is None and not batch:
            await self.app(scope, receive, send)
            return
        key, length, json_body = read_headers(scope["headers"])
        if (
            key is None
            or length is None
            or length > self.max_body
            or (length and not json_body)
            or (batch and not length)
        ):
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        system: System = state.system
        parse = partial(_beat_call, system, gpu_id)
        taken = await validated_body(self.app, scope, receive, send, key, ROLES, parse)
        if taken is None:
            return
        _, call = taken
        state.fast_heartbeats = getattr(state, "fast_heartbeats", 0) + 1
        await (await call())(scope, receive, send)


async def authorized_body(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, key: str, roles: frozenset[Role]
) -> tuple[Principal, bytes] | None:
    """The caller's principal and the request body, for a key of one of ``roles``; None
    once the request is answered: 503 as the route would when the lookup fails, the route
    itself for an unknown key or another role (its 401 / 403), nothing when the client
    went away."""
    system: System = scope["app"].state.system
    try:
        principal = await system.keys.lookup(key)
    except Exception as exc:
        await error_for(exc)(scope, receive, send)  # the route's answer (503 if Redis is down)
        return None
    if principal is None or principal.role not in roles:
        await app(scope, receive, send)  # the route answers 401 / 403
        return None
    body = await read_body(receive)
    if body is None:
        return None  # the client went away
    return principal, body


async def validated_body(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    key: str,
    roles: frozenset[Role],
    parse: Callable[[bytes], T],
) -> tuple[Principal, T] | None:
    """:func:`authorized_body`, then ``parse`` of the body (a model's ``validate_json``); a
    body the model refuses goes to the route, for its 400. None once the request is
    answered. Shared by the fast paths."""
    taken = await authorized_body(app, scope, receive, send, key, roles)
    if taken is None:
        return None
    principal, body = taken
    try:
        return principal, parse(body)
    except ValidationError:
        await app(scope, replay(body, receive), send)
        return None


def _is_post(scope: Scope) -> bool:
    """A POST without a query string (those go to the route)."""
    return scope["type"] == "http" and scope["method"] == "POST" and not scope.get("query_string")


def _heartbeat_gpu(scope: Scope) -> str | None:
    """The gpuId of a single heartbeat request this path may answer, else None."""
    if not _is_post(scope):
        return None
    path: str = scope["path"]
    if not (path.startswith(PREFIX) and path.endswith(SUFFIX)):
        return None
    gpu_id = path[len(PREFIX) : -len(SUFFIX)]
    return gpu_id if gpu_id and "/" not in gpu_id else None


def read_headers(raw: list[tuple[bytes, bytes]]) -> tuple[str | None, int | None, bool]:
    """(API key, declared Content-Length, whether the body is declared JSON)."""
    auth: dict[str, str] = {}
    length: int | None = None
    json_body = False
    for name, value in raw:
        if name in _AUTH_HEADERS:
            auth.setdefault(_AUTH_HEADERS[name], value.decode("latin-1"))  # the first, as Starlette
        elif name == b"content-length":
            length = int(value) if value.isdigit() else None
        elif name == b"content-type":
            json_body = value.split(b";", 1)[0].strip().lower() == b"application/json"
        elif name == b"transfer-encoding":
            return None, None, False  # chunked: the route reads it, behind the body limit
    return credential(auth), length, json_body


async def read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Callable[[], Awaitable[Message]]:
    """A ``receive`` that hands the route the body this path already read."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _beat_call(
    system: System, gpu_id: str | None, body: bytes
) -> Callable[[], Awaitable[Response]]:
    """The answer to come for one heartbeat request (``gpu_id`` None: the batch endpoint);
    raises ValidationError, before any effect, for a body the route must refuse."""
    if gpu_id is None:
        beats = HeartbeatsIn.model_validate_json(body)
        return partial(_beats, system, beats)
    running: dict[str, int] | None = None
    if body:
        beat = HeartbeatIn.model_validate_json(body)
        running = {t.taskId: t.attempt for t in beat.running}
    return partial(_beat, system, gpu_id, running)


async def _beats(system: System, beats: HeartbeatsIn) -> Response:
    """The batch route's answer, and its error answers."""
    try:
        return envelope(await beat_answers(system, beats))
    except Exception as exc:
        return error_for(exc)


async def _beat(system: System, gpu_id: str, running: dict[str, int] | None) -> Response:
    """The route's answer, and its error answers, for one heartbeat."""
    try:
        if running is None:
            await system.gpus.heartbeat(gpu_id)
            return envelope("heartbeat updated")
        reply = await system.gpus.heartbeat(gpu_id, running)
        return envelope({"status": reply.status, "stop": reply.stop})
    except Exception as exc:
        return error_for(exc)
