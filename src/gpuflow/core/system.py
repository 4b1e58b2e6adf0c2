"""The domain services of one process, built once over one Redis connection."""

from __future__ import annotations

from typing import Any

from gpuflow.config import Settings
from gpuflow.core.alerts import Alerts
from gpuflow.core.apikeys import ApiKeys
from gpuflow.core.dispatch import Dispatcher
from gpuflow.core.gpus import Gpus
from gpuflow.core.tasks import Tasks
from gpuflow.core.tasktypes import TaskTypes
from gpuflow.store import Store


class System:
    """Store + services; the API keeps one in ``app.state.system``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.settings = store.settings
        self.gpus = Gpus(store)
        self.task_types = TaskTypes(store)
        self.tasks = Tasks(store, self.gpus, self.task_types)
        self._blocking: Any = store.blocking_client()
        self.dispatch = Dispatcher(store, self.gpus, self._blocking)
        self.keys = ApiKeys(store, store.settings.admin_key)
        self.alerts = Alerts(store)

    @classmethod
    def connect(cls, url: str, settings: Settings) -> System:
        return cls(Store.connect(url, settings))

    async def ping(self) -> bool:
        try:
            return bool(await self.store.redis.ping())
        except Exception:
            return False

    async def close(self) -> None:
        await self.dispatch.close()
        await self._blocking.aclose()
        await self.store.close()
