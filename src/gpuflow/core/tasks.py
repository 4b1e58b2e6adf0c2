"""Tasks: creation, reads, and the worker-side transitions (progress, finish, requeue)."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gpuflow.core.coalesce import Coalescer
from gpuflow.core.errors import (
    Conflict,
    Damaged,
    GpuflowError,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
)
from gpuflow.core.estimate import wait_seconds
from gpuflow.core.gpus import Gpus
from gpuflow.core.models import TaskStatus, Tier, parse_json_or_text, task_view
from gpuflow.core.tasktypes import TaskTypes
from gpuflow.store import Store

# Our own generator: jitter must not disturb (or be disturbed by) the global one.
_RNG = random.Random()
FINAL_OUTCOMES = (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.TIMEOUT)
#: Results longer than this (characters) are reported in a script call of their own.
BATCHED_TEXT_MAX = 64 * 1024


@dataclass(frozen=True, slots=True)
class Idempotency:
    """An ``Idempotency-Key``: scoped to the caller, bound to a hash of the request body."""

    scope: str
    key: str
    body_hash: str


@dataclass(frozen=True, slots=True)
class NewTask:
    task_type: int
    payload: str = ""
    user_id: str | None = None
    app: str | None = None
    priority: int = 0
    env: str | None = None
    max_retries: int | None = None
    timeout: int | None = None


def _raise_for(reply: list[Any], task_id: str) -> None:
    """Turn a script's {'NOTFOUND'} / {'CONFLICT', why} reply into the domain error."""
    if reply[0] == "NOTFOUND":
        raise NotFound(f"task {task_id} not found")
    if reply[0] == "CONFLICT":
        raise Conflict(f"task {task_id}: {reply[1]}")
    if reply[0] == "NOGPU":
        raise NotFound("GPU not registered")
    if reply[0] == "ERROR":
        raise Damaged(f"task {task_id}: its record is damaged: {reply[1]}")


def new_task_id() -> str:
    """A fresh task id; a caller that must watch a task before it exists takes one first."""
    return f"task_{uuid.uuid4().hex}"


def view_from_note(body: str) -> dict[str, Any]:
    """The task view a completion note carries (``emit`` in lib.lua: the hash's fields as a
    JSON array of field, value, ...), as :meth:`Tasks.get` gives it for a final task."""
    flat = orjson.loads(body)
    return task_view(dict(zip(flat[::2], flat[1::2], strict=True)))


def first_set(*values: int | None) -> int:
    """The task's own value, else its type's default, else the system default."""
    return next(v for v in values if v is not None)


def task_fields(new: NewTask, tier: Tier, max_retries: int, timeout: int) -> list[Any]:
    """The field / value pairs ``create_task`` stores for a new task, flat."""
    fields: dict[str, Any] = {
        "taskType": new.task_type,
        "tier": tier.value,
        "priority": new.priority,
        "payload": new.payload,
        "userId": new.user_id,
        "app": new.app,
        "env": new.env,
        "maxRetries": max_retries,
        "timeout": timeout,
    }
    # Empty optional fields are not stored (task_view reads a missing field as null).
    return [x for kv in fields.items() if kv[1] not in (None, "") for x in kv]


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


@dataclass(frozen=True, slots=True)
class Report:
    """The end of one attempt, as its worker reports it."""

    task_id: str
    outcome: TaskStatus
    text: str
    gpu_id: str | None = None
    attempt: int | None = None
    retryable: bool = True


