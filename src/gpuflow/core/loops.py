"""Background loops of an api process (safe to run on every process: each step is atomic)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gpuflow.core.system import System

log = logging.getLogger("gpuflow.loops")


async def promote_retries(system: System, stop: asyncio.Event, interval_s: float = 0.25) -> None:
    """Move retries whose backoff has passed back into their queues."""
    while not stop.is_set():
        try:
            while await system.tasks.promote_delayed() >= 1000:
                pass
        except Exception as exc:  # Redis down: keep trying, the loop must outlive it
            log.warning("promote_retries: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
