"""Demo handlers for task types 1-4, served by ``gpuflow worker gpuflow.worker.demo:worker``.

==== ========== ===== ==============================================================
type name       kind  what it does
==== ========== ===== ==============================================================
1    echo       sync  returns its payload after ``sleepMs`` (default 0) ms
2    face_swap  sync  simulated face swap: 4 steps over ``sleepMs`` (default 200) ms
3    transcode  async simulated transcode: 5 steps over ``sleepMs`` (default 200) ms
4    asr        async simulated speech recognition: 3 steps over ``sleepMs`` (default 200) ms
==== ========== ===== ==============================================================

Every handler reports progress. A payload with ``"fail": true`` makes any of them fail
(retryable, or at once with ``"retryable": false``). Sync ones run in the executor child
processes, async ones in the agent's event loop.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gpuflow.worker.sdk import NonRetryableError, TaskContext, Worker

worker = Worker(ref="gpuflow.worker.demo:worker")


def _options(payload: Any, default_ms: int) -> tuple[float, dict[str, Any]]:
    opts = payload if isinstance(payload, dict) else {}
    if opts.get("fail"):
        message = str(opts.get("error") or "the demo task was asked to fail")
        if opts.get("retryable") is False:
            raise NonRetryableError(message)
        raise RuntimeError(message)
    return max(float(opts.get("sleepMs", default_ms)), 0.0) / 1000.0, opts


@worker.handler(1)
def echo(payload: Any, ctx: TaskContext) -> Any:
    seconds, _ = _options(payload, 0)
    ctx.progress(0, "echo started")
    time.sleep(seconds)
    ctx.progress(100, "echo done")
    return payload


@worker.handler(2)
def face_swap(payload: Any, ctx: TaskContext) -> dict[str, Any]:
    seconds, opts = _options(payload, 200)
    steps = ("detecting faces", "aligning", "swapping", "blending")
    for i, step in enumerate(steps):
        ctx.progress(i * 100 // len(steps), step)
        time.sleep(seconds / len(steps))
    ctx.progress(100, "done")
    source = opts.get("source", "source.jpg")
    return {"output": f"swapped-{ctx.task_id}.jpg", "source": source, "faces": 1}


async def _steps(ctx: TaskContext, seconds: float, steps: int, label: str) -> None:
    for i in range(steps):
        ctx.progress(i * 100 // steps, f"{label} {i + 1}/{steps}")
        await asyncio.sleep(seconds / steps)
    ctx.progress(100, "done")


@worker.handler(3)
async def transcode(payload: Any, ctx: TaskContext) -> dict[str, Any]:
    seconds, opts = _options(payload, 200)
    await _steps(ctx, seconds, 5, "segment")
    fmt = str(opts.get("format", "mp4"))
    return {"output": f"transcoded-{ctx.task_id}.{fmt}", "format": fmt}


@worker.handler(4)
async def asr(payload: Any, ctx: TaskContext) -> dict[str, Any]:
    seconds, opts = _options(payload, 200)
    await _steps(ctx, seconds, 3, "chunk")
    return {"text": "hello from the demo recogniser", "language": opts.get("language", "en")}
