"""The leader's maintenance loop: retries, expired leases, OFFLINE GPUs, stale claims.

Every step is one Lua script, so a leader that dies mid-step leaves nothing half done; the
loop checks that it still leads before each step, so a process that lost the lease stops
acting at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from redis.exceptions import ResponseError

from gpuflow.core.leader import Leadership
from gpuflow.core.system import System

log = logging.getLogger("gpuflow.loops")
BATCH = 500
# Our own generator: jitter must not disturb (or be disturbed by) the global one.
_RNG = random.Random()


class Maintenance:
    """One tick = every check once; ``run`` ticks while this process leads."""

    def __init__(self, system: System, leadership: Leadership) -> None:
        self.system = system
        self.leadership = leadership
        self.settings = system.settings

    def _retry_args(self) -> list[object]:
        s = self.settings
        return [s.retry_base_ms, s.retry_max_ms, _RNG.uniform(0.5, 1.0)]

    async def tick(self) -> dict[str, int]:
        """Run each step while still leading; returns what each step did."""
        done: dict[str, int] = {}
        scripts = self.system.store.scripts
        steps = (
            ("promoted", self._promote),
            ("expired", lambda: scripts.call("expire_leases", BATCH, *self._retry_args())),
            ("offline", self._offline),
            ("timeouts", self._timeouts),
            ("locks", lambda: scripts.call("sweep_locks")),
            ("purged", self._purge),
            ("reclaimed", self._reclaim),
        )
        for name, step in steps:
            if not self.leadership.is_leader:
                break
            result = await step()
            done[name] = result if isinstance(result, int) else len(result)
        return done

    async def _timeouts(self) -> int:
        warned, timed_out = await self.system.store.scripts.call(
            "check_timeouts", BATCH, *self._retry_args(), 1 if self.settings.retry_on_timeout else 0
        )
        return int(warned) + int(timed_out)

    async def _purge(self) -> int:
        cutoff = int(time.time() * 1000 - self.settings.retention_s * 1000)
        tasks, alerts = await self.system.store.scripts.call("purge_finished", cutoff, BATCH)
        return int(tasks) + int(alerts)

    async def _promote(self) -> int:
        return await self.system.tasks.promote_delayed(BATCH)

    async def _offline(self) -> list[str]:
        cutoff = int(time.time() * 1000 - self.settings.gpu_offline_after_s * 1000)
        marked: list[str] = await self.system.store.scripts.call(
            "mark_offline", cutoff, BATCH, *self._retry_args()
        )
        if marked:
            self.system.gpus.invalidate()
            log.warning("GPUs OFFLINE (missed heartbeats): %s", ", ".join(marked))
        return marked

    async def _reclaim(self) -> int:
        store = self.system.store
        total = 0
        for queue in await store.redis.smembers(store.keys.queues):
            if not self.leadership.is_leader:
                break
            try:  # one broken stream must not stop the others' reclaim and trim
                total += int(
                    await store.scripts.call(
                        "reclaim_pending", queue, self.settings.reclaim_idle_ms, BATCH
                    )
                )
            except ResponseError as exc:
                log.warning("reclaim of %s failed: %s", queue, exc)
        return total

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.leadership.is_leader:
                try:
                    await self.tick()
                except Exception as exc:  # Redis down: keep trying, the loop must outlive it
                    log.warning("maintenance: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.maintenance_interval_s)
