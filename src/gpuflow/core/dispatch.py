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

An agent that talks to Redis itself (``claim_rows(push=True)``) waits differently: its claim
script, finding the streams empty with room left, registers the GPU as waiting, and the agent
blocks on ``BLPOP`` of the GPU's inbox. The script that creates a task on one of its queues
starts it for the GPU and pushes its row there (``store/lua/lib.lua``, ``waiting_gpu``): the
agent wakes with the task already started, so a new task reaches an idle GPU in one hop
instead of a wake-up and a claim. A task queued any other way (a retry, a requeue, an
exclusive type) wakes a waiting GPU with an empty row, and it claims from the stream.
The row says whether the GPU is still waiting (it had room for more), in which case the
agent blocks again at once; otherwise its next claim registers it again.
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
from gpuflow.store.kept import KeptConnections
from gpuflow.store.keys import GROUP

#: How long a node's stream list is reused before it is read again. The claim script checks
#: the node's status and existence itself on every call; a new registration made through
#: this process is seen at once (Gpus.generation), one made through another process (the
#: node's types changed) within this long.
STREAMS_TTL_S = 1.0
#: Bound of the set of GPUs whose last claim emptied their streams (ids of deleted GPUs
#: would otherwise stay in it); past it the set starts over.
MAX_DRAINED = 100_000
#: How much longer than its blocking read a GPU's waiting flag lives: a task pushed just as
#: the read ends waits in the inbox for the next claim, which takes it (claim.lua).
WAIT_MARGIN_MS = 1000
#: Connections kept for inbox reads (one per GPU an agent serves is in use at a time).
MAX_KEPT_INBOX_CONNECTIONS = 64


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
        #: GPUs registered as waiting for pushed tasks (``push=True``): their next claim
        #: goes straight to the inbox.
        self._waiting: set[str] = set()
        #: The agents' ``BLPOP``s, on connections of ``blocking`` kept between them: the
        #: pool's return sat between a pushed task's arrival and its start.
        self._inboxes = KeptConnections(blocking, keep=MAX_KEPT_INBOX_CONNECTIONS)

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
        wait_ms: int = 0,
    ) -> tuple[int, bool, list[Any]]:
        """(free capacity left, registered as waiting, started tasks)."""
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
                wait_ms,
                len(pre),
                *flat,
                *streams,
            )
        except ResponseError as exc:
            if "NOGPU" in str(exc):  # deleted (or never registered)
                self._streams.drop()
                raise NotFound(f"GPU {gpu_id} not registered") from exc
            raise
        free, waiting = int(reply[0]), reply[1] == 1
        if compact:
            return free, waiting, reply[2:]
        return free, waiting, started_tasks(reply[2:])

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
        self, gpu_id: str, wait_s: float = 0.0, *, recover: bool = False, push: bool = False
    ) -> list[list[Any]]:
        """As ``claim(compact=True)``, each task as the script's row of :data:`COMPACT_FIELDS`
        values ('' for a missing one): the agent builds its task from it directly. ``push``:
        wait for pushed tasks (see the module docstring), for a caller that stops waiting
        with :meth:`unwait` when it stops."""
        if push:
            return await self._take_pushed(gpu_id, wait_s, recover)
        return await self._take(gpu_id, wait_s, recover, True)

    async def _take_pushed(self, gpu_id: str, wait_s: float, recover: bool) -> list[list[Any]]:
        if gpu_id not in self._waiting or recover or wait_s <= 0:
            streams = await self._node_streams(gpu_id)
            if not streams:
                await asyncio.sleep(min(wait_s, 1.0))
                return []
            wait_ms = int(wait_s * 1000) + WAIT_MARGIN_MS if wait_s > 0 else 0
            free, waiting, started = await self._claim(gpu_id, streams, [], recover, True, wait_ms)
            self._waiting.discard(gpu_id)
            if waiting:
                if len(self._waiting) >= MAX_DRAINED:
                    self._waiting.clear()
                self._waiting.add(gpu_id)
            if started or not waiting:
                if not started and free <= 0 and wait_s > 0:  # busy, locked, not ACTIVE
                    await asyncio.sleep(min(wait_s, 1.0))
                return started
        inbox = self.store.keys.gpu_inbox(gpu_id)
        reply = await self._inboxes.call(
            lambda: self.blocking.blpop([inbox], timeout=wait_s), "BLPOP", inbox, wait_s
        )
        raw = reply[1] if reply else None
        if not raw:  # timed out, or woken to claim from a stream (or to stop)
            self._waiting.discard(gpu_id)
            return []
        stay, *row = json.loads(raw)
        if not stay:
            self._waiting.discard(gpu_id)
        return [row]

    async def close(self) -> None:
        """Give the kept inbox connections back to the blocking client's pool."""
        await self._inboxes.close()

    async def unwait(self, gpu_id: str) -> int:
        """The GPU's agent stops: no more pushes, unclaimed pushed tasks go back to their
        queues, a blocking read in progress ends. The number of tasks put back."""
        self._waiting.discard(gpu_id)
        return int(await self.store.scripts.call("unwait", gpu_id))

    async def _take(self, gpu_id: str, wait_s: float, recover: bool, compact: bool) -> list[Any]:
        streams = await self._node_streams(gpu_id)
        if not streams:
            await asyncio.sleep(min(wait_s, 1.0))
            return []
        if gpu_id not in self._drained or wait_s <= 0 or recover:
            free, _, started = await self._claim(gpu_id, streams, [], recover, compact)
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
        free, _, started = await self._claim(gpu_id, streams, pre, False, compact)
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
