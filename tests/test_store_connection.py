"""The store's Redis connections pack commands with hiredis, byte for byte as redis-py."""

from __future__ import annotations

import enum

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from gpuflow.store.connection import make_redis, packing


class _Status(enum.StrEnum):
    DONE = "COMPLETED"


ARGS: list[tuple[object, ...]] = [
    ("EVALSHA", "a" * 40, 0, "gf:", "10000", "", 86400, 0.8, 1e-05, "task_x", '{"i": 1}'),
    ("SET", "k", "héllo wörld", "EX", 10),
    ("ZADD", "z", 1.5, b"raw\x00bytes", -3, _Status.DONE),
    ("GET", 2**70),
]


@pytest.mark.parametrize("args", ARGS)
def test_the_packing_connection_sends_what_redis_py_sends(args: tuple[object, ...]) -> None:
    plain, fast = Connection(), packing(Connection)()
    assert type(fast).__name__ == "PackingConnection"
    assert b"".join(fast.pack_command(*args)) == b"".join(plain.pack_command(*args))


def test_what_hiredis_cannot_pack_goes_through_redis_py() -> None:
    plain, fast = Connection(), packing(Connection)()
    # A command name of several words is split into its words, as redis-py does.
    assert b"".join(fast.pack_command("CLIENT SETNAME", "x")) == b"".join(
        plain.pack_command("CLIENT SETNAME", "x")
    )
    with pytest.raises(DataError):  # redis-py's own refusal, not hiredis's TypeError
        fast.pack_command("SET", "k", None)
    with pytest.raises(DataError):
        fast.pack_command("SET", "k", True)


async def test_a_store_client_round_trips_through_the_packing_connection(
    redis_url: str, namespace: str
) -> None:
    client = make_redis(redis_url)
    try:
        assert client.connection_pool.connection_class.__name__ == "PackingConnection"
        key = f"{namespace}packing"
        await client.set(key, "héllo", ex=60)
        assert await client.get(key) == "héllo"
        await client.zadd(key + ":z", {"m": 2.5})
        assert await client.zscore(key + ":z", "m") == 2.5
        pipe = client.pipeline()
        pipe.incrbyfloat(key + ":f", 0.25).get(key + ":f")
        assert await pipe.execute() == [0.25, "0.25"]
        await client.delete(key, key + ":z", key + ":f")
    finally:
        await client.aclose()
