"""The handler side of the worker SDK: :class:`Worker`, :class:`TaskContext`, errors.

A handler is a plain function (or ``async def``) registered for one task type::

    worker = Worker()

    @worker.handler(1)
    def echo(payload: Any, ctx: TaskContext) -> Any:
        ctx.progress(50, "half way")
        return payload

* ``payload`` is the task's payload parsed as JSON when it parses, else the raw string
  (``ctx.raw_payload`` always has the string);
* ``ctx`` is a :class:`TaskContext`: the task's fields (``task_id``, ``task_type``,
  ``attempt``, ``gpu_id``, ``gpu_index``, ``priority``, ``user_id``, ``app``, ``retry_count``,
  ``max_retries``, ``timeout_ms``, ``display_id``) and ``progress(percent, message=None)``, which
  never blocks: the agent forwards the latest value to the system in the background;
* the return value becomes the result: a ``str`` is kept as it is, anything else is stored as
  JSON;
* raising :class:`NonRetryableError` fails the task at once; any other exception is a
  retryable failure whose text becomes the task's ``errorMessage``.

Stopping a handler (its task ran past its ``timeout``, or was canceled): the agent first asks
it to stop, and ``ctx.should_stop()`` (or ``ctx.stop_requested``) turns true. An async handler
is also cancelled (``CancelledError`` at its next ``await``). A sync handler should poll the
flag in its loops and return or raise; with ``Worker(interrupt_on_stop=True)`` the agent also
raises :class:`StopRequested` in it (delivered as ``SIGUSR1`` to the executor's main thread:
it interrupts ``time.sleep`` and Python code, not a C call until that returns). A handler still
running ``GPUFLOW_TIMEOUT_GRACE_MS`` later is killed: its executor process is killed and
started again (an async one is abandoned). A timed-out attempt is reported as a timeout
whatever the handler returns after the request; a canceled one is not reported at all.

Sync handlers run in a child process per GPU slot (one task at a time, the process is reused
so models loaded at import or on first use stay loaded); async handlers run in the agent's
event loop. Sync handlers must be importable: module-level functions, or any callable
registered on a module-level ``Worker`` that the child can import again by its ``ref``
(``"package.module:attr"``; :func:`load_worker` sets it).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from gpuflow.core.models import json_text, parse_json_or_text
from gpuflow.worker.transport import ClaimedTask

Handler = Callable[[Any, "TaskContext"], Any]
H = TypeVar("H", bound=Handler)
ProgressFn = Callable[[int, str | None], None]

log = logging.getLogger("gpuflow.worker")


class NonRetryableError(Exception):
    """Raised by a handler: fail the task now, whatever retries it has left."""


class StopRequested(BaseException):
    """Raised in a sync handler asked to stop, when its Worker has ``interrupt_on_stop``.

    A ``BaseException`` (like ``KeyboardInterrupt``), so that a handler's ``except Exception``
    does not swallow it. A handler may also raise it itself after ``ctx.should_stop()``."""


class StopFlag(Protocol):
    """What ``ctx.should_stop()`` reads: a ``threading.Event`` or a :class:`LoopFlag`."""

    def is_set(self) -> bool: ...

    def set(self) -> None: ...


class LoopFlag:
    """The stop flag of an in-loop (async) handler: set on the loop's thread, read from any
    (a bool under the GIL), without the lock and condition a ``threading.Event`` costs per
    task."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


