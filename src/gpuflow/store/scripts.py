"""Lua scripts: every multi-key state change is one of these, run atomically by Redis.

Each script file documents its ARGV contract and return value in its header. The shared
prelude ``lua/lib.lua`` is prepended to each one; it takes the key prefix as ARGV[1] and the
events MAXLEN as ARGV[2], so that scripts can name the keys a transition touches (queues,
indexes) which are only known once the task hash has been read. That makes gpuflow
unsuitable for Redis Cluster; it targets one primary (with replicas / Sentinel).
"""

from __future__ import annotations

from functools import cache
from hashlib import sha1
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

SCRIPT_NAMES = (
    "create_task",
    "claim",
    "finish_task",
    "progress",
    "start_task",
    "requeue_task",
    "promote_delayed",
    "register_gpu",
    "heartbeat_gpu",
    "set_gpu_status",
    "delete_gpu",
    "expire_leases",
    "mark_offline",
    "reclaim_pending",
    "cancel_task",
    "check_timeouts",
    "sweep_locks",
    "purge_finished",
    "unwait",
)


@cache
def script_source(name: str) -> str:
    lua = resources.files("gpuflow.store") / "lua"
    return (lua / "lib.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


class Scripts:
    """The scripts of one Redis client, called with the prefix filled in.

    Called by EVALSHA straight on the client (loading the script on NOSCRIPT, after a Redis
    restart or against a new server) rather than through redis-py's ``AsyncScript``, whose
    every call runs an ``isinstance`` check against a typing Protocol: measurable on a path
    that runs once per task."""

    def __init__(self, redis: Redis, prefix: str, events_maxlen: int) -> None:
        self._redis = redis
        self._head = [prefix, str(events_maxlen)]
        self._sources = {name: script_source(name) for name in SCRIPT_NAMES}
        self._shas = {name: sha1(src.encode()).hexdigest() for name, src in self._sources.items()}

    async def call(self, name: str, *args: Any) -> Any:
        try:
            return await self._redis.evalsha(self._shas[name], 0, *self._head, *args)
        except NoScriptError:
            await self._redis.script_load(self._sources[name])
            return await self._redis.evalsha(self._shas[name], 0, *self._head, *args)
