"""One GPU node of the agent: its slots, executors, and register / heartbeat / claim loops.

* **executors** are started first (one child process per slot when the node serves a sync
  handler), so models are loaded before the node takes work;
* **register**, then a **heartbeat** loop every ``heartbeat_interval_s``, run by the agent and
  never by a handler process, kept going while the node drains;
* a **claim** loop that calls ``transport.claim(gpu_id, wait_s)`` only while the node has a
  free slot, so it never runs more than ``max_concurrent_tasks`` at once. The first claim
  (and the first one after a failed claim, once the node is idle) passes ``recover=True``;
* each task runs in a slot; progress is forwarded in the background (latest value wins),
  then the outcome is reported with the task's attempt. A report refused as stale
  (:class:`StaleAttempt`) is logged and dropped. Reports are retried a few times on transport
  errors: the attempt fences them, so a repeat lands once or is refused;
* draining stops claiming, waits up to the grace period for running tasks, then kills what
  still runs and releases those tasks back to their queue without counting a failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gpuflow.worker.aio import Backoff, ProgressPump, cancel_and_wait, sleep_unless
from gpuflow.worker.executor import ProcessExecutor, run_in_loop
from gpuflow.worker.sdk import Handler, Outcome, TaskContext, Worker, is_async_handler
from gpuflow.worker.transport import (
    ClaimedTask,
    NodeSpec,
    NodeUnknown,
    StaleAttempt,
    Transport,
    TransportError,
    TransportRejected,
)

log = logging.getLogger("gpuflow.worker")

REPORT_TRIES = 5


@dataclass(slots=True)
class AgentOptions:
    heartbeat_interval_s: float
    claim_wait_s: float
    grace_s: float = 30.0
    executor_start_timeout_s: float = 300.0


class Node:
    """One registered GPU node: its slots, executors, and claim / heartbeat loops."""

    def __init__(
        self, spec: NodeSpec, worker: Worker, transport: Transport, opts: AgentOptions
    ) -> None:
        self.spec = spec
        self.worker = worker
        self.transport = transport
        self.opts = opts
        self.slots = max(1, spec.max_concurrent_tasks)
        self.busy = 0
        self.running: dict[tuple[str, int], tuple[asyncio.Task[None], ClaimedTask]] = {}
        self.idle: list[ProcessExecutor] = []
        self.executors: list[ProcessExecutor] = []
        self.wake = asyncio.Event()
        self.stopping = False
        self.need_recover = True
        self._background: set[asyncio.Task[None]] = set()

    @property
    def gpu_id(self) -> str:
        return self.spec.gpu_id

    async def start_executors(self, source: str | bytes | None) -> None:
        if source is None:
            return
        self.executors = [
            ProcessExecutor(
                source,
                gpu_index=self.spec.gpu_index,
                name=f"gpuflow-{self.gpu_id}-slot{i}",
                start_timeout_s=self.opts.executor_start_timeout_s,
            )
            for i in range(self.slots)
        ]
        self.idle = list(self.executors)
        await asyncio.gather(*(e.start() for e in self.executors))
        log.info("%s: %d executor process(es) ready", self.gpu_id, len(self.executors))

    async def register(self, stop: asyncio.Event) -> bool:
        """Register, retrying while the system cannot be reached; False if stopped first."""
        backoff = Backoff(cap=5.0)
        while not stop.is_set():
            try:
                await self.transport.register(self.spec)
            except TransportError as exc:
                log.warning("%s: register failed (%s), retrying", self.gpu_id, exc)
                await sleep_unless(stop, backoff.step())
                continue
            log.info(
                "%s: registered for task types %s", self.gpu_id, self.spec.supported_task_types
            )
            return True
        return False

    async def heartbeat_loop(self, done: asyncio.Event) -> None:
        backoff = Backoff(cap=self.opts.heartbeat_interval_s)
        delay = self.opts.heartbeat_interval_s
        while not await sleep_unless(done, delay):
            delay = await self._beat(done, backoff)

    async def _beat(self, done: asyncio.Event, backoff: Backoff) -> float:
        """One heartbeat; returns the delay until the next (shorter after a failure)."""
        try:
            try:
                await self.transport.heartbeat(self.gpu_id)
            except NodeUnknown:
                log.warning("%s: unknown to the system, registering again", self.gpu_id)
                await self.register(done)
        except (TransportError, TransportRejected) as exc:
            delay = backoff.step()
            log.warning("%s: heartbeat failed (%s), retrying in %.1fs", self.gpu_id, exc, delay)
            return delay
        except Exception:
            log.exception("%s: heartbeat failed", self.gpu_id)
        backoff.reset()
        return self.opts.heartbeat_interval_s

    async def claim_loop(self, stop: asyncio.Event) -> None:
        self.need_recover = True
        backoff = Backoff()
        while not stop.is_set():
            if self.busy >= self.slots:
                self.wake.clear()
                await self.wake.wait()
                continue
            tasks = await self._claim_once(stop)
            if tasks is None:
                await sleep_unless(stop, backoff.step())
                continue
            backoff.reset()
            for task in tasks:
                self._launch(task)

    async def _claim_once(self, stop: asyncio.Event) -> list[ClaimedTask] | None:
        """Claim into the free slots; None after an error (the caller backs off)."""
        recover = self.need_recover and self.busy == 0
        try:
            try:
                tasks = await self._claim(stop, recover)
            except NodeUnknown:
                log.warning("%s: unknown to the system, registering again", self.gpu_id)
                await self.register(stop)
                return []
        except (TransportError, TransportRejected) as exc:
            self.need_recover = True
            log.warning("%s: claim failed: %s", self.gpu_id, exc)
            return None
        except Exception:
            log.exception("%s: claim failed", self.gpu_id)
            return None
        if recover:
            self.need_recover = False
        return tasks

    async def _claim(self, stop: asyncio.Event, recover: bool) -> list[ClaimedTask]:
        """One claim, abandoned when ``stop`` is set; tasks it still brought are released."""
        claim = asyncio.create_task(
            self.transport.claim(self.gpu_id, self.opts.claim_wait_s, recover=recover)
        )
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({claim, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not claim.done():
            await cancel_and_wait(claim)
            if claim.cancelled() or claim.exception() is not None:
                return []
            for task in claim.result():
                self._in_background(self.release(task))
            return []
        return claim.result()

    def _in_background(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _launch(self, task: ClaimedTask) -> None:
        fn = self.worker.handlers.get(task.task_type)
        executor: ProcessExecutor | None = None
        sync = fn is not None and not is_async_handler(fn)
        if self.busy >= self.slots or self.stopping or (sync and not self.idle):
            log.warning("%s: no free slot for %s, releasing it", self.gpu_id, task.task_id)
            self._in_background(self.release(task))
            return
        if sync:
            executor = self.idle.pop()
        self.busy += 1
        runner = asyncio.create_task(self._run(task, fn, executor), name=f"task-{task.task_id}")
        self.running[task.task_id, task.attempt] = (runner, task)

    async def _run(
        self, task: ClaimedTask, fn: Handler | None, executor: ProcessExecutor | None
    ) -> None:
        pump = ProgressPump(lambda p, m: self._progress(task, p, m))
        try:
            try:
                outcome = await self._execute(task, fn, executor, pump)
            except Exception as exc:  # the agent's own failure, not the handler's
                log.exception("%s: running %s failed", self.gpu_id, task.task_id)
                outcome = Outcome(False, f"worker error: {exc}")
            await pump.close()
            await self._report(task, outcome)
            if executor is not None and not executor.alive:
                await self._restart(executor)
        except asyncio.CancelledError:
            pump.cancel()
            raise
        finally:
            self.running.pop((task.task_id, task.attempt), None)
            if executor is not None:
                self.idle.append(executor)
            self.busy -= 1
            self.wake.set()

    async def _execute(
        self,
        task: ClaimedTask,
        fn: Handler | None,
        executor: ProcessExecutor | None,
        pump: ProgressPump,
    ) -> Outcome:
        if fn is None:
            return Outcome(False, f"no handler for task type {task.task_type}")
        if executor is None:
            ctx = TaskContext.for_task(task, pump.push, self.spec.gpu_index)
            return await run_in_loop(fn, task, ctx)
        if not executor.alive:  # died while idle
            await self._restart(executor)
        return await executor.run(task, pump.push)

    async def _restart(self, executor: ProcessExecutor) -> None:
        """Start a dead executor again, retrying with backoff (until the node stops)."""
        backoff = Backoff(first=1.0, cap=30.0)
        while not self.stopping:
            try:
                await executor.restart()
                log.info("%s: restarted executor (pid %s)", self.gpu_id, executor.pid)
                return
            except Exception as exc:
                delay = backoff.step()
                log.error(
                    "%s: executor restart failed (%s); retrying in %.0fs", self.gpu_id, exc, delay
                )
                await asyncio.sleep(delay)

    async def _progress(self, task: ClaimedTask, percent: int, message: str | None) -> None:
        try:
            await self.transport.progress(task, percent, message)
        except StaleAttempt as exc:
            log.info("%s: progress of %s dropped: %s", self.gpu_id, task.task_id, exc)
        except (TransportError, TransportRejected) as exc:
            log.warning("%s: progress of %s not sent: %s", self.gpu_id, task.task_id, exc)

    async def _send(self, task: ClaimedTask, outcome: Outcome) -> None:
        if outcome.ok:
            await self.transport.complete(task, outcome.text)
        elif outcome.timed_out:
            await self.transport.time_out(task, outcome.text)
        else:
            await self.transport.fail(task, outcome.text, retryable=outcome.retryable)

    async def _report(self, task: ClaimedTask, outcome: Outcome) -> None:
        refused = await self._with_retries(task, "report", lambda: self._send(task, outcome))
        if refused is not None and outcome.ok:  # e.g. a result over the size limit
            error = f"the result was refused: {refused}"
            await self._with_retries(
                task, "report", lambda: self.transport.fail(task, error, retryable=False)
            )

    async def release(self, task: ClaimedTask) -> None:
        await self._with_retries(task, "release", lambda: self.transport.release(task))

    async def _with_retries(
        self, task: ClaimedTask, what: str, call: Callable[[], Awaitable[None]]
    ) -> TransportRejected | None:
        """Make a fenced call, retrying transport errors; returns the refusal, if refused."""
        backoff = Backoff()
        for i in range(REPORT_TRIES):
            try:
                await call()
                return None
            except StaleAttempt as exc:
                log.warning("%s: %s of %s dropped: %s", self.gpu_id, what, task.task_id, exc)
                return None
            except TransportRejected as exc:
                log.error("%s: %s of %s refused: %s", self.gpu_id, what, task.task_id, exc)
                return exc
            except TransportError as exc:
                log.warning("%s: %s of %s failed: %s", self.gpu_id, what, task.task_id, exc)
                if i + 1 < REPORT_TRIES:
                    await asyncio.sleep(backoff.step())
        log.error(
            "%s: gave up the %s of %s; its lease will expire and it will run again",
            self.gpu_id,
            what,
            task.task_id,
        )
        return None

    async def drain(self, grace_s: float, hurry: asyncio.Event) -> None:
        """Wait up to ``grace_s`` for running tasks, then kill and release the rest."""
        self.stopping = True
        if self.running:
            runners = {runner for runner, _ in self.running.values()}
            waiters = {
                asyncio.create_task(asyncio.wait(runners)),
                asyncio.create_task(hurry.wait()),
            }
            await asyncio.wait(waiters, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
        left = [(runner, task) for runner, task in self.running.values() if not runner.done()]
        await asyncio.gather(*(cancel_and_wait(runner) for runner, _ in left))
        if left:
            log.info("%s: releasing %d unfinished task(s)", self.gpu_id, len(left))
            await asyncio.gather(*(self.release(task) for _, task in left))
        if self._background:
            await asyncio.wait(set(self._background))

    async def close(self) -> None:
        await asyncio.gather(*(e.close() for e in self.executors))
