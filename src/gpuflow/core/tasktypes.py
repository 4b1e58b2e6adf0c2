"""Per task type defaults: timeout, maxRetries, and whether a task needs its GPU alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpuflow.core.errors import NotFound
from gpuflow.core.ttlcache import TtlCache
from gpuflow.store import Store


@dataclass(frozen=True, slots=True)
class TaskTypeConfig:
    task_type: int
    name: str = ""
    timeout: int | None = None
    max_retries: int | None = None
    exclusive: bool = False

    def view(self) -> dict[str, Any]:
        return {
            "taskType": self.task_type,
            "name": self.name or None,
            "timeout": self.timeout,
            "maxRetries": self.max_retries,
            "exclusive": self.exclusive,
        }


def _parse(task_type: int, h: dict[str, str]) -> TaskTypeConfig:
    return TaskTypeConfig(
        task_type=task_type,
        name=h.get("name", ""),
        timeout=int(h["timeout"]) if h.get("timeout") else None,
        max_retries=int(h["maxRetries"]) if h.get("maxRetries") else None,
        exclusive=h.get("exclusive") == "1",
    )


class TaskTypes:
    """Stored in ``tasktype:{t}``; reads are cached per process for ``CACHE_TTL_S``."""

    CACHE_TTL_S = 2.0

    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: TtlCache[int, TaskTypeConfig] = TtlCache(self.CACHE_TTL_S, self._read)

    async def put(self, cfg: TaskTypeConfig) -> None:
        k = self.store.keys
        fields = {
            "name": cfg.name,
            "timeout": "" if cfg.timeout is None else str(cfg.timeout),
            "maxRetries": "" if cfg.max_retries is None else str(cfg.max_retries),
            "exclusive": "1" if cfg.exclusive else "0",
        }
        async with self.store.redis.pipeline(transaction=True) as p:
            p.hset(k.tasktype(cfg.task_type), mapping=fields)
            p.zadd(k.tasktypes, {str(cfg.task_type): cfg.task_type})
            await p.execute()
        self._cache.drop()

    async def get(self, task_type: int) -> TaskTypeConfig:
        """The stored config, or an all-defaults one for a type nobody configured."""
        return await self._cache.get(task_type)

    async def _read(self, task_type: int) -> TaskTypeConfig:
        return _parse(
            task_type, await self.store.redis.hgetall(self.store.keys.tasktype(task_type))
        )

    async def require(self, task_type: int) -> TaskTypeConfig:
        if not await self.store.redis.exists(self.store.keys.tasktype(task_type)):
            raise NotFound(f"task type {task_type} has no configuration")
        return await self.get(task_type)

    async def all(self) -> list[TaskTypeConfig]:
        k = self.store.keys
        types = [int(t) for t in await self.store.redis.zrange(k.tasktypes, 0, -1)]
        async with self.store.redis.pipeline(transaction=False) as p:
            for t in types:
                p.hgetall(k.tasktype(t))
            hashes = await p.execute()
        return [_parse(t, h) for t, h in zip(types, hashes, strict=True) if h]
