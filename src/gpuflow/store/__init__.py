"""Redis access: connection, embedded server, key names, Lua scripts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gpuflow.config import Settings
from gpuflow.store.connection import make_redis
from gpuflow.store.keys import Keys
from gpuflow.store.scripts import Scripts

__all__ = ["Keys", "Scripts", "Store"]


@dataclass
class Store:
    """Everything the domain needs to talk to Redis, created once per process."""

    # Typed Any on purpose: redis-py annotates replies as unions of bytes / str / awaitables
    # whatever decode_responses says, which would need a cast at every call site.
    redis: Any
    settings: Settings
    url: str
    keys: Keys = field(init=False)
    scripts: Scripts = field(init=False)

    def __post_init__(self) -> None:
        self.keys = Keys(self.settings.namespace)
        self.scripts = Scripts(self.redis, self.settings.namespace, self.settings.events_maxlen)

    @classmethod
    def connect(cls, url: str, settings: Settings) -> Store:
        return cls(make_redis(url), settings, url)

    def blocking_client(self, max_connections: int = 1000) -> Any:
        """A separate client for blocking reads, so they never starve the command pool."""
        return make_redis(self.url, max_connections=max_connections, blocking=True)

    async def close(self) -> None:
        await self.scripts.close()
        await self.redis.aclose()
