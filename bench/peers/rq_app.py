"""RQ peer: a no-op job; the end-to-end latency through ``Job.latest_result(timeout)``."""

from __future__ import annotations

import time

import redis
from _common import DONE_KEY, e2e, main, redis_url, timed
from rq import Queue

_counter: redis.Redis | None = None


def noop() -> None:
    global _counter
    if _counter is None:
        _counter = redis.Redis.from_url(redis_url())
    _counter.incr(DONE_KEY)


def echo(i: int) -> int:
    return i


def _queue() -> Queue:
    return Queue("default", connection=redis.Redis.from_url(redis_url()))


def single(k: int) -> dict[str, object]:
    q = _queue()
    return {"rate": timed(k, lambda i: q.enqueue("rq_app.noop"))}


def batch(n: int) -> dict[str, object]:
    q = _queue()
    t0 = time.perf_counter()
    for c in range(0, n, 1000):
        q.enqueue_many([Queue.prepare_data("rq_app.noop") for _ in range(min(1000, n - c))])
    return {"rate": n / (time.perf_counter() - t0), "how": "Queue.enqueue_many, 1,000 per call"}


def latency(m: int) -> dict[str, object]:
    q = _queue()

    def one(i: int) -> object:
        result = q.enqueue("rq_app.echo", i).latest_result(timeout=30)
        assert result is not None and result.return_value == i, result
        return result

    one(-1)
    return e2e(m, one)


if __name__ == "__main__":
    main({"single": single, "batch": batch, "e2e": latency})
