"""Executors: where a handler runs.

* :class:`ProcessExecutor` — one child process per GPU slot for sync handlers, started with
  the ``spawn`` context and ``CUDA_VISIBLE_DEVICES`` pinned to the node's GPU before the
  handlers are imported. The child runs one task at a time and is reused, so whatever the
  handler module loads stays loaded. Messages travel over a duplex pipe that the agent reads
  from its event loop (``add_reader``, no thread): ``ready`` once the handlers are imported,
  ``progress`` any number of times, ``done`` with the outcome. In the child a reader thread
  takes the agent's messages, so that a ``stop`` reaches a running handler: it sets the
  handler's ``ctx.should_stop()`` flag and, with ``interrupt_on_stop``, raises
  :class:`StopRequested` in the child's main thread (``SIGUSR1``). When the child dies the
  pipe reaches EOF and the running task gets a retryable failure; when the agent dies the
  child exits at once (a handler of a lost agent would only hold the GPU).
* :func:`run_in_loop` — async handlers, awaited in the agent's event loop.

Neither enforces a timeout: the node does (:mod:`gpuflow.worker.supervise`), asking the
handler to stop, then killing the child (:meth:`ProcessExecutor.kill`) after the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from gpuflow.core.models import parse_json_or_text
from gpuflow.worker.sdk import (
    Handler,
    Outcome,
    StopRequested,
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
INTERRUPT_SIGNAL = signal.SIGUSR1


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


class _Child:
    """State of a child process shared by its main thread (running handlers) and its reader
    thread (taking the agent's messages)."""

    def __init__(self, conn: Connection, interrupt: bool) -> None:
        self.conn = conn
        self.interrupt = interrupt
        self.inbox: queue.SimpleQueue[ClaimedTask | None] = queue.SimpleQueue()
        self.lock = threading.Lock()  # never taken in the signal handler
        self.send_lock = threading.Lock()
        self.current: tuple[str, threading.Event] | None = None
        self.armed = False  # the main thread is inside a handler: an interrupt may raise
        self.main_ident = threading.get_ident()

    def send(self, *msg: Any) -> None:
        with self.send_lock:
            self.conn.send(msg)

    def read(self) -> None:
        """Reader thread: tasks go to the inbox, stops to the running handler."""
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):  # the agent is gone
                with self.lock:
                    if self.current is not None:
                        os._exit(1)
                self.inbox.put(None)
                return
            if msg[0] == "run":
                self.inbox.put(msg[1])
            elif msg[0] == "stop":
                self.stop(msg[1])
            else:
                self.inbox.put(None)
                return

    def stop(self, task_id: str) -> None:
        with self.lock:
            if self.current is None or self.current[0] != task_id:
                return  # finished meanwhile
            self.current[1].set()
            if self.armed:
                signal.pthread_kill(self.main_ident, INTERRUPT_SIGNAL)

    def on_interrupt(self, signum: int, frame: FrameType | None) -> None:
        if self.armed:
            self.armed = False
            raise StopRequested("the agent asked the handler to stop")

    def call(self, fn: Handler, task: ClaimedTask, ctx: TaskContext) -> Outcome:
        try:
            try:
                self.armed = self.interrupt
                if ctx.should_stop():  # asked before it even started
                    self.armed = False
                    raise StopRequested("stopped before it started")
                return run_sync(fn, task, ctx)
            finally:
                self.armed = False
        except StopRequested as exc:
            return Outcome(False, f"stopped: {exc}", retryable=True)

    def report(self, percent: int, message: str | None) -> None:
        """A handler's progress. In the main thread the interrupt is held off while the
        message is written (a half-written message would break the pipe), then delivered."""
        if threading.get_ident() != self.main_ident:
            self.send("progress", percent, message)
            return
        armed, self.armed = self.armed, False
        try:
            self.send("progress", percent, message)
        finally:
            self.armed = armed
        with self.lock:
            asked = self.current is not None and self.current[1].is_set()
        if armed and asked:
            self.armed = False
            raise StopRequested("the agent asked the handler to stop")

    def serve(self, handlers: dict[int, Handler], gpu_index: int | None) -> None:
        while True:
            task = self.inbox.get()
            if task is None:
                return
            fn = handlers.get(task.task_type)
            flag = threading.Event()
            ctx = TaskContext.for_task(task, self.report, gpu_index, flag)
            with self.lock:
                self.current = (task.task_id, flag)
            if fn is None:
                outcome = Outcome(False, f"no sync handler for task type {task.task_type}")
            else:
                outcome = self.call(fn, task, ctx)
            with self.lock:
                self.current = None
            self.send("done", outcome.ok, outcome.text, outcome.retryable)


def _child_main(
    conn: Connection,
    source: str | bytes,
    env: dict[str, str],
    gpu_index: int | None,
    interrupt: bool = False,
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
    child = _Child(conn, interrupt)
    if interrupt:
        signal.signal(INTERRUPT_SIGNAL, child.on_interrupt)
    child.send("ready", os.getpid())
    threading.Thread(target=child.read, name="gpuflow-agent-reader", daemon=True).start()
    child.serve(handlers, gpu_index)


class ProcessExecutor:
    """One child process serving sync handlers, one task at a time."""

    def __init__(
        self,
        source: str | bytes,
        *,
        gpu_index: int | None = None,
        name: str = "gpuflow-executor",
        start_timeout_s: float = 300.0,
        interrupt: bool = False,
    ) -> None:
        self.source = source
        self.gpu_index = gpu_index
        self.name = name
        self.start_timeout_s = start_timeout_s
        self.interrupt = interrupt
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
            target=_child_main,
            args=(child, self.source, env, self.gpu_index, self.interrupt),
            name=self.name,
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

    def _detach(self) -> None:
        """Stop reading the child; a run waiting for its outcome sees EOF."""
        if self._conn is not None:
            asyncio.get_running_loop().remove_reader(self._conn.fileno())
            self._conn.close()
            self._conn = None
            self._inbox.put_nowait(None)

    async def _reap(self, wait_s: float = 5.0) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        await asyncio.to_thread(proc.join, wait_s)
        return proc.exitcode

    async def run(self, task: ClaimedTask, on_progress: ProgressSink) -> Outcome:
        """Run one task in the child until it ends; a dead (or killed) child gives a
        retryable failure. Cancelling the run kills the child."""
        if self._conn is None:
            return await self._died()
        try:
            self._conn.send(("run", task))
        except OSError:
            return await self._died()
        try:
            while True:
                msg = await self._inbox.get()
                if msg is None:
                    return await self._died()
                if msg[0] == "progress":
                    on_progress(msg[1], msg[2])
                elif msg[0] == "done":
                    return Outcome(bool(msg[1]), str(msg[2]), retryable=bool(msg[3]))
        except asyncio.CancelledError:
            await self.kill()
            raise

    def request_stop(self, task_id: str) -> None:
        """Ask the handler running ``task_id`` to stop (soft): its ``ctx.should_stop()``
        turns true, and with ``interrupt`` it gets :class:`StopRequested`."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(("stop", task_id))

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
                self._conn.send(("exit",))
        self._detach()
        await self._reap(wait_s)
        await self.kill()

    async def restart(self) -> None:
        await self.kill()
        await self.start()


async def run_in_loop(fn: Handler, task: ClaimedTask, ctx: TaskContext) -> Outcome:
    """Await an async handler in this event loop (cancel it to stop it)."""
    try:
        value = await fn(parse_json_or_text(task.payload), ctx)
    except Exception as exc:
        log_failure(task, exc)
        return outcome_of_error(exc)
    return outcome_of_value(value)
