"""The end-to-end row's floor: gpuflow's six hops for one awaited task with nothing in them.

client → api (a raw ASGI app on uvicorn, the settings ``gpuflow api`` uses) → Redis (a
two-command script: HSET the task, RPUSH it to the worker's list) → worker (``BLPOP``
returns it) → Redis (a two-command script: HSET the result, PUBLISH it) → api (its one
pattern subscription) → client. No auth, no validation, no indexes, timers, events or
fencing: what the same chain costs with no work in it, so that the report shows how much of
gpuflow's time is its own. Redis keys under ``floor:`` (the run flushes between systems).

``python -m bench.e2e_floor api PORT`` / ``python -m bench.e2e_floor worker`` (both read
``BENCH_REDIS_URL``); :func:`drive` is the client.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
import time
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aredis
import uvicorn
from starlette.types import Receive, Scope, Send

CREATE = (
    "redis.call('HSET', KEYS[1], 'status', 'PROCESSING', 'payload', ARGV[2]) "
    "redis.call('RPUSH', 'floor:inbox', ARGV[1] .. '\\n' .. ARGV[2]) return 1"
)
FINISH = (
    "redis.call('HSET', KEYS[1], 'status', 'COMPLETED', 'result', ARGV[2]) "
    "redis.call('PUBLISH', 'floor:evf:' .. ARGV[1], ARGV[2]) return 1"
)
HEADERS = [(b"content-type", b"application/json")]


class FloorApi:
    """The ASGI app: POST creates a task and answers when its note arrives; GET answers 200."""

    def __init__(self) -> None:
        self._redis: aredis.Redis | None = None
        self._waiting: dict[str, asyncio.Future[str]] = {}
        self._ids = itertools.count()
        self._reader: asyncio.Task[None] | None = None

    async def _read(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message(timeout=10.0)
            if message and message["type"] == "pmessage":
                waiter = self._waiting.pop(message["channel"].removeprefix("floor:evf:"), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message["data"])

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._redis = aredis.Redis.from_url(
                    os.environ["BENCH_REDIS_URL"], decode_responses=True
                )
                pubsub = self._redis.pubsub()
                await pubsub.psubscribe("floor:evf:*")
                self._reader = asyncio.create_task(self._read(pubsub))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._reader is not None:
                    self._reader.cancel()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        data: Any = "ok"
        if scope["method"] == "POST" and self._redis is not None:
            task_id = f"t{next(self._ids)}"
            note = asyncio.get_running_loop().create_future()
            self._waiting[task_id] = note
            payload = orjson.loads(body)["payload"]
            await self._redis.eval(CREATE, 1, f"floor:task:{task_id}", task_id, payload)
            data = {"taskId": task_id, "status": "COMPLETED", "result": await note}
        out = orjson.dumps({"code": 200, "message": "success", "data": data})
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": out})


async def worker(stop: asyncio.Event) -> None:
    """Take each pushed task and finish it at once, until ``stop``."""
    url = os.environ["BENCH_REDIS_URL"]
    commands = aredis.Redis.from_url(url, decode_responses=True)
    blocking = aredis.Redis.from_url(url, decode_responses=True)
    while not stop.is_set():
        reply = await blocking.blpop(["floor:inbox"], timeout=1)
        if reply:
            task_id, payload = reply[1].split("\n", 1)
            await commands.eval(FINISH, 1, f"floor:task:{task_id}", task_id, payload)


async def drive(url: str, m: int, deadline_s: float) -> dict[str, float]:
    """``m`` sequential create-and-waits (after one warm-up); p50 / p99 in ms."""
    samples: list[float] = []
    async with aiohttp.ClientSession() as session, asyncio.timeout(deadline_s):
        for i in range(-1, m):
            body = orjson.dumps({"taskType": 1, "payload": orjson.dumps({"i": i}).decode()})
            t0 = time.perf_counter()
            async with session.post(
                url, data=body, headers={"Content-Type": "application/json"}
            ) as answer:
                done = orjson.loads(await answer.read())
            if i >= 0:
                samples.append((time.perf_counter() - t0) * 1000)
            if done["data"]["status"] != "COMPLETED":
                raise RuntimeError(f"floor answered {done}")
    samples.sort()
    return {
        "p50": samples[len(samples) // 2],
        "p99": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        "n": len(samples),
    }


def _run_worker() -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await worker(stop)

    import uvloop

    uvloop.run(main())


if __name__ == "__main__":
    if sys.argv[1:2] == ["api"]:
        uvicorn.run(
            FloorApi(), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning",
            access_log=False, loop="auto", http="auto", lifespan="on",
        )  # fmt: skip
    elif sys.argv[1:2] == ["worker"]:
        _run_worker()
    else:
        raise SystemExit("usage: python -m bench.e2e_floor api PORT | worker")
