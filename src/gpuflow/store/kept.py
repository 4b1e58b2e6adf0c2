"""Commands on connections kept out of redis-py's pool between calls.

redis-py's ``BlockingConnectionPool`` checkout and return (a condition, a lock, a read-ahead
check for stale data, observability hooks) cost ~45 µs per command here, on commands that
run once or twice per task: the create and finish scripts, an idle agent's ``BLPOP`` (whose
return sits between a pushed task's arrival and its handler). :class:`KeptConnections` sends
such a command with the connection's own ``send_command`` / ``read_response`` and keeps up to
``keep`` connections between calls. A kept connection is clean by construction: it is kept
only after its reply was read whole (an error reply included); a call cancelled or failed in
between leaves its connection to the pool, closed by redis-py (which closes a connection on
any failed or cancelled send or read). The kept connections stay the pool's in-use ones, so
dropping the pool's connections (a reset, ``aclose``) drops them too; the next call
reconnects. A call whose connection fails goes redis-py's full way instead, with its
retries (``fallback``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: Connections kept between calls by default (more go back to the pool).
KEEP_IDLE = 16


class KeptConnections:
    """Raw commands of one client on connections it keeps (see the module docstring)."""

    def __init__(self, redis: Redis, keep: int = KEEP_IDLE) -> None:
        self._redis = redis
        self._keep = keep
        self._idle: list[Any] = []  # redis-py connections, checked out of the pool

    @property
    def kept(self) -> int:
        return len(self._idle)

    async def call(self, fallback: Callable[[], Awaitable[Any]], *args: Any) -> Any:
        """The raw reply of command ``args``; ``fallback()`` (redis-py's own call of the
        same command) when the connection fails."""
        pool: Any = self._redis.connection_pool  # redis-py's pool is untyped
        conn = self._idle.pop() if self._idle else await pool.get_connection()
        clean = False  # the reply was read whole: the connection may serve the next call
        try:
            await conn.send_command(*args)
            reply = await conn.read_response()
            clean = True
            return reply
        except ResponseError:  # an error reply, read whole
            clean = True
            raise
        except (RedisConnectionError, RedisTimeoutError):
            pass  # the connection closed itself (redis-py does on any failed send or read)
        finally:
            if clean and len(self._idle) < self._keep:
                self._idle.append(conn)
            else:
                await pool.release(conn)
        return await fallback()

    async def close(self) -> None:
        """Give the kept connections back to the pool (before the client closes it)."""
        pool: Any = self._redis.connection_pool
        idle, self._idle = self._idle, []
        for conn in idle:
            await pool.release(conn)
