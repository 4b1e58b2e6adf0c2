"""Script calls: EVALSHA sent on a pooled connection by ``Scripts`` itself, with redis-py's
full (retrying) path behind it for a failed connection and for NOSCRIPT."""

from __future__ import annotations

import asyncio
from hashlib import sha1

import pytest

from gpuflow.store import Store

pytestmark = pytest.mark.redis

#: Busy for ~100 ms inside Redis, then answers 'slow'.
SLOW = (
    "local t = redis.call('TIME') "
    "repeat local n = redis.call('TIME') "
    "until (n[1] - t[1]) * 1000000 + (n[2] - t[2]) > 100000 "
    "return 'slow'"
)


async def test_a_call_whose_connection_was_killed_goes_through(store: Store) -> None:
    r = store.redis
    assert await store.scripts.call("unwait", "gpu-none") == 0  # loaded, pooled
    name = f"scripts-test-{store.keys.prefix.strip(':')}"
    await r.client_setname(name)  # the pool's one connection so far
    async with store.blocking_client() as other:
        killed = [c["id"] for c in await other.client_list() if c["name"] == name]
        assert killed
        for cid in killed:
            await other.client_kill_filter(_id=cid)
        assert await store.scripts.call("unwait", "gpu-none") == 0
        assert not [c for c in await other.client_list() if c["name"] == name]


async def test_a_cancelled_call_leaves_no_reply_for_the_next_one(store: Store) -> None:
    scripts = store.scripts
    scripts._sources["slow"] = SLOW
    scripts._shas["slow"] = sha1(SLOW.encode()).hexdigest()
    assert await scripts.call("slow") == "slow"  # loaded
    slow = asyncio.ensure_future(scripts.call("slow"))
    await asyncio.sleep(0.03)  # sent, its reply not read yet
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    # The next calls get their own replies, not the cancelled call's 'slow'.
    for _ in range(3):
        assert await scripts.call("unwait", "gpu-none") == 0