class Tasks:
    """The task side of the domain, over one :class:`Store`."""

    def __init__(
        self,
        store: Store,
        gpus: Gpus,
        types: TaskTypes | None = None,
        *,
        report_timeout_s: float | None = None,
    ) -> None:
        self.store = store
        self.keys = store.keys
        self.settings = store.settings
        self.gpus = gpus
        self.types = types or TaskTypes(store)
        #: ``report_timeout_s``: how long a batch of reports (or a report that goes alone)
        #: may take; TimeoutError after that.
        self._report_timeout = report_timeout_s
        # A lone report goes at once (it ends an awaited task's wait); reports that pile up
        # behind it share calls.
        self._finisher: Coalescer[Report, TaskStatus] = Coalescer(
            self.finish_many, timeout_s=report_timeout_s, alone_first=True
        )

    def tier_of(self, priority: int) -> Tier:
        return Tier.VIP if priority >= self.settings.vip_priority else Tier.NORMAL

    async def create(
        self,
        new: NewTask,
        idempotency: Idempotency | None = None,
        task_id: str | None = None,
        *,
        awaited: bool = False,
    ) -> dict[str, Any]:
        """Queue a task (under ``task_id`` when given: see :func:`new_task_id`). With
        ``idempotency``, a repeat of the same key and request within
        ``GPUFLOW_IDEMPOTENCY_TTL_S`` returns the first task; another request: Conflict.
        ``awaited``: the caller awaits it, so its completion note carries its fields
        (:func:`view_from_note`)."""
        if len(new.payload.encode()) > self.settings.max_payload_bytes:
            raise PayloadTooLarge(f"payload is larger than {self.settings.max_payload_bytes} bytes")
        task_id = task_id or new_task_id()
        tier = self.tier_of(new.priority)
        cfg = await self.types.get(new.task_type)
        max_retries = first_set(new.max_retries, cfg.max_retries, self.settings.default_max_retries)
        timeout = first_set(new.timeout, cfg.timeout, self.settings.default_timeout_ms)
        flat = task_fields(new, tier, max_retries, timeout)
        if awaited:
            flat += ["awaited", "1"]
        capacity = await self.gpus.capacity(new.task_type, tier)
        idem = (
            ("", "")
            if idempotency is None
            else (self.keys.idem(idempotency.scope, idempotency.key), idempotency.body_hash)
        )
        s = self.settings
        reply = await self.store.scripts.call(
            "create_task",
            *idem,
            s.idempotency_ttl_s,
            capacity,
            s.default_processing_ms,
            s.lease_ms,
            s.timeout_grace_ms,
            s.timeout_warning_fraction,
            task_id,
            *flat,
        )
        if reply[0] == "DUP":
            first = await self.get(reply[1])
            return {k: first[k] for k in ("taskId", "displayId", "status", "estimatedWaitTime")}
        if reply[0] == "CONFLICT":
            raise Conflict(reply[1])
        display, wait, status = reply[1], int(reply[2]), reply[3]
        return {
            "taskId": task_id,
            "displayId": int(display),
            "status": status,  # PROCESSING when a waiting GPU took it at once
            "estimatedWaitTime": wait,
        }

    async def _avg_ms(self, task_type: int) -> float:
        avg = await self.store.redis.hget(self.keys.tstat(task_type), "avgMs")
        return float(avg) if avg else float(self.settings.default_processing_ms)

    async def _vip_ahead(self, task_type: int, tier: Tier) -> int:
        if tier is Tier.VIP:
            return 0
        enq, deq = await self.store.redis.hmget(self.keys.qstat(task_type, "VIP"), "enq", "deq")
        return max(int(enq or 0) - int(deq or 0), 0)

    async def _raw(self, task_id: str) -> dict[str, str]:
        h: dict[str, str] = await self.store.redis.hgetall(self.keys.task(task_id))
        if not h:
            raise NotFound(f"task {task_id} not found")
        return h

    async def _position(self, h: dict[str, str]) -> int:
        """1-based place in line of a QUEUED task (0 when it is not queued)."""
        if h.get("status") != TaskStatus.QUEUED:
            return 0
        task_type, tier = int(h["taskType"]), Tier(h["tier"])
        deq = await self.store.redis.hget(self.keys.qstat(task_type, tier.value), "deq")
        own = int(h.get("queueSeq") or 0) - int(deq or 0) - 1
        return max(own, 0) + await self._vip_ahead(task_type, tier) + 1

    async def _wait(self, h: dict[str, str], position: int) -> int:
        task_type, tier = int(h["taskType"]), Tier(h["tier"])
        capacity = await self.gpus.capacity(task_type, tier)
        return wait_seconds(position - 1, capacity, await self._avg_ms(task_type))

    async def get(self, task_id: str) -> dict[str, Any]:
        h = await self._raw(task_id)
        view = task_view(h)
        if h.get("status") == TaskStatus.QUEUED:
            view["estimatedWaitTime"] = await self._wait(h, await self._position(h))
        return view

    async def owner_of(self, task_id: str) -> str | None:
        owner = await self.store.redis.hget(self.keys.task(task_id), "userId")
        if owner is None:
            exists = await self.store.redis.exists(self.keys.task(task_id))
            if not exists:
                raise NotFound(f"task {task_id} not found")
        return owner or None

    async def list(
        self,
        *,
        status: TaskStatus | None = None,
        task_type: int | None = None,
        gpu_id: str | None = None,
        user_id: str | None = None,
        page: int = 1,
        size: int = 20,
    ) -> tuple[list[dict[str, Any]], int]:
        """Newest first; returns one page and the total number of matches.

        One filter, or status and type (their combined index), reads one index: the cost is
        that of the page. Other combinations intersect their indexes (``ZINTERSTORE``,
        bounded by the smallest one: a GPU's or a user's tasks)."""
        k = self.keys
        both = status is not None and task_type is not None
        sets = [
            key
            for cond, key in (
                (both, k.idx_status_type(str(status), task_type or 0)),
                (status is not None and not both, k.idx_status(str(status))),
                (task_type is not None and not both, k.idx_type(task_type or 0)),
                (gpu_id is not None, k.idx_gpu(gpu_id or "")),
                (user_id is not None, k.idx_user(user_id or "")),
            )
            if cond
        ] or [k.idx_all]
        start, stop = (page - 1) * size, page * size - 1
        r = self.store.redis
        if len(sets) == 1:
            async with r.pipeline(transaction=False) as p:
                p.zrevrange(sets[0], start, stop)
                p.zcard(sets[0])
                ids, total = await p.execute()
        else:
            tmp = k.tmp(uuid.uuid4().hex)
            async with r.pipeline(transaction=True) as p:
                p.zinterstore(tmp, sets, aggregate="MAX")
                p.zrevrange(tmp, start, stop)
                p.delete(tmp)
                total, ids, _ = await p.execute()
        async with r.pipeline(transaction=False) as p:
            for task_id in ids:
                p.hgetall(k.task(task_id))
            hashes = await p.execute()
        return [task_view(h) for h in hashes if h], int(total)

    async def progress_view(self, task_id: str) -> dict[str, Any]:
        h = await self._raw(task_id)
        status = h["status"]
        position = await self._position(h)
        now = int(await self._now_ms())
        progress = int(h.get("progress") or 0)
        avg_s = await self._avg_ms(int(h["taskType"])) / 1000.0
        if status == TaskStatus.QUEUED:
            remaining = max(await self._wait(h, position), 0)
        elif status == TaskStatus.PROCESSING:
            elapsed = max(now - int(h.get("startedAt") or now), 0) / 1000.0
            if progress > 0:
                remaining = round(elapsed * (100 - progress) / progress)
            else:
                remaining = max(round(avg_s - elapsed), 0)
        else:
            remaining = 0
        return {
            "taskId": task_id,
            "status": status,
            "progress": progress,
            "message": h.get("progressMessage") or None,
            "estimatedRemainingTime": remaining,
            "gpuId": h.get("gpuId") or None,
            "startTime": int(h["startedAt"]) if h.get("startedAt") else None,
            "updateTime": int(h["updatedAt"]),
            "queuePosition": position,
        }

    async def _now_ms(self) -> int:
        sec, usec = await self.store.redis.time()
        return int(sec) * 1000 + int(usec) // 1000

    async def result_view(self, task_id: str) -> dict[str, Any]:
        h = await self._raw(task_id)
        return {
            "taskId": task_id,
            "status": h["status"],
            "result": parse_json_or_text(h.get("result") or None),
            "errorMessage": h.get("errorMessage") or None,
            "gpuId": h.get("gpuId") or None,
            "completedAt": int(h["completedAt"]) if h.get("completedAt") else None,
        }

    async def report_progress(
        self,
        task_id: str,
        percent: int,
        message: str | None = None,
        *,
        gpu_id: str | None = None,
        attempt: int | None = None,
    ) -> None:
        if not 0 <= percent <= 100:
            raise InvalidInput("progress must be between 0 and 100")
        reply = await self.store.scripts.call(
            "progress",
            task_id,
            "" if attempt is None else attempt,
            gpu_id or "",
            percent,
            message or "",
            self.settings.lease_ms,
        )
        _raise_for(reply, task_id)

    async def finish(
        self,
        task_id: str,
        outcome: TaskStatus,
        text: str,
        *,
        gpu_id: str | None = None,
        attempt: int | None = None,
        retryable: bool = True,
    ) -> TaskStatus:
        """Record an attempt's end; a retryable failure with retries left goes back to QUEUED.

        Concurrent calls share one script call (see :mod:`gpuflow.core.coalesce`); each is
        applied as if it came alone."""
        report = Report(task_id, outcome, text, gpu_id, attempt, retryable)
        if len(text) > BATCHED_TEXT_MAX:  # large results go alone: batches stay small
            async with asyncio.timeout(self._report_timeout):
                (result,) = await self.finish_many([report])
            if isinstance(result, Exception):
                raise result
            return result
        return await self._finisher.submit(report)

    async def finish_many(self, reports: Sequence[Report]) -> Sequence[TaskStatus | GpuflowError]:
        """Record several attempts' ends in one script call, in order. A report that is
        refused (bad outcome, too large, unknown task, stale attempt) gets its error in its
        place; the others land."""
        s = self.settings
        checked: list[GpuflowError | None] = []
        args: list[Any] = []
        for r in reports:
            err = self._refusal(r)
            checked.append(err)
            if err is None:
                args += [
                    r.task_id,
                    "" if r.attempt is None else r.attempt,
                    r.gpu_id or "",
                    r.outcome.value,
                    r.text,
                    1 if r.retryable else 0,
                    _RNG.uniform(0.5, 1.0),
                ]
        replies: Iterator[list[Any]] = iter(())
        if args:
            replies = iter(
                await self.store.scripts.call(
                    "finish_task",
                    s.retry_base_ms,
                    s.gpu_fault_threshold,
                    s.retry_max_ms,
                    len(args) // 7,
                    *args,
                )
            )
        results: list[TaskStatus | GpuflowError] = []
        for r, err in zip(reports, checked, strict=True):
            if err is not None:
                results.append(err)
                continue
            reply = next(replies)
            try:
                _raise_for(reply, r.task_id)
            except GpuflowError as exc:
                results.append(exc)
            else:
                results.append(TaskStatus(reply[1]))
        return results

    def _refusal(self, r: Report) -> GpuflowError | None:
        if r.outcome not in FINAL_OUTCOMES:
            return InvalidInput(f"{r.outcome} is not a final outcome")
        if len(r.text.encode()) > self.settings.max_payload_bytes:
            return PayloadTooLarge(f"result is larger than {self.settings.max_payload_bytes} bytes")
        return None

    async def start(self, task_id: str, gpu_id: str, message: str | None = None) -> int:
        """Push-style start of a QUEUED task on ``gpu_id``; returns the attempt number."""
        s = self.settings
        reply = await self.store.scripts.call(
            "start_task",
            task_id,
            gpu_id,
            s.lease_ms,
            message or "",
            s.timeout_grace_ms,
            s.timeout_warning_fraction,
        )
        _raise_for(reply, task_id)
        return int(reply[1])

    async def requeue(self, task_id: str, attempt: int | None = None) -> None:
        reply = await self.store.scripts.call(
            "requeue_task", task_id, "" if attempt is None else attempt
        )
        _raise_for(reply, task_id)

    async def cancel(self, task_id: str, reason: str = "canceled") -> TaskStatus:
        """QUEUED or PROCESSING → CANCELED; returns the status it had. Finished: Conflict."""
        reply = await self.store.scripts.call("cancel_task", task_id, reason)
        _raise_for(reply, task_id)
        return TaskStatus(reply[1])

    async def promote_delayed(self, limit: int = 1000) -> int:
        return int(await self.store.scripts.call("promote_delayed", limit))


def started_tasks(rows: list[Any]) -> list[dict[str, Any]]:
    """The views of the tasks a 'full' claim started (its reply's HGETALL arrays)."""
    return [task_view(_pairs(flat)) for flat in rows]
