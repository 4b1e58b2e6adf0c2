"""Redis clients: one pooled client for commands, and dedicated ones for blocking reads."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def make_redis(url: str, *, max_connections: int = 64, blocking: bool = False) -> Redis:
    """A client with retry on dropped connections; ``blocking`` ones have no read timeout."""
    return Redis.from_url(
        url,
        decode_responses=True,
        max_connections=max_connections,
        socket_connect_timeout=5,
        socket_timeout=None if blocking else 10,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=5),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
