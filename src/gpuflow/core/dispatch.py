"""Claiming work for a GPU: one Lua call that starts tasks up to the node's free capacity.

A node that finds nothing waits in a blocking ``XREADGROUP`` on all its streams. Redis hands
each new entry to exactly one blocked consumer of the group, so a new task wakes one idle
node, not all of them. The entry it received is passed into the claim script, which starts
it (or puts it back when the node is no longer able to take it) atomically.

A claim first runs the script without a read (it sees a busy or faulty node before taking an
entry it could not run), except right after a claim that left room for one task per stream:
that one read its streams until they were empty, so the next goes straight to the blocking
read, which answers at once if entries came meanwhile (at most one per stream, all of which
fit, and the script takes them in priority order). An idle node's cycle (wake, start,
report, wait) is then one script call, not two.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from redis.exceptions import ResponseError

from gpuflow.core.errors import NotFound
from gpuflow.core.gpus import Gpus
from gpuflow.core.models import task_view
from gpuflow.core.tasks import started_tasks
from gpuflow.core.ttlcache import TtlCache
from gpuflow.store import Store
from gpuflow.store.keys import GROUP

#: How long a node's stream list is reused before it is read again. The claim script checks
#: the node's status and existence itself on every call; a new registration made through
#: this process is seen at once (Gpus.generation), one made through another process (the
#: node's types changed) within this long.
STREAMS_TTL_S = 1.0
#: Bound of the set of GPUs whose last claim emptied their streams (ids of deleted GPUs
#: would otherwise stay in it); past it the set starts over.
MAX_DRAINED = 100_000


#: A compact claim's fields, in the order claim.lua answers them.
COMPACT_FIELDS = (
    "taskId",
    "taskType",
    "attempt",
    "gpuId",
    "payload",
    "priority",
    "displayId",
    "userId",
    "app",
    "timeout",
    "retryCount",
    "maxRetries",
)


def _compact_view(row: list[Any]) -> dict[str, Any]:
    """The compact row as a TaskDO view (the same types; the fields it lacks are None)."""
    return task_view(dict(zip(COMPACT_FIELDS, row, strict=True)))


class Dispatcher:
    """Claims for GPUs; ``blocking`` is a client reserved for blocking reads."""

    def __init__(self, store: Store, gpus: Gpus, blocking: Any) -> None:
        self.store = store
        self.gpus = gpus
        self.blocking = blocking
        self._streams: TtlCache[str, list[str]] = TtlCache(STREAMS_TTL_S, self._read_streams)
        self._generation = gpus.generation
        #: GPUs whose last claim read their streams empty and left room for one task per
        #: stream: their next claim may go straight to the blocking read (``_note``).
        self._drained: set[str] = set()

    async def _node_streams(self, gpu_id: str) -> list[str]:
        """The streams the node reads, highest priority first (cached ``STREAMS_TTL_S``)."""
        if self._generation != self.gpus.generation:  # a registration through this process
            self._generation = self.gpus.generation
            self._streams.drop()
        return await self._streams.get(gpu_id)

    async def _read_streams(self, gpu_id: str) -> list[str]:
        h = await self.store.redis.hmget(
            self.store.keys.gpu(gpu_id), "supportedTaskTypes", "supportedTaskPriority"
        )
        if h[0] is None:
            raise NotFound(f"GPU {gpu_id} not registered")
        return self.gpus.streams_for(json.loads(h[0] or "[]"), h[1] or "NORMAL")

    async def _claim(
        self,
        gpu_id: str,
        streams: list[str],
        pre: list[tuple[str, str, str]],
        recover: bool,
        compact: bool,
    ) -> tuple[int, list[dict[str, Any]]]:
        flat = [x for triple in pre for x in triple]
        s = self.store.settings
        try:
            reply = await self.store.scripts.call(
                "claim",
                gpu_id,
                s.lease_ms,
                s.timeout_grace_ms,
                s.timeout_warning_fraction,
                1 if recover else 0,
                "compact" if compact else "full",
                len(pre),
                *flat,
                *streams,
            )
        except ResponseError as exc:
            if "NOGPU" in str(exc):  # deleted (or never registered)
                self._streams.drop()
                raise NotFound(f"GPU {gpu_id} not registered") from exc
            raise
        if compact:
            return int(reply[0]), reply[1:]
        return started_tasks(reply)

    async def claim(
        self, gpu_id: str, wait_s: float = 0.0, *, recover: bool = False, compact: bool = False
    ) -> list[dict[str, Any]]:
        """Start what the node can take now; if nothing, wait up to ``wait_s`` for a task.
        Each started task as its TaskDO view; with ``compact`` that view holds only the
        :data:`COMPACT_FIELDS` an agent runs it with (the rest None): the agent's claims
        skip reading the whole record."""
        started = await self._take(gpu_id, wait_s, recover, compact)
        return [_compact_view(row) for row in started] if compact else started

    async def claim_rows(
        self, gpu_id: str, wait_s: float = 0.0, *, recover: bool = False
    ) -> list[list[str]]:
        """As ``claim(compact=True)``, each task as the script's row of :data:`COMPACT_FIELDS`
        values ('' for a missing one): the agent builds its task from it directly."""
        return await self._take(gpu_id, wait_s, recover, True)

    async def _take(self, gpu_id: str, wait_s: float, recover: bool, compact: bool) -> list[Any]:
        streams = await self._node_streams(gpu_id)
        if not streams:
            await asyncio.sleep(min(wait_s, 1.0))
            return []
        if gpu_id not in self._drained or wait_s <= 0 or recover:
            free, started = await self._claim(gpu_id, streams, [], recover, compact)
            if started or wait_s <= 0:
                self._note(gpu_id, free, streams)
                return started
            if free <= 0:  # busy, locked, or not ACTIVE (the script looks)
                self._drained.discard(gpu_id)
                await asyncio.sleep(min(wait_s, 1.0))
                return []
        self._drained.discard(gpu_id)
        reply = await self.blocking.xreadgroup(
            GROUP,
            gpu_id,
            dict.fromkeys(streams, ">"),
            count=1,
            block=max(int(wait_s * 1000), 1),
        )
        pre = [
            (stream, eid, fields.get("id", ""))
            for stream, entries in reply or []
            for eid, fields in entries
        ]
        if not pre:
            return []
        free, started = await self._claim(gpu_id, streams, pre, False, compact)
        self._note(gpu_id, free, streams)
        return started

    def _note(self, gpu_id: str, free: int, streams: list[str]) -> None:
        """After a claim: room left means the script read the streams empty; the next claim
        may skip the script when that room takes one entry of each stream."""
        if free < len(streams):
            self._drained.discard(gpu_id)
            return
        if len(self._drained) >= MAX_DRAINED:
            self._drained.clear()
        self._drained.add(gpu_id)
