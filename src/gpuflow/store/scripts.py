"""Lua scripts: every multi-key state change is one of these, run atomically by Redis.

Each script file documents its ARGV contract and return value in its header. The shared
prelude ``lua/lib.lua`` is prepended to each one (the definitions the script uses); it takes
the key prefix as ARGV[1] and the events MAXLEN as ARGV[2], so that scripts can name the keys
a transition touches (queues, indexes) which are only known once the task hash has been read.
That makes gpuflow unsuitable for Redis Cluster; it targets one primary (with replicas /
Sentinel).
"""

from __future__ import annotations

import re
from functools import cache
from hashlib import sha1
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from gpuflow.store.kept import KeptConnections

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


#: A top-level definition of lib.lua (every one starts a line with ``local``).
_DEFINITION = re.compile(r"^local (?:function )?([A-Za-z_]\w*)", re.MULTILINE)
_NAME = re.compile(r"[A-Za-z_]\w*")


def _lua(name: str) -> str:
    return (resources.files("gpuflow.store") / "lua" / name).read_text()


@cache
def lib_source() -> str:
    return _lua("lib.lua")


def _lib_parts() -> list[tuple[str, str]]:
    """lib.lua cut before each top-level definition: (name defined, its text)."""
    lib = lib_source()
    starts = [(m.start(), m.group(1)) for m in _DEFINITION.finditer(lib)]
    ends = [start for start, _ in starts[1:]] + [len(lib)]
    return [(name, lib[start:end]) for (start, name), end in zip(starts, ends, strict=True)]


@cache
def script_source(name: str) -> str:
    """The script with the part of the prelude it uses (what its text names, and what
    that names in turn), in the prelude's order. Redis runs the prelude on every call and
    collects its closures as garbage: the whole of it cost each call more than a short
    script's own work (docs/architecture.md, "One awaited task, hop by hop")."""
    body = _lua(f"{name}.lua")
    parts = _lib_parts()
    defined = {part_name for part_name, _ in parts}
    uses = {part_name: set(_NAME.findall(text)) & defined for part_name, text in parts}
    needed: set[str] = set()
    todo = list(set(_NAME.findall(body)) & defined)
    while todo:
        part_name = todo.pop()
        if part_name not in needed:
            needed.add(part_name)
            todo.extend(uses[part_name] - needed)
    prelude = "".join(text for part_name, text in parts if part_name in needed)
    return prelude + "\n" + body


class Scripts:
    """The scripts of one Redis client, called with the prefix filled in.

    Each call sends EVALSHA itself on a kept connection (:mod:`gpuflow.store.kept`), loading
    the script on NOSCRIPT (after a Redis restart or against a new server): not through
    redis-py's ``AsyncScript`` (an ``isinstance`` check against a typing Protocol per call)
    nor ``Redis.execute_command``, whose per-command layers (retry closures, observability
    hooks awaited even when off) cost ~15 µs of a ~130 µs round trip here, on a path that
    runs once or twice per task. A call whose connection fails goes the client's full way
    instead, with its retries: one attempt more than before."""

    def __init__(self, redis: Redis, prefix: str, events_maxlen: int) -> None:
        self._redis = redis
        self._head = [prefix, str(events_maxlen)]
        self._sources = {name: script_source(name) for name in SCRIPT_NAMES}
        self._shas = {name: sha1(src.encode()).hexdigest() for name, src in self._sources.items()}
        self.connections = KeptConnections(redis)

    async def call(self, name: str, *args: Any) -> Any:
        sha = self._shas[name]
        try:
            return await self.connections.call(
                lambda: self._redis.evalsha(sha, 0, *self._head, *args),
                "EVALSHA",
                sha,
                0,
                *self._head,
                *args,
            )
        except NoScriptError:
            await self._redis.script_load(self._sources[name])
            return await self._redis.evalsha(sha, 0, *self._head, *args)

    async def close(self) -> None:
        """Give the kept connections back to the pool (before the client closes it)."""
        await self.connections.close()
