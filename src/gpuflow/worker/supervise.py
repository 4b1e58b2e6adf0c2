"""Graded stops of a running task: soft (ask the handler), then hard (kill it).

A task is stopped for one of two reasons:

* **timeout** — it ran past its ``timeout`` (ms, counted from when the agent started it);
* **stop** — the server's heartbeat reply named it (canceled, timed out or reassigned by the
  server).

Either way the handler is first asked to stop: its ``ctx.should_stop()`` turns true; an async
handler is cancelled; a sync one (in its executor process) gets the stop message, and with
``interrupt_on_stop`` a :class:`~gpuflow.worker.sdk.StopRequested`. If it has not ended
``grace_s`` later, the executor process is killed (the node starts a new one); an async
handler that ignores its cancellation is abandoned. A timed-out attempt is reported as a
timeout (the server decides between a retry and ``TIMEOUT``); a stopped one is not reported.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from gpuflow.worker.executor import ProcessExecutor
from gpuflow.worker.sdk import LoopFlag, Outcome
from gpuflow.worker.transport import ClaimedTask

log = logging.getLogger("gpuflow.worker")


class Why(Enum):
    TIMEOUT = "timeout"
    STOP = "stop"


@dataclass(eq=False)
class Job:
    """One task running on a node."""

    task: ClaimedTask
    executor: ProcessExecutor | None = None
    #: The handler's ``ctx.should_stop()`` flag (for in-loop handlers; a child keeps its own).
    flag: LoopFlag = field(default_factory=LoopFlag)
    runner: asyncio.Task[None] | None = None
    #: The handler has ended and its outcome is being reported: too late to stop it.
    reporting: bool = False
    #: Set when the server said to stop this attempt.
    stopped: bool = False
    #: Woken by a stop while :func:`supervise` waits (a bare callback, not a task per job).
    _wake: Callable[[], None] | None = None

    def request_stop(self) -> bool:
        """The server said stop; False when the handler has already ended."""
        if self.reporting or self.stopped:
            return False
        self.stopped = True
        if self._wake is not None:
            self._wake()
        return True


def _retrieve(work: asyncio.Future[Outcome]) -> None:
    if not work.cancelled():
        work.exception()


def timed_out(task: ClaimedTask, what: str) -> Outcome:
    return Outcome(
        False, f"timed out after {task.timeout_ms} ms; {what}", retryable=True, timed_out=True
    )


async def _first(job: Job, work: asyncio.Future[Outcome]) -> Why | None:
    """Wait for the work to end (None), its timeout, or the server's stop."""
    if not job.stopped and not work.done():
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()

        def wake(_: object = None) -> None:
            if not waiter.done():
                waiter.set_result(None)

        work.add_done_callback(wake)
        job._wake = wake
        timer = (
            loop.call_later(job.task.timeout_ms / 1000.0, wake) if job.task.timeout_ms > 0 else None
        )
        try:
            await waiter
        finally:
            job._wake = None
            work.remove_done_callback(wake)
            if timer is not None:
                timer.cancel()
    if work.done():
        return None
    return Why.STOP if job.stopped else Why.TIMEOUT


async def _stop(job: Job, work: asyncio.Future[Outcome], grace_s: float) -> str:
    """Soft stop, then hard after ``grace_s``; returns what it took."""
    job.flag.set()
    if job.executor is not None:
        job.executor.request_stop(job.task.task_id)
    else:
        work.cancel()
    await asyncio.wait({work}, timeout=grace_s)
    if work.done():
        return "the handler stopped when asked"
    if job.executor is None:
        log.error(
            "task %s: async handler ignored its cancellation for %.1f s; abandoned",
            job.task.task_id,
            grace_s,
        )
        work.add_done_callback(_retrieve)
        return "the handler ignored its cancellation and was abandoned"
    pid = job.executor.pid
    await job.executor.kill()
    await asyncio.wait({work})
    return f"executor process {pid} killed after {grace_s:g} s of grace"


async def supervise(job: Job, work: asyncio.Future[Outcome], grace_s: float) -> Outcome | None:
    """The work's outcome; or, past its timeout or when told to stop, stop it (soft, then
    hard) and return a timeout outcome, or None (stopped: report nothing)."""
    try:
        why = await _first(job, work)
        if why is None:
            return work.result()
        log.info("task %s: stopping it (%s)", job.task.task_id, why.value)
        what = await _stop(job, work, grace_s)
    except asyncio.CancelledError:  # the agent drains: the work goes too (kills its child)
        work.cancel()
        await asyncio.wait({work})
        raise
    if work.done():
        _retrieve(work)  # a failure after the stop changes nothing
    return timed_out(job.task, what) if why is Why.TIMEOUT else None
