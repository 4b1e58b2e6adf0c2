"""The embedded Redis's encoding settings, which docs/architecture.md ("Cost per task") and the
README tell operators of their own Redis to copy."""

from __future__ import annotations

from pathlib import Path

import redis

from gpuflow.store.embedded import EmbeddedRedis


def test_embedded_redis_keeps_task_hashes_compact_and_sorted_sets_skiplists(
    tmp_path: Path,
) -> None:
    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    try:
        r = redis.Redis.from_url(url, decode_responses=True)
        try:
            r.hset("task", mapping={"status": "QUEUED", "payload": "x" * 900})
            assert r.object("encoding", "task") in {"ziplist", "listpack"}
            r.zadd("leases", {"task_1": 1.0})  # one member: a compact set by Redis's default
            assert r.object("encoding", "leases") == "skiplist"
        finally:
            r.close()
    finally:
        server.stop()
