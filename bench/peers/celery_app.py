"""Celery peer: Redis broker, a no-op task with ``ignore_result``; an echo task with the Redis
result backend for the end-to-end latency."""

from __future__ import annotations

import redis
from _common import DONE_KEY, e2e, main, redis_url, timed
from celery import Celery

app = Celery("celery_app", broker=redis_url(), backend=redis_url())
app.conf.update(task_ignore_result=False, broker_connection_retry_on_startup=True)
_counter: redis.Redis | None = None


@app.task(ignore_result=True)
def noop() -> None:
    global _counter
    if _counter is None:
        _counter = redis.Redis.from_url(redis_url())
    _counter.incr(DONE_KEY)


@app.task
def echo(i: int) -> int:
    return i


def single(k: int) -> dict[str, object]:
    return {"rate": timed(k, lambda i: noop.delay())}


def batch(n: int) -> dict[str, object]:
    with app.producer_or_acquire() as producer:
        rate = timed(n, lambda i: noop.apply_async(producer=producer))
    return {"rate": rate, "how": "no bulk API: apply_async in a loop on one producer"}


def latency(m: int) -> dict[str, object]:
    echo.delay(-1).get(timeout=30)  # warm up connections
    return e2e(m, lambda i: echo.delay(i).get(timeout=30))


if __name__ == "__main__":
    main({"single": single, "batch": batch, "e2e": latency})
