"""dramatiq peer: Redis broker; the echo actor stores its result (Results middleware)."""

from __future__ import annotations

import dramatiq
import redis
from _common import DONE_KEY, e2e, main, redis_url, timed
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

broker = RedisBroker(url=redis_url())
broker.add_middleware(Results(backend=RedisBackend(url=redis_url())))
dramatiq.set_broker(broker)
_counter = redis.Redis.from_url(redis_url())


@dramatiq.actor(max_retries=0)
def noop() -> None:
    _counter.incr(DONE_KEY)


@dramatiq.actor(store_results=True, max_retries=0)
def echo(i: int) -> int:
    return i


def single(k: int) -> dict[str, object]:
    return {"rate": timed(k, lambda i: noop.send())}


def batch(n: int) -> dict[str, object]:
    return {"rate": timed(n, lambda i: noop.send()), "how": "no bulk API: send() in a loop"}


def latency(m: int) -> dict[str, object]:
    def one(i: int) -> object:
        return echo.send(i).get_result(block=True, timeout=30_000)

    one(-1)
    return e2e(m, one)


if __name__ == "__main__":
    main({"single": single, "batch": batch, "e2e": latency})
