"""Cluster membership: every process (api or worker) publishes itself with a heartbeat."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from gpuflow import __version__
from gpuflow.store import Store

log = logging.getLogger("gpuflow.cluster")


def new_instance_id(kind: str) -> str:
    return f"{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Membership:
    """Publishes ``instance:{id}`` (expiring) and its score in ``instances``."""

    def __init__(
        self, store: Store, instance_id: str, role: Callable[[], str], period_s: float = 2.0
    ) -> None:
        self.store = store
        self.instance_id = instance_id
        self.role = role
        self.period_s = period_s
        self.start_time = int(time.time() * 1000)

    async def beat(self) -> None:
        k = self.store.keys
        now = int(time.time() * 1000)
        record = {
            "instance_id": self.instance_id,
            "role": self.role(),
            "status": "ACTIVE",
            "start_time": self.start_time,
            "last_heartbeat": now,
            "version": __version__,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        async with self.store.redis.pipeline(transaction=True) as p:
            p.hset(k.instance(self.instance_id), mapping=record)
            p.pexpire(k.instance(self.instance_id), int(self.period_s * 3000))
            p.zadd(k.instances, {self.instance_id: now})
            p.zremrangebyscore(k.instances, "-inf", now - int(self.period_s * 30_000))
            await p.execute()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.beat()
            except Exception as exc:
                log.warning("instance heartbeat: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.period_s)
        with contextlib.suppress(Exception):
            k = self.store.keys
            await self.store.redis.delete(k.instance(self.instance_id))
            await self.store.redis.zrem(k.instances, self.instance_id)


async def instances(store: Store) -> list[dict[str, Any]]:
    """Live instances (their record has not expired), oldest first."""
    k = store.keys
    ids = await store.redis.zrange(k.instances, 0, -1)
    async with store.redis.pipeline(transaction=False) as p:
        for instance_id in ids:
            p.hgetall(k.instance(instance_id))
        records = await p.execute()
    out = []
    for r in records:
        if r:
            for f in ("start_time", "last_heartbeat", "pid"):
                r[f] = int(r[f])
            out.append(r)
    return out
