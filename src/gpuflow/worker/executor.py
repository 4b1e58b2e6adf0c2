"""Executors: where a handler runs.

* :class:`ProcessExecutor` — one child process per GPU slot for sync handlers, started with
  the ``spawn`` context and ``CUDA_VISIBLE_DEVICES`` pinned to the node's GPU before the
  handlers are imported. The child runs one task at a time and is reused, so whatever the
  handler module loads stays loaded. Messages travel over a duplex pipe that the agent reads
  from its event loop (``add_reader``, no thread): ``ready`` once the handlers are imported,
  ``progress`` any number of times, ``done`` with the outcome. When the child dies the pipe
  reaches EOF, the running task gets a retryable failure and the agent starts a new child.
* :func:`run_in_loop` — async handlers, awaited in the agent's event loop.

Both enforce the task's timeout (hard timeout: the child is killed, the coroutine cancelled).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from gpuflow.core.models import parse_json_or_text
from gpuflow.worker.sdk import (
    Handler,
    Outcome,
    TaskContext,
    Worker,
    load_worker,
    log_failure,
    outcome_of_error,
    outcome_of_value,
    run_sync,
)
from gpuflow.worker.transport import ClaimedTask

log = logging.getLogger("gpuflow.worker")

ProgressSink = Callable[[int, str | None], None]


class ExecutorError(RuntimeError):
    """A child process could not be started (its handler module failed to import ...)."""


def handler_source(worker: Worker) -> str | bytes:
    """How a child finds the sync handlers: the worker's ``ref``, else the pickled functions."""
    if worker.ref:
        return worker.ref
    try:
        return pickle.dumps(worker.sync_handlers())
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise TypeError(
            "sync handlers run in child processes and must be importable: define them at "
            "module level, or give the Worker a ref ('package.module:attr') that a child can "
            f"import ({exc})"
        ) from exc


def _load_handlers(source: str | bytes) -> dict[int, Handler]:
    if isinstance(source, str):
        return load_worker(source).sync_handlers()
    handlers: dict[int, Handler] = pickle.loads(source)
    return handlers


def _child_main(
    conn: Connection, source: str | bytes, env: dict[str, str], gpu_index: int | None
) -> None:
    """Entry point of a child: pin the GPU, import the handlers, then serve tasks forever."""
    os.environ.update(env)
    # Ctrl-C reaches the whole process group; the agent decides when a child stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        handlers = _load_handlers(source)
    except BaseException as exc:
        conn.send(("fatal", f"{type(exc).__name__}: {exc}"))
        return
    lock = threading.Lock()

    def report(percent: int, message: str | None) -> None:
        with lock:
            conn.send(("progress", percent, message))

    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the agent is gone
            return
        if msg[0] != "run":
            return
        task: ClaimedTask = msg[1]
        fn = handlers.get(task.task_type)
        if fn is None:
            outcome = Outcome(False, f"no sync handler for task type {task.task_type}")
        else:
            outcome = run_sync(fn, task, TaskContext.for_task(task, report, gpu_index))
        with lock:
            conn.send(("done", outcome.ok, outcome.text, outcome.retryable))


def _timeout_s(task: ClaimedTask) -> float | None:
    return task.timeout_ms / 1000.0 if task.timeout_ms > 0 else None


def _timed_out(task: ClaimedTask, what: str) -> Outcome:
    return Outcome(
        False, f"timed out after {task.timeout_ms} ms; {what}", retryable=True, timed_out=True
    )


