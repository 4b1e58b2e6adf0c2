"""The chaos suite's handler (``bench/chaos.py``): every execution is written to a ledger.

Task type 1 is a sync handler, so it runs in an executor child process that the suite can
kill. It appends ``S <taskId> <attempt> <pid> <gpuId> <unix time>`` to the ledger when it
starts and ``E …`` (same fields) just before it returns, sleeps in between, and returns
``{"taskId", "attempt", "pid", "gpuId"}``, so a recorded result names the execution it came
from. The sleep is the payload's ``sleepMs`` (default 10), or ``attemptSleepMs[str(attempt)]``
when the payload has one for this attempt. An executor child also writes
``R - 0 <pid> <CUDA_VISIBLE_DEVICES> <unix time>`` when it imports this module (the agent pins
each child to its node's GPU index before the import): that tells which GPU a child serves.

The ledger is the file named by ``$GPUFLOW_CHAOS_LEDGER``, outside Redis, opened with
``O_APPEND``: each line is one ``write``, so lines of concurrent processes never interleave.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any

from gpuflow.worker.sdk import TaskContext, Worker

LEDGER_ENV = "GPUFLOW_CHAOS_LEDGER"
TASK_TYPE = 1

worker = Worker(ref="bench.chaos_handlers:worker")
_fd: int | None = None


def _write(kind: str, task_id: str, attempt: int, gpu: str) -> None:
    global _fd
    if _fd is None:
        _fd = os.open(os.environ[LEDGER_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    line = f"{kind} {task_id} {attempt} {os.getpid()} {gpu} {time.time():.6f}\n"
    os.write(_fd, line.encode())


def _append(kind: str, ctx: TaskContext) -> None:
    _write(kind, ctx.task_id, ctx.attempt, ctx.gpu_id)


def _sleep_ms(payload: Any, attempt: int) -> float:
    opts = payload if isinstance(payload, dict) else {}
    per_attempt = opts.get("attemptSleepMs")
    if isinstance(per_attempt, dict) and str(attempt) in per_attempt:
        return float(per_attempt[str(attempt)])
    return float(opts.get("sleepMs", 10))


@worker.handler(TASK_TYPE)
def chaos_task(payload: Any, ctx: TaskContext) -> dict[str, Any]:
    _append("S", ctx)
    time.sleep(max(_sleep_ms(payload, ctx.attempt), 0.0) / 1000.0)
    _append("E", ctx)
    return {"taskId": ctx.task_id, "attempt": ctx.attempt, "pid": os.getpid(), "gpuId": ctx.gpu_id}


if multiprocessing.parent_process() is not None and LEDGER_ENV in os.environ:
    _write("R", "-", 0, os.environ.get("CUDA_VISIBLE_DEVICES") or "-")
