"""The direct transport: the agent talks to Redis through :mod:`gpuflow.core`.

Core errors map onto the transport's: ``Conflict`` (stale attempt, duplicate report) and
``NotFound`` on a task become :class:`StaleAttempt`; ``NotFound`` on a node (and the claim
script's ``NOGPU`` error) becomes :class:`NodeUnknown`; a lost Redis connection or another
error reply becomes :class:`TransportError`.

Every call has a deadline (``op_timeout_s``, plus the wait of a claim). A connection can
die without the client noticing (a failover, a cut network: no FIN, no RST), and a blocking
``XREADGROUP`` on it would then wait forever while the agent believes it is claiming. A call
past its deadline drops every pooled connection and fails with :class:`TransportError`; the
agent retries, on fresh connections. Reports (complete, fail, time out), which go out in
batches, have one deadline per batch (``Tasks(report_timeout_s=...)``) instead of a timer
per task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, NoReturn

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gpuflow.config import Settings, get_settings
from gpuflow.core.cluster import Membership, new_instance_id
from gpuflow.core.dispatch import Dispatcher
from gpuflow.core.errors import Conflict, GpuflowError, NotFound
from gpuflow.core.gpus import Gpus, GpuSpec
from gpuflow.core.models import TaskStatus, Tier
from gpuflow.core.tasks import Tasks
from gpuflow.store import Store
from gpuflow.worker.transport import (
    ClaimedTask,
    NodeSpec,
    NodeUnknown,
    StaleAttempt,
    TransportError,
    TransportRejected,
)

log = logging.getLogger("gpuflow.worker")

OP_TIMEOUT_S = 15.0


@contextlib.contextmanager
def _mapped(node: bool = False) -> Iterator[None]:
    try:
        yield
    except Conflict as exc:
        raise StaleAttempt(str(exc)) from exc
    except NotFound as exc:
        raise (NodeUnknown if node else StaleAttempt)(str(exc)) from exc
    except GpuflowError as exc:
        raise TransportRejected(str(exc)) from exc
    except ResponseError as exc:
        if str(exc).startswith("NOGPU"):  # the claim script's reply for a deleted node
            raise NodeUnknown(str(exc)) from exc
        raise TransportError(f"Redis: {exc}") from exc  # READONLY during a failover ...
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise TransportError(f"Redis: {exc}") from exc


class RedisTransport:
    """Transport over a :class:`Store`; ``connect`` makes one that owns its store."""

    def __init__(
        self, store: Store, *, owns_store: bool = False, op_timeout_s: float = OP_TIMEOUT_S
    ) -> None:
        self.store = store
        self.gpus = Gpus(store)
        self.tasks = Tasks(store, self.gpus, report_timeout_s=op_timeout_s)
        self._blocking: Any = store.blocking_client()
        self.dispatcher = Dispatcher(store, self.gpus, self._blocking)
        self._owns_store = owns_store
        self.op_timeout_s = op_timeout_s
        self._reset_at = float("-inf")

    @classmethod
    def connect(
        cls, url: str, settings: Settings | None = None, *, op_timeout_s: float = OP_TIMEOUT_S
    ) -> RedisTransport:
        store = Store.connect(url, settings or get_settings())
        return cls(store, owns_store=True, op_timeout_s=op_timeout_s)

    @contextlib.asynccontextmanager
    async def _call(self, node: bool = False, wait_s: float = 0.0) -> AsyncIterator[None]:
        """Map core errors (see the module docstring); give up after the deadline."""
        deadline = asyncio.timeout(self.op_timeout_s + wait_s)
        try:
            async with deadline:
                with _mapped(node):
                    yield
        except TimeoutError:
            if not deadline.expired():
                raise
            await self._no_answer()

    async def _no_answer(self) -> NoReturn:
        """A call ran past its deadline: drop every connection, once for all the calls
        (e.g. a batch of reports) that give up together."""
        now = asyncio.get_running_loop().time()
        if now - self._reset_at > 1.0:
            self._reset_at = now
            log.warning("Redis did not answer in %.1f s; reconnecting", self.op_timeout_s)
            await self.reset()
        raise TransportError(f"Redis: no answer within {self.op_timeout_s:g} s") from None

    async def reset(self) -> None:
        """Drop every connection (in use or not); the next calls open fresh ones."""
        for client in (self.store.redis, self._blocking):
            with contextlib.suppress(Exception):
                await client.connection_pool.disconnect()

    async def register(self, node: NodeSpec) -> None:
        spec = GpuSpec(
            gpu_id=node.gpu_id,
            supported_task_types=list(node.supported_task_types),
            supported_task_priority=Tier(node.supported_task_priority),
            max_concurrent_tasks=node.max_concurrent_tasks,
            hostname=node.hostname,
            ip=node.ip,
            port=node.port,
            version=node.version,
            metadata=dict(node.metadata),
        )
        async with self._call(node=True):
            await self.gpus.register(spec)

    async def heartbeat(self, gpu_id: str, running: Mapping[str, int]) -> list[str]:
        async with self._call(node=True):
            reply = await self.gpus.heartbeat(gpu_id, running)
        return list(reply.stop)

    async def claim(
        self, gpu_id: str, wait_s: float, *, recover: bool = False
    ) -> list[ClaimedTask]:
        async with self._call(node=True, wait_s=wait_s):
            rows = await self.dispatcher.claim_rows(gpu_id, wait_s, recover=recover, push=True)
        return [ClaimedTask.from_row(row) for row in rows]

    async def stop_waiting(self, gpu_id: str) -> bool:
        async with self._call(node=True):
            await self.dispatcher.unwait(gpu_id)
        return True

    async def presence(self, stop: asyncio.Event) -> None:
        member = Membership(self.store, new_instance_id("worker"), lambda: "WORKER")
        await member.run(stop)

    async def progress(self, task: ClaimedTask, percent: int, message: str | None) -> None:
        async with self._call():
            await self.tasks.report_progress(
                task.task_id, percent, message, gpu_id=task.gpu_id, attempt=task.attempt
            )

    async def complete(self, task: ClaimedTask, result: str) -> None:
        await self._end(task, TaskStatus.COMPLETED, result, True)

    async def fail(self, task: ClaimedTask, error: str, *, retryable: bool = True) -> None:
        await self._end(task, TaskStatus.FAILED, error, retryable)

    async def time_out(self, task: ClaimedTask, error: str) -> None:
        await self._end(task, TaskStatus.TIMEOUT, error, True)

    async def _end(self, task: ClaimedTask, status: TaskStatus, text: str, retry: bool) -> None:
        """A report, batched with the others of its loop tick; the batch has the deadline."""
        with _mapped():
            try:
                await self.tasks.finish(
                    task.task_id,
                    status,
                    text,
                    gpu_id=task.gpu_id,
                    attempt=task.attempt,
                    retryable=retry,
                )
            except TimeoutError:  # the batch's deadline (an OSError: before _mapped sees it)
                await self._no_answer()

    async def release(self, task: ClaimedTask) -> None:
        async with self._call():
            await self.tasks.requeue(task.task_id, attempt=task.attempt)

    async def close(self) -> None:
        await self.dispatcher.close()
        await self._blocking.aclose()
        if self._owns_store:
            await self.store.close()
