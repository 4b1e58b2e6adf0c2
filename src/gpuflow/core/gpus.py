"""The GPU node registry: register, heartbeat, fault / recover, and who can serve what."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpuflow.core.coalesce import Coalescer
from gpuflow.core.errors import Damaged, GpuflowError, NotFound
from gpuflow.core.models import GpuStatus, Tier, gpu_view
from gpuflow.core.ttlcache import TtlCache
from gpuflow.store import Store
from gpuflow.store.keys import TIERS

_RNG = random.Random()
#: The bounds of one ``heartbeat_gpu`` call (a beat may list 4,096 tasks): larger batches
#: take several calls.
BEATS_PER_CALL = 256
ARGS_PER_CALL = 16_384
#: Callers' heartbeat groups (a node's beat, an agent's batch request) per coalesced batch.
GROUPS_PER_BATCH = 32
Beat = tuple[str, dict[str, int] | None]


def _chunks(beats: list[Beat]) -> list[list[Beat]]:
    """Consecutive runs of beats whose script arguments stay under ARGS_PER_CALL."""
    chunks: list[list[Beat]] = [[]]
    size = 0
    for beat in beats:
        cost = 3 + 2 * len(beat[1] or ())
        if chunks[-1] and (size + cost > ARGS_PER_CALL or len(chunks[-1]) >= BEATS_PER_CALL):
            chunks.append([])
            size = 0
        chunks[-1].append(beat)
        size += cost
    return chunks if chunks[0] else []


@dataclass(slots=True)
class GpuSpec:
    """What a node tells about itself when it registers (the seed's register body)."""

    gpu_id: str
    supported_task_types: list[int]
    supported_task_priority: Tier = Tier.NORMAL
    max_concurrent_tasks: int = 1
    hostname: str = ""
    ip: str = ""
    port: int | None = None
    version: str = ""
    vast_ins_id: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, str]:
        return {
            "hostname": self.hostname,
            "vastInsId": self.vast_ins_id,
            "ip": self.ip,
            "port": "" if self.port is None else str(self.port),
            "supportedTaskTypes": json.dumps(sorted(set(self.supported_task_types))),
            "supportedTaskPriority": self.supported_task_priority.value,
            "version": self.version,
            "maxConcurrentTasks": str(self.max_concurrent_tasks),
            "metadata": json.dumps(self.metadata),
        }


@dataclass(frozen=True, slots=True)
class HeartbeatReply:
    status: str
    stop: list[str]


def serves(view: dict[str, Any], task_type: int, tier: Tier) -> bool:
    """Dispatch rule: the type must be supported; a VIP node takes only VIP tasks."""
    if task_type not in view["supportedTaskTypes"]:
        return False
    return not (view["supportedTaskPriority"] == Tier.VIP and tier is Tier.NORMAL)


