"""Stdlib-only helpers shared by the peer drivers (each runs in its peer's own venv).

A driver is called as ``python <peer>_app.py MODE COUNT`` with ``BENCH_REDIS_URL`` set and
prints one JSON object on its last stdout line. Modes:

* ``single K``: K enqueues, one call at a time → ``{"rate": tasks/s}``
* ``batch N``: N enqueues through the peer's batch API (this also fills the queue for the
  drain) → ``{"rate": tasks/s, "how": "..."}``
* ``e2e M``: M times submit one task and wait for its result → ``{"p50": ms, "p99": ms}``

The no-op task of every Python peer does ``INCR bench:done`` so that the orchestrator can
count finished tasks the same way whatever the peer stores (Celery with ``ignore_result``
stores nothing).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable

DONE_KEY = "bench:done"
DEADLINE_S = float(os.environ.get("BENCH_PHASE_TIMEOUT_S", "300"))


def redis_url() -> str:
    return os.environ["BENCH_REDIS_URL"]


def emit(**data: object) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000.0 for s in samples_s)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"p50": q[49], "p99": q[98], "n": len(ms)}


def timed(count: int, fn: Callable[[int], None]) -> float:
    """Call ``fn(i)`` up to ``count`` times (bounded by the phase deadline); tasks/s."""
    t0 = time.perf_counter()
    done = 0
    for i in range(count):
        fn(i)
        done += 1
        if time.perf_counter() - t0 > DEADLINE_S:
            break
    return done / (time.perf_counter() - t0)


def e2e(count: int, one: Callable[[int], object]) -> dict[str, float]:
    samples: list[float] = []
    t_end = time.monotonic() + DEADLINE_S
    for i in range(count):
        t0 = time.perf_counter()
        one(i)
        samples.append(time.perf_counter() - t0)
        if time.monotonic() > t_end:
            break
    return percentiles(samples)


def main(modes: dict[str, Callable[[int], dict[str, object]]]) -> None:
    mode, count = sys.argv[1], int(sys.argv[2])
    emit(**modes[mode](count))
