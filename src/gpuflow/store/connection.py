"""Redis clients: one pooled client for commands, and dedicated ones for blocking reads.

Their connections pack commands with hiredis's C packer (:func:`packing`): redis-py's
asyncio connection packs in Python, one encode and a few joins per argument, ~15 µs for a
task's create script call (~45 arguments) where hiredis takes ~2 µs; the create and finish
calls are on every task's path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
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
    pool.connection_class = packing(pool.connection_class)
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes it too


async def _send_bounded(conn: Any, command: bytes | str | Iterable[bytes]) -> None:
    """Write a packed command within the connection's socket timeout. redis-py bounds a send
    with ``asyncio.wait_for``: a task per command, whose bytes leave a loop turn later. The
    write itself never waits (the transport buffers what the socket does not take); only the
    drain can, while the transport holds more than its high-water mark. So the deadline
    (``asyncio.timeout``: a timer, ~8 µs here) is armed only when the socket left bytes in
    the buffer; otherwise the drain just checks the connection. Failures end as redis-py's
    do: the connection is closed and the error is redis-py's."""
    if isinstance(command, str):
        command = command.encode()
    writer = conn._writer
    try:
        if isinstance(command, bytes):
            writer.write(command)
        else:
            writer.writelines(command)
        if writer.transport.get_write_buffer_size() == 0:
            await writer.drain()  # returns at once (or raises for a lost connection)
        else:
            async with asyncio.timeout(conn.socket_timeout):
                await writer.drain()
    except TimeoutError as exc:  # an OSError too: this one goes first
        await conn.disconnect(nowait=True)
        raise RedisTimeoutError("Timeout writing to socket") from exc
    except OSError as exc:
        await conn.disconnect(nowait=True)
        raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
    except BaseException:  # e.g. cancelled mid-send: what reached the socket is unknown
        await conn.disconnect(nowait=True)
        raise


_PACKING: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def packing(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls`` packing with ``hiredis.pack_command`` when hiredis is installed (else ``cls``).

    Same bytes as redis-py for what both take (str, bytes, int, float); anything else, a
    command name of several words ("CLIENT SETNAME") and a connection not on strict UTF-8
    go through redis-py's own packer, so its errors (DataError) and quirks stay its own."""
    if cls in _PACKING:
        return _PACKING[cls]
    try:
        from hiredis import pack_command
    except ImportError:  # pragma: no cover - hiredis is a dependency (redis[hiredis])
        return cls

    class Packing(cls):  # type: ignore[valid-type, misc]
        def pack_command(self, *args: Any) -> list[bytes]:
            head = args[0] if args else None
            if (
                isinstance(head, str)
                and " " not in head
                and self.encoder.encoding == "utf-8"
                and self.encoder.encoding_errors == "strict"
            ):
                try:
                    return [pack_command(args)]
                except TypeError:  # a type only redis-py packs, or refuses with DataError
                    pass
            return list(super().pack_command(*args))

        async def send_packed_command(
            self, command: bytes | str | Iterable[bytes], check_health: bool = True
        ) -> None:
            if not self.socket_timeout or not self.is_connected:
                await super().send_packed_command(command, check_health)
                return
            if check_health:
                await self.check_health()
            await _send_bounded(self, command)

    Packing.__name__ = Packing.__qualname__ = f"Packing{cls.__name__}"
    _PACKING[cls] = Packing
    return Packing
