"""TtlCache: one read per key per TTL however many callers ask at once."""

from __future__ import annotations

import asyncio

import pytest

from gpuflow.config import Settings
from gpuflow.core.system import System
from gpuflow.core.tasks import NewTask
from gpuflow.core.ttlcache import TtlCache


class Source:
    """A load function that counts its calls and answers when released."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()
        self.value = "v1"
        self.error: Exception | None = None

    async def load(self, key: str) -> str:
        self.calls += 1
        await self.gate.wait()
        if self.error:
            raise self.error
        return f"{key}:{self.value}"


async def test_concurrent_callers_share_one_read_until_the_ttl_passes() -> None:
    src = Source()
    cache: TtlCache[str, str] = TtlCache(0.2, src.load)
    waiting = [asyncio.ensure_future(cache.get("a")) for _ in range(30)]
    await asyncio.sleep(0)
    src.gate.set()
    assert await asyncio.gather(*waiting) == ["a:v1"] * 30
    assert src.calls == 1
    assert await cache.get("a") == "a:v1" and src.calls == 1  # fresh: no read
    assert await cache.get("b") == "b:v1" and src.calls == 2  # another key: its own read
    src.value = "v2"
    await asyncio.sleep(0.25)
    assert await cache.get("a") == "a:v2" and src.calls == 3


async def test_drop_keeps_a_read_in_flight_from_storing_a_stale_value() -> None:
    src = Source()
    cache: TtlCache[str, str] = TtlCache(60, src.load)
    before = asyncio.ensure_future(cache.get("a"))
    await asyncio.sleep(0)
    cache.drop()  # a write happened while the read was in flight
    src.value = "v2"
    src.gate.set()
    await before  # its caller asked before the write: any answer will do
    assert await cache.get("a") == "a:v2" and src.calls == 2


async def test_a_failed_read_fails_its_callers_and_is_not_kept() -> None:
    src = Source()
    cache: TtlCache[str, str] = TtlCache(60, src.load)
    src.error = RuntimeError("redis down")
    waiting = [asyncio.ensure_future(cache.get("a")) for _ in range(3)]
    await asyncio.sleep(0)
    src.gate.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results) and src.calls == 1
    src.error = None
    assert await cache.get("a") == "a:v1" and src.calls == 2


async def test_a_cancelled_caller_does_not_cancel_the_others() -> None:
    src = Source()
    cache: TtlCache[str, str] = TtlCache(60, src.load)
    first = asyncio.ensure_future(cache.get("a"))
    second = asyncio.ensure_future(cache.get("a"))
    await asyncio.sleep(0)
    first.cancel()
    src.gate.set()
    assert await second == "a:v1"
    with pytest.raises(asyncio.CancelledError):
        await first


@pytest.mark.redis
async def test_concurrent_creates_read_the_type_config_once(
    redis_url: str, settings: Settings
) -> None:
    system = System.connect(redis_url, settings)
    reads = 0
    real = system.store.redis.hgetall

    async def counting(*args: object) -> object:
        nonlocal reads
        reads += 1
        return await real(*args)

    system.store.redis.hgetall = counting
    try:
        created = await asyncio.gather(*(system.tasks.create(NewTask(1, "x")) for _ in range(50)))
        assert len({c["taskId"] for c in created}) == 50
        assert reads == 1  # the type's config, once; the fleet is read with a pipeline
    finally:
        await system.close()


async def test_a_caller_after_drop_does_not_join_the_earlier_read() -> None:
    """A write in this process (drop) is seen by the next get, even while a read that began
    before the write is still in flight."""
    src = Source()
    cache: TtlCache[str, str] = TtlCache(60, src.load)
    before = asyncio.ensure_future(cache.get("a"))
    await asyncio.sleep(0)
    cache.drop()
    after = asyncio.ensure_future(cache.get("a"))
    await asyncio.sleep(0)
    src.value = "v2"  # both reads answer after this; the point is that there are two
    src.gate.set()
    await asyncio.gather(before, after)
    assert src.calls == 2 and after.result() == "a:v2"


async def test_the_cache_stays_bounded_as_keys_come_and_go() -> None:
    src = Source()
    src.gate.set()
    cache: TtlCache[str, str] = TtlCache(60, src.load, max_keys=2)
    for key in ("a", "b", "c"):
        await cache.get(key)
    assert src.calls == 3
    assert await cache.get("c") == "c:v1" and src.calls == 3  # the newest stays cached
    assert await cache.get("a") == "a:v1" and src.calls == 4  # the older ones went