class ProcessExecutor:
    """One child process serving sync handlers, one task at a time."""

    def __init__(
        self,
        source: str | bytes,
        *,
        gpu_index: int | None = None,
        name: str = "gpuflow-executor",
        start_timeout_s: float = 300.0,
    ) -> None:
        self.source = source
        self.gpu_index = gpu_index
        self.name = name
        self.start_timeout_s = start_timeout_s
        self.pid: int | None = None
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._inbox: asyncio.Queue[tuple[Any, ...] | None] = asyncio.Queue()

    @property
    def alive(self) -> bool:
        return self._conn is not None and self._proc is not None and self._proc.is_alive()

    async def start(self) -> None:
        """Spawn the child and wait until its handlers are imported."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        env = {}
        if self.gpu_index is not None:  # NVML numbers GPUs in PCI bus order; make CUDA agree
            env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(self.gpu_index)}
        proc = ctx.Process(
            target=_child_main, args=(child, self.source, env, self.gpu_index), name=self.name
        )
        proc.start()
        child.close()
        self._proc, self._conn, self._inbox = proc, parent, asyncio.Queue()
        asyncio.get_running_loop().add_reader(parent.fileno(), self._on_readable)
        try:
            async with asyncio.timeout(self.start_timeout_s):
                msg = await self._inbox.get()
        except TimeoutError:
            await self.kill()
            raise ExecutorError(
                f"{self.name}: handlers not ready after {self.start_timeout_s:g} s"
            ) from None
        if msg is None or msg[0] != "ready":
            why = msg[1] if msg else f"exit code {await self._reap()}"
            await self.kill()
            raise ExecutorError(f"{self.name}: child failed to start: {why}")
        self.pid = int(msg[1])

    def _on_readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            while conn.poll():
                self._inbox.put_nowait(conn.recv())
        except (EOFError, OSError):
            self._detach()
            self._inbox.put_nowait(None)

    def _detach(self) -> None:
        if self._conn is not None:
            asyncio.get_running_loop().remove_reader(self._conn.fileno())
            self._conn.close()
            self._conn = None

    async def _reap(self, wait_s: float = 5.0) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        await asyncio.to_thread(proc.join, wait_s)
        return proc.exitcode

    async def run(self, task: ClaimedTask, on_progress: ProgressSink) -> Outcome:
        """Run one task in the child; a dead child or a timeout gives a failed outcome."""
        if self._conn is None:
            return await self._died()
        try:
            self._conn.send(("run", task))
        except OSError:
            return await self._died()
        cm = asyncio.timeout(_timeout_s(task))
        try:
            async with cm:
                while True:
                    msg = await self._inbox.get()
                    if msg is None:
                        return await self._died()
                    if msg[0] == "progress":
                        on_progress(msg[1], msg[2])
                    elif msg[0] == "done":
                        return Outcome(bool(msg[1]), str(msg[2]), retryable=bool(msg[3]))
        except TimeoutError:
            if not cm.expired():
                raise
            await self.kill()
            return _timed_out(task, f"executor process {self.pid} killed")
        except asyncio.CancelledError:
            await self.kill()
            raise

    async def _died(self) -> Outcome:
        self._detach()
        code = await self._reap()
        return Outcome(
            False,
            f"executor process {self.pid} died (exit code {code}) while running the task",
            retryable=True,
        )

    async def kill(self) -> None:
        self._detach()
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
        await self._reap()

    async def close(self, wait_s: float = 5.0) -> None:
        """Ask the child to exit; kill it when it does not within ``wait_s``."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(("stop",))
        self._detach()
        await self._reap(wait_s)
        await self.kill()

    async def restart(self) -> None:
        await self.kill()
        await self.start()


async def run_in_loop(fn: Handler, task: ClaimedTask, ctx: TaskContext) -> Outcome:
    """Await an async handler in this event loop, with the task's timeout."""
    cm = asyncio.timeout(_timeout_s(task))
    try:
        async with cm:
            value = await fn(parse_json_or_text(task.payload), ctx)
    except TimeoutError as exc:
        if cm.expired():
            return _timed_out(task, "handler cancelled")
        return outcome_of_error(exc)
    except Exception as exc:
        log_failure(task, exc)
        return outcome_of_error(exc)
    return outcome_of_value(value)
