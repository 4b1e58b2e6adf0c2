"""How an agent talks to the system: directly through Redis, or only through the HTTP API.

Both transports speak the same small protocol, so the agent never knows which one it has.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(slots=True)
class NodeSpec:
    """A GPU node as the agent registers it (one per GPU / simulated GPU)."""

    gpu_id: str
    supported_task_types: list[int]
    supported_task_priority: str = "NORMAL"
    max_concurrent_tasks: int = 1
    hostname: str = ""
    ip: str = ""
    port: int | None = None
    version: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Device index the node's executors are pinned to (``CUDA_VISIBLE_DEVICES``); local only.
    gpu_index: int | None = None


def _int(value: str) -> int:
    """A stored number ('' and missing: 0), as the task view reads it."""
    return int(float(value)) if value else 0


@dataclass(slots=True)
class ClaimedTask:
    """A task started on a node: what the handler sees, plus the fencing ``attempt``."""

    task_id: str
    task_type: int
    attempt: int
    gpu_id: str
    payload: str
    priority: int = 0
    display_id: int = 0
    user_id: str | None = None
    app: str | None = None
    timeout_ms: int = 300_000
    retry_count: int = 0
    max_retries: int = 3

    @classmethod
    def from_row(cls, row: list[str]) -> ClaimedTask:
        """From a compact claim's row (``core/dispatch.py``: COMPACT_FIELDS), as
        ``from_view`` of that row's view gives, without building the view."""
        tid, ttype, attempt, gpu, payload, prio, display, user, app, tmo, retries, most = row
        return cls(
            task_id=tid,
            task_type=int(ttype),
            attempt=int(attempt),
            gpu_id=gpu,
            payload=payload,
            priority=_int(prio),
            display_id=_int(display),
            user_id=user or None,
            app=app or None,
            timeout_ms=_int(tmo) or 300_000,
            retry_count=_int(retries),
            max_retries=_int(most),
        )

    @classmethod
    def from_view(cls, view: dict[str, Any]) -> ClaimedTask:
        """From a TaskDO-shaped dict (the claim script's and the HTTP claim's output)."""
        return cls(
            task_id=view["taskId"],
            task_type=int(view["taskType"]),
            attempt=int(view["attempt"]),
            gpu_id=view["gpuId"],
            payload=view.get("payload") or "",
            priority=int(view.get("priority") or 0),
            display_id=int(view.get("displayId") or 0),
            user_id=view.get("userId"),
            app=view.get("app"),
            timeout_ms=int(view.get("timeout") or 300_000),
            retry_count=int(view.get("retryCount") or 0),
            max_retries=int(view.get("maxRetries") or 0),
        )


class Transport(Protocol):
    """What the agent needs from the system. Every report carries the attempt (fencing):
    a report for an attempt that is no longer current raises :class:`StaleAttempt`."""

    async def register(self, node: NodeSpec) -> None: ...

    async def heartbeat(self, gpu_id: str, running: Mapping[str, int]) -> list[str]:
        """Renew the node and the leases of ``running`` (task id → attempt: every task the
        node runs now). The server requeues the node's tasks not listed (lost) and returns
        the listed ones the node must stop (canceled, timed out, reassigned)."""
        ...

    async def claim(
        self, gpu_id: str, wait_s: float, *, recover: bool = False
    ) -> list[ClaimedTask]:
        """Start up to the node's free capacity of tasks; wait up to ``wait_s`` if none."""
        ...

    async def stop_waiting(self, gpu_id: str) -> bool:
        """The node stops claiming: tasks the system started for the node that it has not
        taken go back to their queues. True when a claim waiting for a task now returns
        soon (by itself, with what it already had); False: cancel it."""
        ...

    async def progress(self, task: ClaimedTask, percent: int, message: str | None) -> None: ...

    async def complete(self, task: ClaimedTask, result: str) -> None: ...

    async def fail(self, task: ClaimedTask, error: str, *, retryable: bool = True) -> None: ...

    async def release(self, task: ClaimedTask) -> None:
        """Hand a started task back to its queue without counting a failure (shutdown)."""
        ...

    async def time_out(self, task: ClaimedTask, error: str) -> None:
        """Record that the attempt ran past the task's timeout (retried while retries last)."""
        ...

    async def presence(self, stop: asyncio.Event) -> None:
        """Publish this process as a cluster instance until ``stop`` is set (through Redis;
        over HTTP the API processes are the instances, and this returns at once)."""
        ...

    async def close(self) -> None: ...


class StaleAttempt(Exception):
    """The system refused a report: the attempt was fenced off (409)."""


class TransportError(Exception):
    """The system could not be reached (connection refused or dropped, timeout, 5xx).

    Heartbeat and claim are retried with backoff; reports are retried a few times, which is
    safe because each carries the attempt: a repeated report lands once or gets a 409."""


class TransportRejected(Exception):
    """The system refused a request for a reason a retry does not fix (401, 403, 422 ...)."""


class NodeUnknown(Exception):
    """The node is not registered (deleted by an operator, or a fresh store): register again."""
