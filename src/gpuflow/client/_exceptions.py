"""Every error the client raises, one class per way a call can fail.

::

    GpuflowError            base: .status (HTTP status, None without an answer), .message
    ├── AuthError           401 no or unknown API key; 403 the key's role may not do this
    ├── NotFoundError       404 unknown id (a client key also gets 404 for others' tasks)
    ├── ConflictError       409 wrong state, stale attempt, duplicate report
    ├── ValidationError     400 bad input, 413 payload too large, 422
    ├── ServerError         5xx (503: the API cannot reach Redis)
    ├── TransportError      no answer at all: connection refused, DNS, timeout, reset
    └── WaitTimeout         wait() / follow() ran out of time (also a builtin TimeoutError)

Any other status (429, 405 …) raises a plain ``GpuflowError`` carrying that status.
``.message`` is the API's own ``message`` from the ``{code, message, data}`` envelope.
"""

from __future__ import annotations


class GpuflowError(Exception):
    """A call failed; ``status`` is the HTTP status (None when no answer came back)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, message={self.message!r})"


class AuthError(GpuflowError):
    """401: no or unknown API key; 403: the key's role may not do this."""


class NotFoundError(GpuflowError):
    """404: unknown task, GPU or route."""


class ConflictError(GpuflowError):
    """409: the call does not fit the current state (e.g. a task that is not running)."""


class ValidationError(GpuflowError):
    """400 / 413 / 422: the request was refused as bad input; nothing was written."""


class ServerError(GpuflowError):
    """5xx: the server failed; an idempotent call may be tried again later."""


class TransportError(GpuflowError):
    """No HTTP answer: refused connection, DNS failure, timeout, connection reset."""


class WaitTimeout(GpuflowError, TimeoutError):
    """``wait()`` / ``follow()`` reached its timeout before the task ended."""


_BY_STATUS: dict[int, type[GpuflowError]] = {
    400: ValidationError,
    401: AuthError,
    403: AuthError,
    404: NotFoundError,
    409: ConflictError,
    413: ValidationError,
    422: ValidationError,
}


def error_for(status: int, message: str) -> GpuflowError:
    """The exception for an HTTP error ``status`` with the API's ``message``."""
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else GpuflowError)
    return cls(message, status)