class Gpus:
    """GPU registry over one :class:`Store`."""

    CAPACITY_TTL_S = 1.0

    def __init__(self, store: Store) -> None:
        self.store = store
        self.keys = store.keys
        #: Every GPU's view, read at most once a second, with the capacity sums computed
        #: from that read per (type, tier): a create must not add up a large fleet again.
        self._fleet: TtlCache[None, tuple[list[dict[str, Any]], dict[tuple[int, Tier], int]]]
        self._fleet = TtlCache(self.CAPACITY_TTL_S, self._read_fleet)
        #: Bumped by every registration made through this process: caches of what nodes
        #: serve (the dispatcher's stream lists) are stale from then on.
        self.generation = 0
        #: Heartbeats go out in groups (one per caller: a node, or an agent's batch request);
        #: the groups made together, or while a call is in flight, share a script call.
        self._beats: Coalescer[list[Beat], list[HeartbeatReply | GpuflowError]] = Coalescer(
            self._beat_groups, max_batch=GROUPS_PER_BATCH
        )

    def invalidate(self) -> None:
        """Forget the cached capacity (after a status change made elsewhere)."""
        self._fleet.drop()

    def streams_for(self, types: list[int], priority: str) -> list[str]:
        """The queues a node reads, in the order it must read them (VIP first)."""
        tiers = ("VIP",) if priority == Tier.VIP else TIERS
        return [self.keys.queue(t, tier) for tier in tiers for t in sorted(types)]

    async def register(self, spec: GpuSpec) -> str:
        flat = [x for kv in spec.fields().items() for x in kv]
        streams = self.streams_for(spec.supported_task_types, spec.supported_task_priority)
        status = await self.store.scripts.call(
            "register_gpu", spec.gpu_id, len(flat) // 2, *flat, *streams
        )
        self._fleet.drop()
        self.generation += 1
        return str(status)

    async def heartbeat(
        self, gpu_id: str, running: Mapping[str, int] | None = None
    ) -> HeartbeatReply:
        """Renew the GPU and its tasks' leases. With ``running`` (task id → attempt, as the
        agent sees it) the server also reaps tasks the agent lost and answers which listed
        tasks the agent must stop (canceled, timed out, moved on). Heartbeats made together
        (many nodes beating through one api process) go to Redis as one call."""
        (reply,) = await self.heartbeats([(gpu_id, running)])
        if isinstance(reply, GpuflowError):
            raise reply
        return reply

    async def heartbeats(
        self, beats: Sequence[tuple[str, Mapping[str, int] | None]]
    ) -> list[HeartbeatReply | GpuflowError]:
        """Several heartbeats (an agent's whole node set), each applied as if alone, in
        order; joined with the others made together."""
        group = [(gpu_id, None if running is None else dict(running)) for gpu_id, running in beats]
        return await self._beats.submit(group)

    async def _beat_groups(
        self, groups: list[list[Beat]]
    ) -> list[list[HeartbeatReply | GpuflowError]]:
        """The coalesced call: every group's beats in as few script calls as the argument
        bound allows, answered group by group."""
        flat = [beat for group in groups for beat in group]
        replies: list[HeartbeatReply | GpuflowError] = []
        for chunk in _chunks(flat):
            replies += await self.heartbeat_many(chunk)
        out: list[list[HeartbeatReply | GpuflowError]] = []
        start = 0
        for group in groups:
            out.append(replies[start : start + len(group)])
            start += len(group)
        return out

    async def heartbeat_many(
        self, beats: Sequence[tuple[str, Mapping[str, int] | None]]
    ) -> list[HeartbeatReply | GpuflowError]:
        """Several heartbeats in one script call; each applies as if alone, in order."""
        s = self.store.settings
        args: list[Any] = []
        for gpu_id, running in beats:
            pairs = [str(x) for kv in (running or {}).items() for x in kv]
            n = -1 if running is None else len(running)
            args += [gpu_id, _RNG.uniform(0.5, 1.0), n, *pairs]
        replies = await self.store.scripts.call(
            "heartbeat_gpu",
            s.lease_ms,
            int(s.heartbeat_interval_s * 2000) + 1000,
            s.retry_base_ms,
            s.retry_max_ms,
            len(beats),
            *args,
        )
        out: list[HeartbeatReply | GpuflowError] = []
        for (gpu_id, _), reply in zip(beats, replies, strict=True):
            if reply[0] == "OK":
                out.append(HeartbeatReply(str(reply[1]), [str(x) for x in reply[2:]]))
            elif reply[0] == "NOTFOUND":
                out.append(NotFound(f"GPU {gpu_id} not registered"))
            else:
                out.append(Damaged(f"GPU {gpu_id}: a record is damaged: {reply[1]}"))
        return out

    async def set_status(self, gpu_id: str, status: GpuStatus, reason: str = "") -> str:
        old = await self.store.scripts.call("set_gpu_status", gpu_id, status.value, reason)
        if not old:
            raise NotFound(f"GPU {gpu_id} not registered")
        self._fleet.drop()
        return str(old)

    async def delete(self, gpu_id: str) -> int:
        requeued = await self.store.scripts.call("delete_gpu", gpu_id)
        if requeued is None or requeued is False:
            raise NotFound(f"GPU {gpu_id} not registered")
        self._fleet.drop()
        return int(requeued)

    async def lock(self, gpu_id: str) -> dict[str, Any]:
        """The GPU's exclusive lock: owner task and remaining TTL (ms), or unlocked."""
        await self.get(gpu_id)
        async with self.store.redis.pipeline(transaction=False) as p:
            p.get(self.keys.gpulock(gpu_id))
            p.pttl(self.keys.gpulock(gpu_id))
            owner, ttl = await p.execute()
        return {"gpuId": gpu_id, "locked": owner is not None, "owner": owner,
                "ttlMs": int(ttl) if owner is not None else None}  # fmt: skip

    async def release_lock(self, gpu_id: str) -> str | None:
        """Admin release; returns the task that held it (None if it was free)."""
        await self.get(gpu_id)
        async with self.store.redis.pipeline(transaction=True) as p:
            p.get(self.keys.gpulock(gpu_id))
            p.delete(self.keys.gpulock(gpu_id))
            p.zrem(self.keys.gpulocks, gpu_id)
            owner, _, _ = await p.execute()
        return str(owner) if owner is not None else None

    async def get(self, gpu_id: str) -> dict[str, Any]:
        async with self.store.redis.pipeline(transaction=False) as p:
            p.hgetall(self.keys.gpu(gpu_id))
            p.scard(self.keys.gpu_running(gpu_id))
            h, running = await p.execute()
        if not h:
            raise NotFound(f"GPU {gpu_id} not registered")
        return gpu_view(h, int(running))

    async def all(self) -> list[dict[str, Any]]:
        ids = await self.store.redis.zrange(self.keys.gpus, 0, -1)
        async with self.store.redis.pipeline(transaction=False) as p:
            for gpu_id in ids:
                p.hgetall(self.keys.gpu(gpu_id))
                p.scard(self.keys.gpu_running(gpu_id))
            replies = await p.execute()
        return [gpu_view(h, int(n)) for h, n in zip(replies[::2], replies[1::2], strict=True) if h]

    async def by_task_type(self, task_type: int, priority: Tier | None) -> list[dict[str, Any]]:
        """Nodes that would serve a task of this type (and, when given, this priority)."""
        return [
            v
            for v in await self.all()
            if task_type in v["supportedTaskTypes"]
            and (priority is None or serves(v, task_type, priority))
        ]

    async def capacity(self, task_type: int, tier: Tier) -> int:
        """Sum of maxConcurrentTasks of ACTIVE nodes serving (type, tier); cached briefly."""
        views, sums = await self._fleet.get(None)
        total = sums.get((task_type, tier))
        if total is None:
            total = sums[task_type, tier] = sum(
                int(v["maxConcurrentTasks"] or 0)
                for v in views
                if v["status"] == GpuStatus.ACTIVE and serves(v, task_type, tier)
            )
        return total

    async def _read_fleet(
        self, _: None
    ) -> tuple[list[dict[str, Any]], dict[tuple[int, Tier], int]]:
        return await self.all(), {}
