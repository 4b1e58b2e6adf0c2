"""The bounded send of gpuflow's Redis connections (store/connection.py): a write the
server does not take ends after the socket timeout as redis-py's would (TimeoutError, the
connection closed); a normal one goes out without a timer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import TimeoutError as RedisTimeoutError

from gpuflow.store.connection import packing


class StalledServer:
    """Answers +OK to each command line of the handshake, then stops reading its socket."""

    def __init__(self) -> None:
        self.transports: list[asyncio.Transport] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        assert isinstance(transport, asyncio.Transport)
        self.transports.append(transport)
        try:
            while line := await reader.readline():
                if line.startswith(b"*"):
                    writer.write(b"+OK\r\n")
        except (ConnectionError, asyncio.CancelledError):
            pass

    def stall(self) -> None:
        for transport in self.transports:
            transport.pause_reading()


@pytest.fixture
async def stalled() -> AsyncIterator[tuple[StalledServer, int]]:
    fake = StalledServer()
    fake.server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    port = fake.server.sockets[0].getsockname()[1]
    try:
        yield fake, port
    finally:
        for transport in fake.transports:
            transport.close()
        fake.server.close()
        await fake.server.wait_closed()


async def test_a_write_the_server_does_not_take_times_out_and_closes(
    stalled: tuple[StalledServer, int],
) -> None:
    fake, port = stalled
    conn = packing(Connection)(
        host="127.0.0.1", port=port, socket_timeout=0.5, decode_responses=True
    )
    try:
        await conn.send_command("PING")  # connects (and its handshake) on a reading server
        assert await conn.read_response() == "OK"
        fake.stall()
        big = "x" * (64 << 20)  # far past what the socket buffers hold
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError, match="Timeout writing"):
            await conn.send_command("SET", "k", big)
        assert 0.4 < time.monotonic() - started < 5
        assert not conn.is_connected
    finally:
        await conn.disconnect()


async def test_a_write_the_socket_takes_needs_no_timer(
    stalled: tuple[StalledServer, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, port = stalled
    conn = packing(Connection)(
        host="127.0.0.1", port=port, socket_timeout=0.5, decode_responses=True
    )
    try:
        await conn.send_command("PING")
        assert await conn.read_response() == "OK"
        armed: list[float | None] = []
        real = asyncio.timeout

        def spy(delay: float | None) -> asyncio.Timeout:
            armed.append(delay)
            return real(delay)

        monkeypatch.setattr(asyncio, "timeout", spy)
        await conn.send_command("PING")
        assert armed == []  # the socket took it all: no deadline to arm
        monkeypatch.undo()
        assert await conn.read_response() == "OK"
    finally:
        await conn.disconnect()
