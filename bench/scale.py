"""Scale targets: Redis memory per queued task, list latency at 1M tasks, heartbeat CPU.

    python -m bench.scale                       # full: 100k + 1M tasks, 10,000 GPUs
    python -m bench.scale --tasks 200000        # smaller second population
    python -m bench.scale --redis-url redis://127.0.0.1:6379/13   # FLUSHES that database
    python -m bench.scale --memory-only         # memory per task only
    python -m bench.scale --beats-only          # heartbeat CPU only

Everything runs against a private Redis (a fresh embedded one, gpuflow's own config, unless
``--redis-url``) and real ``gpuflow api`` processes:

* **memory**: ``(used_memory after − before) / N`` for N tasks created (1) through
  ``Tasks.create`` (100k, 64 at a time) and (2) through the same ``create_task`` script
  with the same arguments, pipelined in batches of 2,000 EVALSHA (sampled at 100k and at
  ``--tasks``), because the core path needs minutes per 100k on a small machine.
  Payload ``{"input":"image.jpg","output":"result.jpg"}``, userId and app set, 5 types.
* **list**: the population of (2) is spread over statuses through the real scripts (claim,
  finish_task, cancel_task; a different share per type), then ``GET /api/v2/tasks`` is timed
  ``--calls`` times per filter combination over HTTP, cycling through pages.
* **heartbeat CPU**: 10,000 GPUs registered; for ``--duration`` s they heartbeat at 2,000/s
  (each GPU every 5 s) (a) as the Redis agent does, ``heartbeat_gpu`` straight to Redis
  through ``Gpus.heartbeat``, while a ``gpuflow api`` process leads and runs its
  maintenance loop, (b) over HTTP as the agent sends them, one ``POST
  /api/v2/gpus/heartbeats`` per 8-GPU agent (250 requests/s), and (c) one ``POST
  /api/v2/gpus/{id}/heartbeat`` per GPU (2,000 requests/s). The api process's CPU (user +
  system, psutil) over the window, as % of one core. Then the HTTP loads against
  ``bench/floor_app.py`` (uvicorn and a raw ASGI app that does nothing): the floor of any
  HTTP route on this machine at those request rates, for scale.

``scale_rows()`` returns the rows (name, value, unit, target, verdict) for bench/run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import NamedTuple

import psutil
import redis

from bench.scale_api import Http, api_process, cpu_seconds, floor_process
from bench.scale_redis import (
    APP,
    PAYLOAD,
    SLOW_S,
    Loader,
    bench_settings,
    private_redis,
    redis_version,
    used_memory,
)
from gpuflow.config import Settings
from gpuflow.core.gpus import Gpus
from gpuflow.core.tasks import NewTask, Tasks
from gpuflow.store import Store

TYPES = 5
USERS = 100
MEMORY_TARGET = 1536  # bytes per queued task
LIST_TARGET_MS = 50.0
CPU_TARGET = 25.0  # % of one core
GPUS = 10_000
BEAT_RATE = 2000  # heartbeats per second (10,000 GPUs every 5 s)
#: Heartbeats (or heartbeat requests) in flight at most, one keep-alive connection each.
IN_FLIGHT = 64
GPUS_PER_AGENT = 8  # an 8-GPU box: its agent beats for all eight in one request
#: The HTTP heartbeat runs: (GPUs per request, row name, CPU target). The agent's shape
#: carries the target; one request per GPU (the seed's endpoint, for other clients) is shown.
HTTP_BEATS = (
    (GPUS_PER_AGENT, f"heartbeats via HTTP, agents of {GPUS_PER_AGENT} GPUs", CPU_TARGET),
    (1, "heartbeats via HTTP, one request per GPU", None),
)
# Per task type: share of its tasks (completed, failed, timed out) finished, then canceled.
FINISH = {1: (0.6, 0.15, 0.05), 2: (0.5, 0.1, 0.0), 3: (0.3, 0.05, 0.05), 4: (0.1, 0.0, 0.0),
          5: (0.0, 0.0, 0.0)}  # fmt: skip
CANCEL = 0.05
COMBOS = (
    "status=COMPLETED&taskType=1",
    "status=QUEUED&taskType=3",
    "status=FAILED&taskType=2",
    "status=TIMEOUT&taskType=3",
    "status=COMPLETED&taskType=2&userId=user7",
    "status=COMPLETED",
    "taskType=4",
    "",
)
PAGES = (1, 2, 3, 5, 10, 50, 100, 1000)


class Row(NamedTuple):
    name: str
    value: float
    unit: str
    target: str
    verdict: str  # PASS, FAIL, or INFO (no target)


def _row(name: str, value: float, unit: str, limit: float | None, strict: bool = False) -> Row:
    if limit is None:
        return Row(name, round(value, 2), unit, "-", "INFO")
    ok = value < limit if strict else value <= limit
    target = f"{'<' if strict else '≤'} {limit:g}"
    return Row(name, round(value, 2), unit, target, "PASS" if ok else "FAIL")


def _log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- memory ---------------------------------------------------------------------------------


async def _create_core(url: str, settings: Settings, first: int, n: int, conc: int) -> None:
    store = Store.connect(url, settings)
    try:
        tasks = Tasks(store, Gpus(store))

        def new(i: int) -> NewTask:
            return NewTask(1 + i % TYPES, PAYLOAD, f"user{i % USERS}", APP)

        for i in range(first, first + n, conc):
            await asyncio.gather(
                *(tasks.create(new(j)) for j in range(i, min(i + conc, first + n)))
            )
    finally:
        await store.close()


def core_create(url: str, settings: Settings, n: int, concurrency: int = 64) -> float:
    """Bytes of Redis memory per task for ``n`` tasks created through ``Tasks.create``,
    ``concurrency`` at a time; memory is read with the creating connections closed (their
    buffers are not the tasks')."""
    r = redis.Redis.from_url(url, socket_timeout=SLOW_S)
    asyncio.run(_create_core(url, settings, 0, 1, 1))  # the namespace's counters, streams
    time.sleep(0.5)
    before = used_memory(r)
    asyncio.run(_create_core(url, settings, 1, n, concurrency))
    time.sleep(0.5)  # Redis frees the closed connections' buffers on its next loop
    return (used_memory(r) - before) / n


def pipelined_create(loader: Loader, n: int, sample_at: int) -> dict[int, float]:
    """Bytes per task at ``sample_at`` and at ``n`` tasks created by pipelined scripts."""
    for _ in loader.create(1, TYPES, USERS):
        pass
    before = used_memory(loader.r)
    out: dict[int, float] = {}
    started = time.monotonic()
    for done in loader.create(n, TYPES, USERS):
        if done in (sample_at, n):
            out[done] = (used_memory(loader.r) - before) / done
        if done % 100_000 == 0:
            _log(f"created {done} tasks ({time.monotonic() - started:.0f} s)")
    return out


# -- list -----------------------------------------------------------------------------------


def spread_statuses(loader: Loader) -> dict[str, int]:
    """Move shares of each type's queued tasks through claim / finish_task / cancel_task."""
    r = loader.r
    for t, (done, failed, timed_out) in FINISH.items():
        gpu = f"bench-load-{t}"
        queued = int(r.xlen(loader.keys.queue(t, "NORMAL")))
        goals = (("COMPLETED", done), ("FAILED", failed), ("TIMEOUT", timed_out))
        for outcome, share in goals:
            left = int(queued * share)
            while left > 0:
                loader.register(gpu, [t], min(left, 5000))  # starts no more than it finishes
                ids = loader.claim(gpu, [t])
                if not ids:
                    break
                loader.finish(ids, gpu, outcome)
                left -= len(ids)
    queued_ids = [str(x) for x in r.zrevrange(loader.keys.idx_status("QUEUED"), 0, -1)]
    loader.cancel(queued_ids[: int(len(queued_ids) * CANCEL)])
    statuses = ("QUEUED", "PROCESSING", "COMPLETED", "FAILED", "TIMEOUT", "CANCELED")
    return {s: int(r.zcard(loader.keys.idx_status(s))) for s in statuses}


def _quantile(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


async def time_lists(port: int, calls: int) -> dict[str, tuple[float, float]]:
    """Per filter combination: (p50 ms, p99 ms)."""
    http = Http(port)
    out: dict[str, tuple[float, float]] = {}
    try:
        for combo in COMBOS:
            times: list[float] = []
            for i in range(calls):
                page = PAGES[i % len(PAGES)]
                path = f"/api/v2/tasks?{combo}&page={page}&size=20".replace("?&", "?")
                t0 = time.perf_counter()
                status, body = await http.request("GET", path)
                times.append((time.perf_counter() - t0) * 1000)
                if status != 200:
                    raise RuntimeError(f"GET {path}: {status} {body[:200]!r}")
            times.sort()
            out[combo or "(none)"] = (_quantile(times, 0.5), _quantile(times, 0.99))
    finally:
        await http.close()
    return out


# -- heartbeats ------------------------------------------------------------------------------


async def paced(rate: int, seconds: float, send: Callable[[int], Awaitable[None]]) -> float:
    """Call ``send(i)`` for i = 0, 1, ... at ``rate`` per second (in 10 ms ticks) for
    ``seconds``, at most ``IN_FLIGHT`` calls in flight; returns the rate of calls that
    succeeded."""
    start = time.monotonic()
    sent = ok = 0
    pending: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        nonlocal ok
        try:
            await send(i)
            ok += 1
        except Exception as exc:  # counted as not done; the first few are shown
            if sent - ok < 5:
                _log(f"call failed: {exc!r}")

    while (now := time.monotonic()) - start < seconds:
        due = int((now - start) * rate)
        while sent < due and len(pending) < IN_FLIGHT:
            task = asyncio.create_task(one(sent))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
        await asyncio.sleep(0.01)
    elapsed = time.monotonic() - start
    if pending:
        await asyncio.gather(*pending)
    return ok / elapsed


async def beat_direct(url: str, settings: Settings, seconds: float) -> float:
    store = Store.connect(url, settings)
    try:
        gpus = Gpus(store)
        running: dict[str, int] = {}  # the agent lists its running tasks: none here
        return await paced(
            BEAT_RATE, seconds, lambda i: _done(gpus.heartbeat(f"bench-gpu-{i % GPUS}", running))
        )
    finally:
        await store.close()


async def _done(call: Awaitable[object]) -> None:
    await call


async def beat_http(
    port: int, seconds: float, per_request: int = 1, conns: int = IN_FLIGHT
) -> float:
    """Every GPU beats every 5 s over HTTP: one ``POST /api/v2/gpus/{id}/heartbeat`` per
    GPU (``per_request`` 1, the seed's endpoint), or as the agent sends them, one ``POST
    /api/v2/gpus/heartbeats`` for its ``per_request`` GPUs. Returns requests served/s."""
    pool: asyncio.Queue[Http] = asyncio.Queue()
    for _ in range(conns):
        pool.put_nowait(Http(port))

    def request(i: int) -> tuple[str, bytes]:
        if per_request == 1:
            return f"/api/v2/gpus/bench-gpu-{i % GPUS}/heartbeat", b'{"running":[]}'
        first = i * per_request
        beats = [{"gpuId": f"bench-gpu-{(first + j) % GPUS}", "running": []}
                 for j in range(per_request)]  # fmt: skip
        return "/api/v2/gpus/heartbeats", json.dumps({"beats": beats}).encode()

    async def send(i: int) -> None:
        http = await pool.get()
        try:
            path, body = request(i)
            status, answer = await http.request("POST", path, body)
            if status != 200:
                raise RuntimeError(f"POST {path}: {status} {answer[:200]!r}")
            data = json.loads(answer)["data"]  # the floor app answers one fixed object
            if isinstance(data, list) and any(b["code"] != 200 for b in data):
                raise RuntimeError(f"POST {path}: a beat refused: {answer[:200]!r}")
        finally:
            pool.put_nowait(http)

    try:
        return await paced(BEAT_RATE // per_request, seconds, send)
    finally:
        while not pool.empty():
            await pool.get_nowait().close()


def register_gpus(loader: Loader, n: int, batch: int = 1000) -> None:
    for i in range(0, n, batch):
        with loader.r.pipeline(transaction=False) as p:
            for j in range(i, min(i + batch, n)):
                loader.register(f"bench-gpu-{j}", list(range(1, TYPES + 1)), 1, client=p)
            p.execute()


def api_cpu(proc: psutil.Process, run: Callable[[], float]) -> tuple[float, float]:
    """(% of one core the api process used, rate achieved) while ``run`` runs."""
    c0, t0 = cpu_seconds(proc), time.monotonic()
    rate = run()
    c1, t1 = cpu_seconds(proc), time.monotonic()
    return 100 * (c1 - c0) / (t1 - t0), rate


# -- the whole run ---------------------------------------------------------------------------


def scale_rows(
    tasks: int = 1_000_000,
    core_tasks: int = 100_000,
    calls: int = 200,
    seconds: float = 30.0,
    redis_url: str | None = None,
    memory_only: bool = False,
) -> list[Row]:
    """Run every scale measurement (or only memory); returns one row per number."""
    rows: list[Row] = []
    settings = bench_settings()
    with private_redis(redis_url) as url:
        r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=SLOW_S)
        rows.append(Row(f"redis {redis_version(r)}", 0, "", "-", "INFO"))
        _log(f"memory: {core_tasks} tasks through Tasks.create")
        rows.append(
            _row(f"memory/task, {core_tasks} via Tasks.create",
                 core_create(url, settings, core_tasks), "B", MEMORY_TARGET)
        )  # fmt: skip
        r.flushdb()  # synchronous: the memory measured next must not include lazy frees
        loader = Loader(r, settings)
        _log(f"memory: {tasks} tasks through pipelined create_task")
        t0 = time.monotonic()
        sample = min(core_tasks, tasks)
        for n, per in pipelined_create(loader, tasks, sample).items():
            rows.append(_row(f"memory/task, {n} via pipelined script", per, "B", MEMORY_TARGET))
        rows.append(_row(f"create {tasks} (pipelined)", time.monotonic() - t0, "s", None))
        if not memory_only:
            rows += _list_and_beats(url, settings, loader, calls, seconds)
    return rows


def _list_and_beats(
    url: str, settings: Settings, loader: Loader, calls: int, seconds: float
) -> list[Row]:
    rows: list[Row] = []
    _log("list: spreading statuses")
    counts = spread_statuses(loader)
    rows += [Row(f"stored tasks {s}", n, "tasks", "-", "INFO") for s, n in counts.items()]
    _log(f"heartbeats: registering {GPUS} GPUs")
    register_gpus(loader, GPUS)
    with api_process(url, settings.namespace) as (port, proc):
        _log(f"list: {calls} calls per filter combination")
        for combo, (p50, p99) in asyncio.run(time_lists(port, calls)).items():
            rows.append(_row(f"list {combo} p50", p50, "ms", None))
            rows.append(_row(f"list {combo} p99", p99, "ms", LIST_TARGET_MS))
        rows += _beats(url, settings, loader, port, proc, seconds)
    return rows + _floors(seconds)


def beat_rows(seconds: float = 30.0, redis_url: str | None = None) -> list[Row]:
    """The heartbeat rows alone (``--beats-only``): 10,000 GPUs, no task population."""
    settings = bench_settings()
    with private_redis(redis_url) as url:
        r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=SLOW_S)
        loader = Loader(r, settings)
        with api_process(url, settings.namespace) as (port, proc):
            rows = _beats(url, settings, loader, port, proc, seconds)
    return rows + _floors(seconds)


def _beats(
    url: str, settings: Settings, loader: Loader, port: int, proc: psutil.Process, seconds: float
) -> list[Row]:
    rows: list[Row] = []
    register_gpus(loader, GPUS)  # every GPU fresh (ACTIVE, recent heartbeat)
    _log(f"heartbeats: {BEAT_RATE}/s direct to Redis for {seconds:g} s")
    cpu, rate = api_cpu(proc, lambda: asyncio.run(beat_direct(url, settings, seconds)))
    rows.append(_row("heartbeats via Redis: api CPU", cpu, "% core", CPU_TARGET, strict=True))
    rows.append(_row("heartbeats via Redis: rate sent", rate, "/s", None))
    for per, name, target in HTTP_BEATS:
        _log(f"heartbeats: {BEAT_RATE}/s over HTTP, {per} per request, for {seconds:g} s")
        cpu, rate = api_cpu(proc, partial(_run_beats, port, seconds, per))
        rows.append(_row(f"{name}: api CPU", cpu, "% core", target, strict=True))
        rows.append(_row(f"{name}: requests served", rate, "/s", None))
    return rows


def _run_beats(port: int, seconds: float, per_request: int) -> float:
    return asyncio.run(beat_http(port, seconds, per_request))


def _floors(seconds: float) -> list[Row]:
    rows: list[Row] = []
    with floor_process() as (port, proc):
        for per, _, _ in HTTP_BEATS:
            _log(f"heartbeats: {BEAT_RATE // per} requests/s to a raw ASGI app on uvicorn")
            cpu, _ = api_cpu(proc, partial(_run_beats, port, seconds, per))
            name = f"HTTP floor at {BEAT_RATE // per:,} requests/s: uvicorn + raw ASGI, no work"
            rows.append(_row(name, cpu, "% core", None))
    return rows


def format_rows(rows: list[Row]) -> Iterator[str]:
    width = max(len(r.name) for r in rows)
    for r in rows:
        yield f"{r.name:<{width}}  {r.value:>10g} {r.unit:<7} {r.target:<8} {r.verdict}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--core-tasks", type=int, default=100_000)
    ap.add_argument("--calls", type=int, default=200, help="list calls per filter combination")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per heartbeat run")
    ap.add_argument("--redis-url", help="use (and FLUSH) this database instead of a fresh one")
    ap.add_argument("--memory-only", action="store_true", help="skip the list and heartbeats")
    ap.add_argument("--beats-only", action="store_true", help="only the heartbeat CPU rows")
    a = ap.parse_args(argv)
    if a.beats_only:
        rows = beat_rows(a.duration, a.redis_url)
    else:
        rows = scale_rows(a.tasks, a.core_tasks, a.calls, a.duration, a.redis_url, a.memory_only)
    for line in format_rows(rows):
        print(line)
    return 1 if any(r.verdict == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
