"""Domain errors; the API maps each to one HTTP status in the envelope."""

from __future__ import annotations


class GpuflowError(Exception):
    """Base of every error the domain raises on purpose."""

    status_code = 400


class InvalidInput(GpuflowError):
    status_code = 400


class Unauthorized(GpuflowError):
    status_code = 401


class Forbidden(GpuflowError):
    status_code = 403


class NotFound(GpuflowError):
    status_code = 404


class Conflict(GpuflowError):
    """A transition refused: wrong state, stale attempt, duplicate report."""

    status_code = 409


class PayloadTooLarge(GpuflowError):
    status_code = 413


class Unavailable(GpuflowError):
    status_code = 503


class Damaged(GpuflowError):
    """A stored record a transition cannot work with (a field missing or malformed): the
    server's fault, not the caller's."""

    status_code = 500
