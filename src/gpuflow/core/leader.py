"""Leader election: one ``SET NX PX`` lease in Redis, renewed atomically by its holder.

Only the leader runs the maintenance loops. A holder that cannot renew (Redis unreachable,
lease taken) stops acting as soon as its own lease time runs out locally, measured from
*before* the renew request was sent, so two processes never act as leader at once as long
as clocks run at the same rate. When the leader dies, its lease expires and another process
takes over within two lease periods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from gpuflow.store import Store

log = logging.getLogger("gpuflow.leader")

# Renew only when we still hold it; KEYS[1] leader key, ARGV[1] our id, ARGV[2] lease ms.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Leadership:
    """Campaign for, hold and give up the leader lease of one namespace."""

    def __init__(self, store: Store, instance_id: str) -> None:
        self.store = store
        self.instance_id = instance_id
        self.lease_ms = store.settings.leader_lease_ms
        self._valid_until = 0.0
        self._renew = store.redis.register_script(RENEW)
        self._release = store.redis.register_script(RELEASE)

    @property
    def is_leader(self) -> bool:
        return time.monotonic() < self._valid_until

    async def step(self) -> bool:
        """Acquire or renew once; returns whether this process leads now."""
        sent = time.monotonic()
        key = self.store.keys.leader
        try:
            if self.is_leader:
                held = bool(await self._renew(keys=[key], args=[self.instance_id, self.lease_ms]))
            else:
                held = bool(
                    await self.store.redis.set(key, self.instance_id, nx=True, px=self.lease_ms)
                )
        except Exception as exc:  # Redis unreachable: keep the local lease until it runs out
            log.warning("leader lease: %s", exc)
            return self.is_leader
        was = self.is_leader
        self._valid_until = sent + self.lease_ms / 1000.0 * 0.9 if held else 0.0
        if held != was:
            log.info("%s %s leadership", self.instance_id, "took" if held else "lost")
        return held

    async def run(self, stop: asyncio.Event) -> None:
        """Campaign every third of a lease until ``stop``; then step down."""
        period = self.lease_ms / 3000.0
        while not stop.is_set():
            await self.step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period)
        await self.resign()

    async def resign(self) -> None:
        if self._valid_until:
            self._valid_until = 0.0
            with contextlib.suppress(Exception):
                await self._release(keys=[self.store.keys.leader], args=[self.instance_id])

    async def current(self) -> str | None:
        leader: str | None = await self.store.redis.get(self.store.keys.leader)
        return leader
