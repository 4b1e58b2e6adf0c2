"""The seed's response envelope ``{code, message, data}`` on every answer, errors included."""

from __future__ import annotations

import logging
from typing import Any, Generic, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from gpuflow.core.errors import GpuflowError

T = TypeVar("T")
log = logging.getLogger("gpuflow.api")


class Envelope(BaseModel, Generic[T]):
    code: int = 200
    message: str = "success"
    data: T


class ErrorEnvelope(BaseModel):
    code: int
    message: str
    data: None = None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope, "description": text}
    for status, text in (
        (400, "Bad input: the message names the field and the problem"),
        (401, "No or unknown API key"),
        (403, "The key's role may not do this"),
        (404, "Unknown id"),
        (409, "Conflict: wrong state, stale attempt or duplicate report"),
        (413, "Payload too large"),
        (503, "Redis is unavailable (Retry-After: 1)"),
    )
}


def envelope(data: Any, message: str = "success", code: int = 200) -> Response:
    body = orjson.dumps({"code": code, "message": message, "data": data})
    return Response(body, status_code=code, media_type="application/json")


def error(code: int, message: str, headers: dict[str, str] | None = None) -> Response:
    resp = envelope(None, message, code)
    if headers:
        resp.headers.update(headers)
    return resp


def _describe(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
    where = ".".join(loc)
    if err.get("type") == "json_invalid":
        return "malformed JSON body: " + str(err.get("ctx", {}).get("error", err.get("msg")))
    if err.get("type") == "missing" and not loc:
        return "request body is required"
    if err.get("type") in ("model_attributes_type", "dict_type") and not loc:
        return "request body must be a JSON object (Content-Type: application/json)"
    return f"{where}: {err.get('msg')}" if where else str(err.get("msg"))


#: The Redis errors that mean "unavailable, retry" rather than a bug.
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, BusyLoadingError)


def error_for(exc: Exception) -> Response:
    """The answer to an exception a request let through: a domain error's own status, 503
    (Retry-After: 1) while Redis is unavailable, else 500. The app's handlers and the
    heartbeat fast path (api/fastpath.py) both answer with it."""
    if isinstance(exc, GpuflowError):
        return error(exc.status_code, str(exc))
    if isinstance(exc, _REDIS_DOWN):
        log.warning("Redis unavailable: %s", exc)
        return error(503, "Redis is unavailable; retry shortly", {"Retry-After": "1"})
    log.error("unhandled error", exc_info=exc)
    return error(500, f"internal error: {type(exc).__name__}")


async def _answer(_: Request, exc: Exception) -> Response:
    return error_for(exc)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        return error(400, "; ".join(_describe(e) for e in exc.errors()[:5]))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        return error(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    for kind in (GpuflowError, *_REDIS_DOWN, Exception):
        app.add_exception_handler(kind, _answer)
