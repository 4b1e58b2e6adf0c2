"""The direct transport: the agent talks to Redis through :mod:`gpuflow.core`.

Core errors map onto the transport's: ``Conflict`` (stale attempt, duplicate report) and
``NotFound`` on a task become :class:`StaleAttempt`; ``NotFound`` on a node (and the claim
script's ``NOGPU`` error) becomes :class:`NodeUnknown`; a lost Redis connection or another
error reply becomes :class:`TransportError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gpuflow.config import Settings, get_settings
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

ORPHAN_PAGES = 100


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

    def __init__(self, store: Store, *, owns_store: bool = False) -> None:
        self.store = store
        self.gpus = Gpus(store)
        self.tasks = Tasks(store, self.gpus)
        self._blocking: Any = store.blocking_client()
        self.dispatcher = Dispatcher(store, self.gpus, self._blocking)
        self._owns_store = owns_store

    @classmethod
    def connect(cls, url: str, settings: Settings | None = None) -> RedisTransport:
        return cls(Store.connect(url, settings or get_settings()), owns_store=True)

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
        with _mapped(node=True):
            await self.gpus.register(spec)

    async def heartbeat(self, gpu_id: str) -> None:
        with _mapped(node=True):
            await self.gpus.heartbeat(gpu_id)

    async def claim(
        self, gpu_id: str, wait_s: float, *, recover: bool = False
    ) -> list[ClaimedTask]:
        with _mapped(node=True):
            if recover:
                await self._fail_orphans(gpu_id)
            views = await self.dispatcher.claim(gpu_id, wait_s, recover=recover)
        return [ClaimedTask.from_view(v) for v in views]

    async def _fail_orphans(self, gpu_id: str) -> None:
        """Tasks still PROCESSING on this GPU when its agent (re)starts ran on a previous
        incarnation that is gone: fail them (retryable), as a lost lease would."""
        orphans: list[dict[str, Any]] = []
        for page in range(1, ORPHAN_PAGES + 1):
            views, total = await self.tasks.list(
                status=TaskStatus.PROCESSING, gpu_id=gpu_id, page=page, size=100
            )
            orphans += [v for v in views if v["gpuId"] == gpu_id]
            if page * 100 >= total:
                break
        for view in orphans:
            # Conflict / NotFound: finished or requeued meanwhile.
            with contextlib.suppress(Conflict, NotFound):
                await self.tasks.finish(
                    view["taskId"],
                    TaskStatus.FAILED,
                    f"the worker of {gpu_id} restarted while attempt {view['attempt']} ran",
                    gpu_id=gpu_id,
                    attempt=view["attempt"],
                )

    async def progress(self, task: ClaimedTask, percent: int, message: str | None) -> None:
        with _mapped():
            await self.tasks.report_progress(
                task.task_id, percent, message, gpu_id=task.gpu_id, attempt=task.attempt
            )

    async def complete(self, task: ClaimedTask, result: str) -> None:
        with _mapped():
            await self.tasks.finish(
                task.task_id,
                TaskStatus.COMPLETED,
                result,
                gpu_id=task.gpu_id,
                attempt=task.attempt,
            )

    async def fail(self, task: ClaimedTask, error: str, *, retryable: bool = True) -> None:
        await self._end(task, TaskStatus.FAILED, error, retryable)

    async def time_out(self, task: ClaimedTask, error: str) -> None:
        await self._end(task, TaskStatus.TIMEOUT, error, True)

    async def _end(self, task: ClaimedTask, status: TaskStatus, text: str, retry: bool) -> None:
        with _mapped():
            await self.tasks.finish(
                task.task_id,
                status,
                text,
                gpu_id=task.gpu_id,
                attempt=task.attempt,
                retryable=retry,
            )

    async def release(self, task: ClaimedTask) -> None:
        with _mapped():
            await self.tasks.requeue(task.task_id, attempt=task.attempt)

    async def close(self) -> None:
        await self._blocking.aclose()
        if self._owns_store:
            await self.store.close()
