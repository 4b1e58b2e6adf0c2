"""Sync handlers for the worker tests (no tests here).

They run in executor child processes, which import this module again (by the worker's ref),
so it imports nothing heavy. They leave marks as files under a directory named in their
payload, and say their pid through progress messages.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from gpuflow.worker import NonRetryableError, TaskContext, Worker

worker = Worker(ref="tests.test_worker_handlers:worker")


@worker.handler(11)
def track(payload: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """Counts the tasks running at once on this GPU: one marker file per running task."""
    here = Path(payload["dir"]) / ctx.gpu_id
    here.mkdir(parents=True, exist_ok=True)
    marker = here / f"{ctx.task_id}.run"
    marker.touch()
    now = sum(1 for p in here.iterdir() if p.suffix == ".run")
    with open(here / "samples", "a") as f:  # one short O_APPEND write: atomic
        f.write(f"{now}\n")
    ctx.progress(50, "half way")
    time.sleep(payload.get("ms", 0) / 1000)
    marker.unlink()
    return {"gpu": ctx.gpu_id, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid()}


@worker.handler(12)
def die_once(payload: Any, ctx: TaskContext) -> str:
    """Attempt 1 says its pid and hangs (the test kills it); later attempts succeed."""
    if ctx.attempt == 1:
        ctx.progress(1, f"pid {os.getpid()}")
        time.sleep(30)
    return f"attempt {ctx.attempt} in {os.getpid()}"


@worker.handler(13)
def block(payload: dict[str, Any], ctx: TaskContext) -> str:
    """Says its pid, then sleeps ``seconds``."""
    ctx.progress(1, f"pid {os.getpid()}")
    time.sleep(payload.get("seconds", 30))
    return "woke up"


@worker.handler(14)
def describe(payload: Any, ctx: TaskContext) -> Any:
    """Returns what it was given; a raw (non-JSON) payload comes back as a plain string."""
    if isinstance(payload, str):
        return f"raw:{payload}"
    return {"payload": payload, "raw": ctx.raw_payload, "attempt": ctx.attempt}


@worker.handler(15)
def picky(payload: dict[str, Any], ctx: TaskContext) -> str:
    if payload["mode"] == "fatal":
        raise NonRetryableError("bad input, no retry")
    if ctx.attempt < payload.get("ok_from", 99):
        raise ValueError(f"flaky on attempt {ctx.attempt}")
    return f"ok on attempt {ctx.attempt}"


@worker.handler(16)
def freeze(payload: Any, ctx: TaskContext) -> str:
    """Says its pid, then stops its own process (SIGSTOP) until the test continues it: a
    handler stuck in a call that never gives the process back."""
    ctx.progress(1, f"pid {os.getpid()}")
    os.kill(os.getpid(), signal.SIGSTOP)
    return f"thawed on attempt {ctx.attempt}"


@worker.handler(17)
def cooperative(payload: Any, ctx: TaskContext) -> str:
    """Says its pid, then works in small steps until asked to stop (bounded: 30 s)."""
    ctx.progress(1, f"pid {os.getpid()}")
    deadline = time.monotonic() + 30
    while not ctx.should_stop() and time.monotonic() < deadline:
        time.sleep(0.01)
    return "stopped when asked" if ctx.stop_requested else "never asked"


@worker.handler(18)
def gated(payload: dict[str, Any], ctx: TaskContext) -> str:
    """Says its pid, waits for the file ``gate`` (bounded: 30 s), writes ``finished``."""
    ctx.progress(1, f"pid {os.getpid()}")
    here = Path(payload["dir"])
    deadline = time.monotonic() + 30
    while not (here / "gate").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    (here / "finished").touch()
    return f"through on attempt {ctx.attempt}"


#: Same blocking handler; asked to stop, it gets StopRequested (SIGUSR1 in its process).
interrupting = Worker(
    {13: block}, ref="tests.test_worker_handlers:interrupting", interrupt_on_stop=True
)
