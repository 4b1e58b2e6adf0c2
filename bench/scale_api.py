"""Scale bench, HTTP side: a ``gpuflow api`` process and a lean keep-alive HTTP/1.1 client.

The client is a few lines over asyncio streams rather than httpx, so that the load generator
costs little CPU next to the api process it measures on a small machine.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

ADMIN_KEY = "scale-bench-admin-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gpuflow_command() -> list[str]:
    beside = Path(sys.executable).parent / "gpuflow"
    found = str(beside) if beside.is_file() else shutil.which("gpuflow")
    if not found:
        raise RuntimeError("no gpuflow command (install the project in this environment)")
    return [found]


@contextmanager
def _served(
    what: str, argv: list[str], port: int, env: dict[str, str] | None = None
) -> Iterator[tuple[int, psutil.Process]]:
    """Run ``argv`` until ``http://127.0.0.1:{port}/health`` answers 200 (any answer will do
    for a server without that route); yields (port, its psutil process), then stops it."""
    proc = subprocess.Popen(
        argv,
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{what} did not start") from None
                time.sleep(0.1)
        yield port, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def api_process(redis_url: str, namespace: str) -> Iterator[tuple[int, psutil.Process]]:
    """``gpuflow api`` on a free port (it also campaigns for the leader lease and, leading,
    runs the maintenance loop); yields (port, its psutil process)."""
    port = _free_port()
    env = {
        **os.environ,
        "GPUFLOW_REDIS_URL": redis_url,
        "GPUFLOW_NAMESPACE": namespace,
        "GPUFLOW_ADMIN_KEY": ADMIN_KEY,
    }
    argv = [*_gpuflow_command(), "api", "--port", str(port)]
    with _served("gpuflow api", argv, port, env) as served:
        yield served


@contextmanager
def floor_process() -> Iterator[tuple[int, psutil.Process]]:
    """``bench/floor_app.py`` (uvicorn + a raw ASGI app) on a free port; (port, process)."""
    port = _free_port()
    argv = [sys.executable, "-m", "bench.floor_app", str(port)]
    with _served("bench.floor_app", argv, port) as served:
        yield served


class Http:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1."""

    def __init__(self, port: int, key: str = ADMIN_KEY) -> None:
        self.port = port
        self.key = key
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {self.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)
