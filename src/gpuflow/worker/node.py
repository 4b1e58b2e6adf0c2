"""One GPU node of the agent: its slots, executors, and register / heartbeat / claim loops.

* **executors** are started first (one child process per slot when the node serves a sync
  handler), so models are loaded before the node takes work;
* **register**, then a **heartbeat** every ``heartbeat_interval_s`` (:func:`heartbeat_loop`,
  one loop for all the agent's nodes, so their beats leave together), run by the agent
  and never by a handler process (a handler stuck in a C call cannot stop it), kept going
  while the node drains and while the system is unreachable (with backoff). Each heartbeat
  lists the tasks the node runs (task id → attempt): the server renews their leases,
  requeues the node's tasks it does not list (lost), and answers which listed ones to stop
  (canceled, timed out or moved on by the server); the node stops those (soft, then hard)
  and reports nothing for them. A stopped task's end triggers a heartbeat at once, which
  frees its slot;
* a **claim** loop that calls ``transport.claim(gpu_id, wait_s)`` only while the node has a
  free slot, so it never runs more than ``max_concurrent_tasks`` at once. The first claim
  (and the first one after a failed claim, once the node is idle) passes ``recover=True``.
  A failed claim is retried with backoff for as long as it takes (a restarted Redis or API);
* each task runs in a slot under :func:`~gpuflow.worker.supervise.supervise` (its timeout:
  soft stop, then hard after ``stop_grace_s``); progress is forwarded in the background
  (latest value wins), then the outcome is reported with the task's attempt. A report
  refused as stale (:class:`StaleAttempt`) is logged and dropped. Reports are retried on
  transport errors for up to ``REPORT_PATIENCE_S`` (the task stays listed in heartbeats
  meanwhile, so its lease holds): the attempt fences them, so a repeat lands once or is
  refused;
* draining stops claiming, waits up to the grace period for running tasks, then kills what
  still runs and releases those tasks back to their queue without counting a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gpuflow.worker.aio import Backoff, ProgressPump, cancel_and_wait, sleep_unless
from gpuflow.worker.eager import Started
from gpuflow.worker.executor import ProcessExecutor, run_in_loop
from gpuflow.worker.sdk import Handler, Outcome, TaskContext, Worker, is_async_handler
from gpuflow.worker.supervise import Job, supervise
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

REPORT_PATIENCE_S = 60.0
#: Event-loop turns a node gives the tasks it just launched before it claims again.
LAUNCH_YIELDS = 4
#: How long a stopping node waits for its ended claim (stop_waiting) before cancelling it.
STOP_WAIT_S = 2.0


@dataclass(slots=True)
class AgentOptions:
    heartbeat_interval_s: float
    claim_wait_s: float
    grace_s: float = 30.0
    executor_start_timeout_s: float = 300.0
    #: Between the soft stop of a handler (timeout, cancel) and the kill of its process.
    stop_grace_s: float = 10.0
    #: Sync handlers get StopRequested when asked to stop (Worker.interrupt_on_stop).
    interrupt_on_stop: bool = False


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
        #: Jobs whose handler has ended and whose report awaits Redis's answer (in ``busy``).
        self.reporting = 0
        self.jobs: dict[tuple[str, int], Job] = {}
        self.idle: list[ProcessExecutor] = []
        self.executors: list[ProcessExecutor] = []
        self.wake = asyncio.Event()
        self.beat_now = asyncio.Event()
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
                interrupt=self.opts.interrupt_on_stop,
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

    def running(self) -> dict[str, int]:
        """What the node runs, as the heartbeat lists it: task id → attempt."""
        jobs = sorted(self.jobs.values(), key=lambda j: j.task.attempt)
        return {job.task.task_id: job.task.attempt for job in jobs}

    async def beat(self, backoff: Backoff) -> float:
        """One heartbeat; returns the delay until the next (shorter after a failure)."""
        try:
            try:
                self._stop_tasks(await self.transport.heartbeat(self.gpu_id, self.running()))
            except NodeUnknown:
                # One attempt: the agent's other nodes beat in the same round and must not
                # wait on this one's retries (a failure backs off like a failed beat).
                log.warning("%s: unknown to the system, registering again", self.gpu_id)
                await self.transport.register(self.spec)
                log.info("%s: registered again", self.gpu_id)
        except (TransportError, TransportRejected) as exc:
            delay = backoff.step()
            log.warning("%s: heartbeat failed (%s), retrying in %.1fs", self.gpu_id, exc, delay)
            return delay
        except Exception:
            log.exception("%s: heartbeat failed", self.gpu_id)
        backoff.reset()
        return self.opts.heartbeat_interval_s

    def _stop_tasks(self, task_ids: Iterable[str]) -> None:
        """The server said stop: stop these tasks' handlers (soft, then hard)."""
        wanted = set(task_ids)
        for job in list(self.jobs.values()):
            if job.task.task_id in wanted and job.request_stop():
                log.info("%s: stopping %s (the server said so)", self.gpu_id, job.task.task_id)

    async def claim_loop(self, stop: asyncio.Event) -> None:
        self.need_recover = True
        backoff = Backoff(cap=5.0)
        # One waiter on ``stop`` for every claim of the loop (not a task per claim).
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await self._claim_all(stop, stopper, backoff)
        finally:
            stopper.cancel()
        # Stopping: nothing more may be started for this node, and what was (pushed to it
        # after its last claim) goes back to the queue.
        with contextlib.suppress(Exception):
            await self.transport.stop_waiting(self.gpu_id)

    async def _claim_all(
        self, stop: asyncio.Event, stopper: asyncio.Future[Any], backoff: Backoff
    ) -> None:
        while not stop.is_set():
            if self.busy >= self.slots:
                self.wake.clear()
                await self.wake.wait()
                continue
            tasks = await self._claim_once(stop, stopper)
            if tasks is None:
                await sleep_unless(stop, backoff.step())
                continue
            backoff.reset()
            for task in tasks:
                self._launch(task)
            if tasks:
                # Let the tasks just started reach their handlers (and a short one its
                # report) before the next claim's round trip takes the loop.
                for _ in range(LAUNCH_YIELDS):
                    await asyncio.sleep(0)

    async def _claim_once(
        self, stop: asyncio.Event, stopper: asyncio.Future[Any]
    ) -> list[ClaimedTask] | None:
        """Claim into the free slots; None after an error (the caller backs off)."""
        recover = self.need_recover and self.busy == 0
        try:
            try:
                tasks = await self._claim(stopper, recover)
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

    async def _claim(self, stopper: asyncio.Future[Any], recover: bool) -> list[ClaimedTask]:
        """One claim, abandoned when ``stopper`` (the claim loop's waiter on stop) is done;
        tasks it still brought are released."""
        claim = asyncio.create_task(
            self.transport.claim(self.gpu_id, self.opts.claim_wait_s, recover=recover)
        )
        await asyncio.wait({claim, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not claim.done():
            # Ends a claim blocked on pushed tasks and takes back what was pushed but not
            # taken; one already on its way is in the claim's result, released below.
            with contextlib.suppress(Exception):
                if await self.transport.stop_waiting(self.gpu_id):
                    await asyncio.wait({claim}, timeout=STOP_WAIT_S)
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
        sync = fn is not None and not is_async_handler(fn)
        # A job that only awaits its report's answer holds no slot here: once the report
        # has landed the server counts the slot free, and a claim that raced past it may
        # bring a task for that slot (its handler is done).
        running = self.busy - self.reporting
        if running >= self.slots or self.stopping or (sync and not self.idle):
            log.warning("%s: no free slot for %s, releasing it", self.gpu_id, task.task_id)
            self._in_background(self.release(task))
            return
        job = Job(task, self.idle.pop() if sync else None)
        self.busy += 1
        job.runner = asyncio.create_task(self._run(job, fn), name=f"task-{task.task_id}")
        self.jobs[task.task_id, task.attempt] = job

    async def _run(self, job: Job, fn: Handler | None) -> None:
        task, executor = job.task, job.executor
        pump = ProgressPump(lambda p, m: self._progress(task, p, m))
        try:
            try:
                outcome = await self._execute(job, fn, pump)
            except Exception as exc:  # the agent's own failure, not the handler's
                log.exception("%s: running %s failed", self.gpu_id, task.task_id)
                outcome = Outcome(False, f"worker error: {exc}")
            job.reporting = True
            self.reporting += 1
            await pump.close()
            if outcome is not None:
                await self._report(task, outcome)
            self.jobs.pop((task.task_id, task.attempt), None)
            if outcome is None:
                log.info("%s: stopped %s; not reporting it", self.gpu_id, task.task_id)
                self.beat_now.set()  # no longer listed: the server frees the slot at once
            if executor is not None and not executor.alive:
                await self._restart(executor)
        except asyncio.CancelledError:
            pump.cancel()
            raise
        finally:
            self.jobs.pop((task.task_id, task.attempt), None)
            if executor is not None:
                self.idle.append(executor)
            if job.reporting:
                self.reporting -= 1
            self.busy -= 1
            self.wake.set()

    async def _execute(self, job: Job, fn: Handler | None, pump: ProgressPump) -> Outcome | None:
        """Run the handler under its timeout and the server's stop; None if stopped."""
        task, executor = job.task, job.executor
        if fn is None:
            return Outcome(False, f"no handler for task type {task.task_type}")
        work: asyncio.Future[Outcome]
        if executor is None:
            ctx = TaskContext.for_task(task, pump.push, self.spec.gpu_index, job.flag)
            if job.stopped:  # told to stop before it began: supervise stops it unstarted
                work = asyncio.ensure_future(run_in_loop(fn, task, ctx))
            else:
                started = Started(run_in_loop(fn, task, ctx))
                if started.done:  # ended without suspending: nothing left to supervise
                    return started.value
                work = asyncio.ensure_future(started.resume())
        else:
            if not executor.alive:  # died while idle
                await self._restart(executor)
            work = asyncio.ensure_future(executor.run(task, pump.push))
        return await supervise(job, work, self.opts.stop_grace_s)

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
        """Make a fenced call, retrying transport errors for up to ``REPORT_PATIENCE_S``;
        returns the refusal, if refused."""
        backoff = Backoff(cap=5.0)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + REPORT_PATIENCE_S
        while True:
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
            delay = backoff.step()
            if loop.time() + delay > give_up:
                break
            await asyncio.sleep(delay)
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
        if self.jobs:
            runners = {job.runner for job in self.jobs.values() if job.runner is not None}
            waiters = {
                asyncio.create_task(asyncio.wait(runners)),
                asyncio.create_task(hurry.wait()),
            }
            await asyncio.wait(waiters, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
        left = [job for job in self.jobs.values() if job.runner and not job.runner.done()]
        await asyncio.gather(*(cancel_and_wait(job.runner) for job in left if job.runner))
        if left:
            log.info("%s: releasing %d unfinished task(s)", self.gpu_id, len(left))
            await asyncio.gather(*(self.release(job.task) for job in left))
        if self._background:
            await asyncio.wait(set(self._background))

    async def close(self) -> None:
        await asyncio.gather(*(e.close() for e in self.executors))


async def heartbeat_loop(nodes: Sequence[Node], done: asyncio.Event, interval_s: float) -> None:
    """Beat for every node together, every ``interval_s`` (sooner when a node wants a beat
    now, or after a failure) until ``done``. Beats made together leave as one call (one
    ``POST /api/v2/gpus/heartbeats`` over HTTP, one script call through Redis: both
    transports coalesce), so a box's agent costs the api one request per interval, not
    one per GPU."""
    backoffs = [Backoff(cap=interval_s) for _ in nodes]
    delay = interval_s
    while not await _next_beat(nodes, done, delay):
        delays = await asyncio.gather(*(n.beat(b) for n, b in zip(nodes, backoffs, strict=True)))
        delay = min(delays)


async def _next_beat(nodes: Sequence[Node], done: asyncio.Event, delay: float) -> bool:
    """Wait ``delay`` or until a node wants a beat now; returns whether ``done`` is set."""
    waiters = {asyncio.ensure_future(done.wait())}
    waiters |= {asyncio.ensure_future(n.beat_now.wait()) for n in nodes}
    try:
        await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    for node in nodes:
        node.beat_now.clear()
    return done.is_set()
