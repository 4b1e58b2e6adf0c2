"""Script calls: EVALSHA sent on a pooled connection by ``Scripts`` itself, with redis-py's
full (retrying) path behind it for a failed connection and for NOSCRIPT."""

from __future__ import annotations

import asyncio
from hashlib import sha1

import pytest
from redis.exceptions import ResponseError

from gpuflow.store import Store
from gpuflow.store.kept import KEEP_IDLE

pytestmark = pytest.mark.redis

#: Busy for ~100 ms inside Redis, then answers 'slow'.
SLOW = (
    "local t = redis.call('TIME') "
    "repeat local n = redis.call('TIME') "
    "until (n[1] - t[1]) * 1000000 + (n[2] - t[2]) > 100000 "
    "return 'slow'"
)


async def test_a_call_whose_connection_was_killed_goes_through(store: Store) -> None:
    assert await store.scripts.call("unwait", "gpu-none") == 0  # loaded; its connection kept
    (kept,) = store.scripts.connections._idle
    await kept.send_command("CLIENT", "ID")
    kept_id = int(await kept.read_response())
    async with store.blocking_client() as other:
        await other.client_kill_filter(_id=kept_id)
        assert await store.scripts.call("unwait", "gpu-none") == 0
        assert kept_id not in [int(c["id"]) for c in await other.client_list()]


async def test_kept_connections_are_bounded_and_given_back(store: Store) -> None:
    """Concurrent calls take connections from the pool; at most KEEP_IDLE stay with the
    scripts afterwards, the rest go back; close() gives back those too."""
    pool = store.redis.connection_pool
    await asyncio.gather(*(store.scripts.call("unwait", f"gpu-{i}") for i in range(KEEP_IDLE + 8)))
    assert store.scripts.connections.kept == KEEP_IDLE
    assert len(pool._in_use_connections) == KEEP_IDLE
    await store.scripts.close()
    assert not store.scripts.connections.kept and not pool._in_use_connections
    assert await store.scripts.call("unwait", "gpu-none") == 0  # usable after close


async def test_an_error_reply_keeps_the_connection_clean(store: Store) -> None:
    scripts = store.scripts
    with pytest.raises(ResponseError, match="NOGPU"):
        await scripts.call("claim", "gpu-none", 1000, 1000, 0.8, 0, "compact", 0, 0, "q")
    assert scripts.connections.kept == 1  # read whole: kept; the next call gets its own reply
    assert await scripts.call("unwait", "gpu-none") == 0


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
