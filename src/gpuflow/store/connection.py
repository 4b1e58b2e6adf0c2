"""Redis clients: one pooled client for commands, and dedicated ones for blocking reads."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def make_redis(url: str, *, max_connections: int = 64, blocking: bool = False) -> Redis:
    """A client with retry on dropped connections; ``blocking`` ones have no read timeout.

    The pool makes callers wait (up to 10 s) for a free connection when all
    ``max_connections`` are busy, instead of failing with "Too many connections"."""
    pool = BlockingConnectionPool.from_url(
        url,
        decode_responses=True,
        max_connections=max_connections,
        timeout=10,
        socket_connect_timeout=5,
        socket_timeout=None if blocking else 10,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=5),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes it too
