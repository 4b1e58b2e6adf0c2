"""Scale bench, Redis side: a private Redis, and bulk loads through the real scripts.

Every write goes through gpuflow's own Lua scripts (``create_task``, ``register_gpu``,
``claim``, ``finish_task``, ``cancel_task``) with the arguments core passes them; only the
round trips differ: calls are pipelined in batches (EVALSHA), so that a million tasks load
in minutes on a small machine.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from gpuflow.config import Settings
from gpuflow.core.gpus import GpuSpec
from gpuflow.core.models import Tier
from gpuflow.core.tasks import NewTask, task_fields
from gpuflow.store.embedded import EmbeddedRedis
from gpuflow.store.keys import Keys
from gpuflow.store.scripts import script_source

PAYLOAD = '{"input":"image.jpg","output":"result.jpg"}'
APP = "bench"
#: Read timeout of the bench's own clients: some calls (FLUSHDB, big pipelines) take long.
SLOW_S = 120.0
SCRIPTS = ("create_task", "register_gpu", "claim", "finish_task", "cancel_task")


@contextmanager
def private_redis(url: str | None = None) -> Iterator[str]:
    """A URL: ``url`` when given (its database is flushed before and after: give it a spare
    one; memory is read for the whole server, so keep it otherwise idle), else a fresh
    embedded Redis (gpuflow's own config) in a temporary directory."""
    if url:
        # Flushing a million tasks outlasts redis-py's default 5 s read timeout.
        client = redis.Redis.from_url(url, socket_timeout=SLOW_S)
        client.flushdb()  # synchronous: memory is measured next
        try:
            yield url
        finally:
            client.flushdb(asynchronous=True)
            client.close()
        return
    with tempfile.TemporaryDirectory(prefix="gpuflow-scale-") as tmp:
        server = EmbeddedRedis(Path(tmp))
        try:
            yield server.start()
        finally:
            server.stop()


def used_memory(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


def redis_version(r: redis.Redis) -> str:
    return str(r.info("server")["redis_version"])


def bench_settings(namespace: str = "gf:") -> Settings:
    return Settings(namespace=namespace, _env_file=None)  # type: ignore[call-arg]


class Loader:
    """Pipelined calls of the real scripts over a sync client (``decode_responses``)."""

    def __init__(self, r: redis.Redis, settings: Settings) -> None:
        self.r = r
        self.s = settings
        self.keys = Keys(settings.namespace)
        self.head = [settings.namespace, str(settings.events_maxlen)]
        self.scripts = {n: r.register_script(script_source(n)) for n in SCRIPTS}

    def _call(self, pipe: Any, name: str, *args: Any) -> None:
        self.scripts[name](keys=[], args=[*self.head, *args], client=pipe)

    def create(self, n: int, types: int, users: int, batch: int = 2000) -> Iterator[int]:
        """Create ``n`` tasks as ``Tasks.create`` does (no GPU registered, so the stored
        estimate is -1); types and users round-robin. Yields the count after each batch."""
        s = self.s
        done = 0
        while done < n:
            with self.r.pipeline(transaction=False) as p:
                for i in range(done, min(done + batch, n)):
                    new = NewTask(
                        task_type=1 + i % types,
                        payload=PAYLOAD,
                        user_id=f"user{i % users}",
                        app=APP,
                    )
                    task_id = f"task_{uuid.uuid4().hex}"
                    fields = task_fields(
                        new, Tier.NORMAL, s.default_max_retries, s.default_timeout_ms
                    )
                    # capacity 0: no GPU serves these yet, so the script stores -1 as
                    # Tasks.create would
                    self._call(
                        p, "create_task", "", "", s.idempotency_ttl_s, 0,
                        s.default_processing_ms, s.lease_ms, s.timeout_grace_ms,
                        s.timeout_warning_fraction, task_id, *fields,
                    )  # fmt: skip
                p.execute()
            done = min(done + batch, n)
            yield done

    def streams(self, types: list[int]) -> list[str]:
        """The queues of a NORMAL GPU, in its reading order (as ``Gpus.streams_for``)."""
        return [self.keys.queue(t, tier) for tier in ("VIP", "NORMAL") for t in sorted(types)]

    def register(self, gpu_id: str, types: list[int], capacity: int, client: Any = None) -> None:
        spec = GpuSpec(gpu_id, types, Tier.NORMAL, capacity, hostname="bench")
        flat = [x for kv in spec.fields().items() for x in kv]
        args: list[str | int] = [*self.head, gpu_id, len(flat) // 2, *flat]
        self.scripts["register_gpu"](keys=[], args=[*args, *self.streams(types)], client=client)

    def claim(self, gpu_id: str, types: list[int]) -> list[str]:
        """One claim script call; returns the started task ids."""
        s = self.s
        streams = self.streams(types)
        reply = self.scripts["claim"](
            keys=[],
            args=[*self.head, gpu_id, s.lease_ms, s.timeout_grace_ms,
                  s.timeout_warning_fraction, 0, "full", 0, 0, *streams],
        )  # fmt: skip
        ids = []
        for flat in reply[2:]:
            h = dict(zip(flat[::2], flat[1::2], strict=True))
            ids.append(h["taskId"])
        return ids

    def finish(self, ids: list[str], gpu_id: str, outcome: str, batch: int = 2000) -> None:
        """The finish script as the agent calls it: many reports per call (100 here)."""
        s = self.s
        text = '{"output":"result.jpg"}' if outcome == "COMPLETED" else "boom"
        for i in range(0, len(ids), batch):
            with self.r.pipeline(transaction=False) as p:
                chunk = ids[i : i + batch]
                for j in range(0, len(chunk), 100):
                    reports = [
                        x
                        for task_id in chunk[j : j + 100]
                        for x in (task_id, "", gpu_id, outcome, text, 0, 1.0)
                    ]
                    self._call(p, "finish_task", s.retry_base_ms, 0, s.retry_max_ms,
                               len(reports) // 7, *reports)  # fmt: skip
                p.execute()

    def cancel(self, ids: list[str], batch: int = 2000) -> None:
        for i in range(0, len(ids), batch):
            with self.r.pipeline(transaction=False) as p:
                for task_id in ids[i : i + batch]:
                    self._call(p, "cancel_task", task_id, "canceled")
                p.execute()