@dataclass(slots=True)
class TaskContext:
    """What a handler knows about the task it runs, and how it reports progress."""

    task_id: str
    task_type: int
    attempt: int
    gpu_id: str
    raw_payload: str
    priority: int = 0
    display_id: int = 0
    user_id: str | None = None
    app: str | None = None
    timeout_ms: int = 300_000
    retry_count: int = 0
    max_retries: int = 0
    gpu_index: int | None = None
    _report: ProgressFn | None = field(default=None, repr=False)
    _stop: StopFlag = field(default_factory=threading.Event, repr=False)

    @classmethod
    def for_task(
        cls,
        task: ClaimedTask,
        report: ProgressFn | None,
        gpu_index: int | None = None,
        stop: StopFlag | None = None,
    ) -> TaskContext:
        return cls(
            task_id=task.task_id,
            task_type=task.task_type,
            attempt=task.attempt,
            gpu_id=task.gpu_id,
            raw_payload=task.payload,
            priority=task.priority,
            display_id=task.display_id,
            user_id=task.user_id,
            app=task.app,
            timeout_ms=task.timeout_ms,
            retry_count=task.retry_count,
            max_retries=task.max_retries,
            gpu_index=gpu_index,
            _report=report,
            _stop=stop or threading.Event(),
        )

    def progress(self, percent: float, message: str | None = None) -> None:
        """Report progress (0-100). Never blocks; only the latest value is sure to be sent."""
        if not 0 <= percent <= 100:
            raise ValueError(f"progress must be between 0 and 100, not {percent}")
        if self._report is not None:
            self._report(int(percent), message)

    def should_stop(self) -> bool:
        """True once the agent asked this handler to stop (timeout or cancellation); a
        long handler should poll it and return or raise soon after. Thread-safe."""
        return self._stop.is_set()

    @property
    def stop_requested(self) -> bool:
        """The same as :meth:`should_stop`, as a property."""
        return self._stop.is_set()


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an attempt ended, as the agent reports it."""

    ok: bool
    text: str
    retryable: bool = True
    timed_out: bool = False


encode_result = json_text  # a handler's return value as stored


def error_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def outcome_of_error(exc: Exception) -> Outcome:
    return Outcome(False, error_text(exc), retryable=not isinstance(exc, NonRetryableError))


def outcome_of_value(value: Any) -> Outcome:
    try:
        return Outcome(True, encode_result(value))
    except (TypeError, ValueError) as exc:
        return Outcome(False, f"result is not JSON-serializable: {exc}", retryable=False)


def run_sync(fn: Handler, task: ClaimedTask, ctx: TaskContext) -> Outcome:
    """Call a sync handler and turn what it returns or raises into an :class:`Outcome`."""
    try:
        value = fn(parse_json_or_text(task.payload), ctx)
    except Exception as exc:
        log_failure(task, exc)
        return outcome_of_error(exc)
    return outcome_of_value(value)


def log_failure(task: ClaimedTask, exc: Exception) -> None:
    """Unexpected errors with their traceback; a NonRetryableError is a decision, one line."""
    log.warning(
        "task %s (type %d, attempt %d) failed: %s",
        task.task_id,
        task.task_type,
        task.attempt,
        error_text(exc),
        exc_info=not isinstance(exc, NonRetryableError),
    )


def is_async_handler(fn: Handler) -> bool:
    """True for ``async def`` functions and for objects whose ``__call__`` is ``async def``."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


class Worker:
    """Handlers per task type. Give them at construction or with :meth:`handler`.

    ``ref`` (``"module:attr"``) names where a child process can import this worker again; it
    is needed only when a sync handler cannot be pickled by reference (a lambda, a closure).
    ``interrupt_on_stop`` raises :class:`StopRequested` in a sync handler asked to stop
    (see the module docstring).
    """

    def __init__(
        self,
        handlers: Mapping[int, Handler] | None = None,
        *,
        ref: str | None = None,
        interrupt_on_stop: bool = False,
    ) -> None:
        self.handlers: dict[int, Handler] = {}
        self.ref = ref
        self.interrupt_on_stop = interrupt_on_stop
        for task_type, fn in (handlers or {}).items():
            self.add(task_type, fn)

    def add(self, task_type: int, fn: Handler) -> None:
        if not callable(fn):
            raise TypeError(f"handler for task type {task_type} is not callable")
        if task_type in self.handlers:
            raise ValueError(f"task type {task_type} already has a handler")
        self.handlers[int(task_type)] = fn

    def handler(self, task_type: int) -> Callable[[H], H]:
        """Decorator: ``@worker.handler(3)`` registers the function for task type 3."""

        def register(fn: H) -> H:
            self.add(task_type, fn)
            return fn

        return register

    @property
    def task_types(self) -> list[int]:
        return sorted(self.handlers)

    def is_async(self, task_type: int) -> bool:
        return is_async_handler(self.handlers[task_type])

    def sync_handlers(self) -> dict[int, Handler]:
        return {t: fn for t, fn in self.handlers.items() if not is_async_handler(fn)}


def load_worker(ref: str) -> Worker:
    """Import ``"package.module:attr"`` (attr may be dotted) and return that :class:`Worker`."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected module:attr, got {ref!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{module_name} has no attribute {attr!r}") from None
    if not isinstance(obj, Worker):
        raise TypeError(f"{ref} is a {type(obj).__name__}, not a gpuflow Worker")
    if obj.ref is None:
        obj.ref = ref
    return obj
