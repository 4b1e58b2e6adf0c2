"""The agent: serves a :class:`Worker` on some GPU nodes through one transport.

Each node (:mod:`gpuflow.worker.node`) registers, heartbeats, claims into its free slots and
runs what it claims. Stopping (:meth:`Agent.stop`, or setting the ``stop`` event given to
:meth:`Agent.run`) stops claiming, lets running tasks finish for ``grace_s`` seconds, then
kills what still runs and releases those tasks back to their queue without counting a failure.

A task past its ``timeout``, or one the server says to stop, is asked to stop and killed
``stop_grace_s`` later (default ``GPUFLOW_TIMEOUT_GRACE_MS``); see
:mod:`gpuflow.worker.supervise`. Through Redis the agent also publishes itself as a cluster
instance (role ``WORKER``) while it runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from gpuflow.worker.executor import handler_source
from gpuflow.worker.node import AgentOptions, Node, heartbeat_loop
from gpuflow.worker.sdk import Worker
from gpuflow.worker.transport import NodeSpec, Transport


class Agent:
    """Runs a :class:`Worker`'s handlers on some GPU nodes through one transport.

    ``await agent.run(stop)`` serves until ``stop`` is set, then drains and returns. Or
    ``await agent.start()`` (returns once every node is registered and claiming) and later
    ``await agent.stop()``. The caller owns and closes the transport.
    """

    def __init__(
        self,
        worker: Worker,
        transport: Transport,
        nodes: Sequence[NodeSpec],
        *,
        grace_s: float = 30.0,
        heartbeat_interval_s: float | None = None,
        claim_wait_s: float | None = None,
        executor_start_timeout_s: float = 300.0,
        stop_grace_s: float | None = None,
    ) -> None:
        if not nodes:
            raise ValueError("an agent needs at least one node")
        for name, value in (
            ("heartbeat_interval_s", heartbeat_interval_s),
            ("claim_wait_s", claim_wait_s),
        ):
            if value is not None and not value > 0:  # 0 would spin its loop
                raise ValueError(f"{name} must be > 0 (None: the setting), not {value}")
        for node in nodes:
            missing = set(node.supported_task_types) - set(worker.handlers)
            if missing:
                raise ValueError(f"{node.gpu_id}: no handler for task type(s) {sorted(missing)}")
        # Imported here: executor children import this package and need no settings.
        from gpuflow.config import get_settings

        settings = get_settings()
        if stop_grace_s is None:  # the setting is new: tolerate a Settings without it
            stop_grace_s = getattr(settings, "timeout_grace_ms", 10_000) / 1000.0
        self.worker = worker
        self.transport = transport
        self.specs = list(nodes)
        self.options = AgentOptions(
            heartbeat_interval_s=(
                settings.heartbeat_interval_s
                if heartbeat_interval_s is None
                else heartbeat_interval_s
            ),
            claim_wait_s=(
                min(settings.claim_wait_max_s, 10.0) if claim_wait_s is None else claim_wait_s
            ),
            grace_s=grace_s,
            executor_start_timeout_s=executor_start_timeout_s,
            stop_grace_s=stop_grace_s,
            interrupt_on_stop=worker.interrupt_on_stop,
        )
        self.ready = asyncio.Event()
        self._hurry = asyncio.Event()
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def _source(self) -> str | bytes | None:
        types = {t for spec in self.specs for t in spec.supported_task_types}
        if all(self.worker.is_async(t) for t in types):
            return None
        return handler_source(self.worker)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then drain (see the module docstring) and return."""
        source = self._source()
        nodes = [Node(spec, self.worker, self.transport, self.options) for spec in self.specs]
        done = asyncio.Event()
        loops: list[asyncio.Task[None]] = []
        try:
            await asyncio.gather(*(n.start_executors(source) for n in nodes))
            for node in nodes:
                if not await node.register(stop):
                    return
            interval = self.options.heartbeat_interval_s
            loops = [asyncio.create_task(heartbeat_loop(nodes, done, interval))]
            loops.append(asyncio.create_task(self.transport.presence(done)))
            claims = [asyncio.create_task(n.claim_loop(stop)) for n in nodes]
            self.ready.set()
            await stop.wait()
            for node in nodes:
                node.wake.set()
            await asyncio.gather(*claims)
            grace = 0.0 if self._hurry.is_set() else self.options.grace_s
            await asyncio.gather(*(n.drain(grace, self._hurry) for n in nodes))
        finally:
            done.set()
            await asyncio.gather(*loops, return_exceptions=True)
            await asyncio.gather(*(n.close() for n in nodes), return_exceptions=True)

    async def start(self) -> None:
        """Run in the background; returns once every node is registered and claiming."""
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.run(self._stop))
        ready = asyncio.create_task(self.ready.wait())
        await asyncio.wait({self._task, ready}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self._task.done():
            self._task.result()  # raises what made it stop
            raise RuntimeError("agent stopped before it was ready")

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop claiming, let running tasks finish within the grace period, release the rest."""
        if grace_s is not None:
            self.options.grace_s = grace_s
        if self._stop is None or self._task is None:
            raise RuntimeError("agent not started with start()")
        self._stop.set()
        await self._task

    def hurry(self) -> None:
        """End the grace period now (a second Ctrl-C)."""
        self._hurry.set()


async def run_worker(
    worker: Worker,
    transport: Transport,
    nodes: Sequence[NodeSpec],
    stop: asyncio.Event,
    *,
    grace_s: float = 30.0,
) -> None:
    """Serve ``worker`` on ``nodes`` until ``stop`` is set; see :class:`Agent`."""
    await Agent(worker, transport, nodes, grace_s=grace_s).run(stop)
