"""Chaos suite: run thousands of tasks while killing workers, executors, the leader and Redis.

    python -m bench.chaos                      # full profile: 2,000 tasks, 20+ kills
    python -m bench.chaos --profile short      # the test's profile (tests/test_chaos.py)

It starts an embedded Redis (AOF on), ``--apis`` ``gpuflow api`` processes and ``--workers``
``gpuflow worker bench.chaos_handlers:worker --gpus 2`` processes, submits the tasks through
the api processes in turn (paced, with a bounded backlog) and meanwhile SIGKILLs, at random
times: worker agents (restarted after ``--restart-delay``), executor children (the agent
starts new ones), the leader api process once (restarted) and Redis once (restarted on the
same data directory). Handlers append every execution to a ledger outside Redis. At the end
it checks the final state (bench/chaos_report.py), prints some detail lines and one summary
line, and exits 1 when a task was lost, a final result was recorded twice, a task ended in a
state it should not, or the system did not recover. docs/chaos.md defines every number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis.asyncio as aredis
from redis.exceptions import RedisError

from bench.chaos_cluster import NAMESPACE, Cluster
from bench.chaos_handlers import TASK_TYPE
from bench.chaos_report import Kill, Ledger, Snapshot, Verdict, verdict


@dataclasses.dataclass(frozen=True)
class Profile:
    tasks: int = 2000
    kills: int = 20
    workers: int = 3
    gpus: int = 2
    apis: int = 2
    duration_s: float = 60.0  # submission phase; kills fall in its 10 %-80 %
    backlog: int = 40  # at most this many submitted tasks not yet COMPLETED
    max_retries: int = 10
    sleep_ms: tuple[int, int] = (20, 200)  # handler time, uniform: GPUs ~60 % busy
    restart_delay_s: float = 1.0
    redis_down_s: float = 1.0
    final_wait_s: float = 180.0


PROFILES = {
    "full": Profile(),
    "short": Profile(
        tasks=150,
        kills=5,
        workers=2,
        duration_s=20.0,
        backlog=20,
        sleep_ms=(50, 400),
        restart_delay_s=0.5,
        redis_down_s=0.5,
        final_wait_s=60.0,
    ),
}


def log(t0: float, message: str) -> None:
    print(f"[{time.time() - t0:6.1f}s] {message}", file=sys.stderr, flush=True)


class Run:
    """One chaos run over a started :class:`Cluster`."""

    def __init__(self, cluster: Cluster, profile: Profile, rng: random.Random) -> None:
        self.cluster = cluster
        self.p = profile
        self.rng = rng
        self.ledger = Ledger(cluster.ledger)
        self.acked: dict[int, str] = {}
        self.kills: list[Kill] = []
        self.completed = 0  # COMPLETED tasks, as last seen
        self.polled = asyncio.Event()  # set after each update of ``completed``
        self.worker_up = [True] * profile.workers
        self.restarts: set[asyncio.Task[None]] = set()
        self.problems: list[str] = []
        self.t0 = time.time()
        self.r: Any = None

    # --- submitting -------------------------------------------------------------------

    async def submit_all(self, http: httpx.AsyncClient) -> None:
        rate = self.p.tasks / self.p.duration_s
        pending: set[asyncio.Task[None]] = set()
        for seq in range(self.p.tasks):
            await asyncio.sleep(max(self.t0 + seq / rate - time.time(), 0))
            while len(self.acked) - self.completed >= self.p.backlog:
                self.polled.clear()
                await self.polled.wait()
            while len(pending) >= 8:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            pending.add(asyncio.create_task(self.submit(http, seq)))
        await asyncio.gather(*pending)

    async def submit(self, http: httpx.AsyncClient, seq: int) -> None:
        lo, hi = self.p.sleep_ms
        body = {
            "taskType": TASK_TYPE, "maxRetries": self.p.max_retries,
            "payload": {"seq": seq, "sleepMs": self.rng.randint(lo, hi)},
        }  # fmt: skip
        api = seq % len(self.cluster.ports)
        delay, deadline = 0.05, time.monotonic() + 120
        while time.monotonic() < deadline:
            # A refused connection reached no server; any other failure may have created
            # the task (counted at the end as a task without 2xx): try the next api.
            with contextlib.suppress(httpx.HTTPError):
                resp = await http.post(f"{self.cluster.api_url(api)}/api/v2/tasks", json=body)
                if resp.status_code == 200:
                    self.acked[seq] = resp.json()["data"]["taskId"]
                    return
                if resp.status_code < 500:  # a valid create must not be refused
                    self.problems.append(f"create refused: {resp.status_code} {resp.text}")
            api = (api + 1) % len(self.cluster.ports)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        self.problems.append(f"task {seq} could not be submitted in 120 s")

    async def watch(self, stop: asyncio.Event) -> None:
        """Keep ``completed`` current (the backlog bound) and report progress."""
        last_report = 0.0
        while not stop.is_set():
            with contextlib.suppress(RedisError, OSError):
                self.completed = int(await self.r.zcard(f"{NAMESPACE}idx:status:COMPLETED"))
            self.polled.set()
            if time.time() - last_report >= 10:
                last_report = time.time()
                log(self.t0, f"submitted {len(self.acked)}, completed {self.completed}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)

    # --- killing ----------------------------------------------------------------------

    def plan(self) -> list[tuple[float, str]]:
        """(seconds after start, kind) of every kill, spread over 10 %-80 % of the run."""
        n = max(self.p.kills, 2)
        rest = ["worker", "executor"] * n
        kinds = ["leader", "redis", *rest[: n - 2]]
        self.rng.shuffle(kinds)
        start, window = 0.1 * self.p.duration_s, 0.7 * self.p.duration_s
        slot = window / n
        return [(start + slot * (i + self.rng.uniform(0.2, 0.8)), k) for i, k in enumerate(kinds)]

    async def chaos(self) -> None:
        actions = {
            "worker": self.kill_worker, "executor": self.kill_executor,
            "leader": self.kill_leader, "redis": self.kill_redis,
        }  # fmt: skip
        for at, kind in self.plan():
            await asyncio.sleep(max(self.t0 + at - time.time(), 0))
            kill = await actions[kind]()
            if kill is None and kind == "worker":
                kill = await self.kill_executor()
            if kill is None:
                self.problems.append(f"found nothing to kill for a planned {kind} kill")
                continue
            self.kills.append(kill)
            log(self.t0, f"killed {kill.describe()}")
        if self.restarts:
            await asyncio.gather(*self.restarts)

    async def running_on(self, gpus: list[str]) -> set[str]:
        running: set[str] = set()
        with contextlib.suppress(RedisError, OSError):
            for gpu in gpus:
                running |= set(await self.r.smembers(f"{NAMESPACE}gpu:{gpu}:running"))
        return running

    def _in_background(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.restarts.add(task)
        task.add_done_callback(self.restarts.discard)

    async def kill_worker(self) -> Kill | None:
        up = [i for i, ok in enumerate(self.worker_up) if ok and self.cluster.workers[i].alive]
        if len(up) < 2 <= self.p.workers:  # keep one worker serving
            return None
        i = self.rng.choice(up)
        proc, gpus = self.cluster.workers[i], self.cluster.gpu_ids(i)
        inflight = await self.running_on(gpus)
        children = proc.children()
        kill = Kill("worker", time.time(), proc.name, gpus, inflight, proc.pid)
        proc.kill()
        self.worker_up[i] = False
        self._in_background(self.restart_worker(i, kill, children))
        return kill

    async def restart_worker(self, i: int, kill: Kill, children: list[psutil.Process]) -> None:
        await asyncio.sleep(max(kill.at + self.p.restart_delay_s - time.time(), 0))
        alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        kill.lingering = len(alive)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()
        self.cluster.start_worker(i)
        try:
            await asyncio.to_thread(self.cluster.wait_worker, i)
        except RuntimeError as exc:
            self.problems.append(f"restarted worker {i} did not come up: {exc}")
            return
        self.worker_up[i] = True

    def executors(self) -> list[tuple[int, psutil.Process]]:
        found = []
        for i, proc in enumerate(self.cluster.workers):
            if not (self.worker_up[i] and proc.alive):
                continue
            for child in proc.children():
                with contextlib.suppress(psutil.Error):
                    if any("spawn_main" in part for part in child.cmdline()):
                        found.append((i, child))
        return found

    async def kill_executor(self) -> Kill | None:
        candidates = self.executors()
        self.ledger.refresh()
        busy = [(i, c) for i, c in candidates if c.pid in self.ledger.running]
        if not candidates:
            return None
        i, victim = self.rng.choice(busy or candidates)
        at = time.time()
        with contextlib.suppress(psutil.Error):
            victim.kill()
        await asyncio.sleep(0.05)
        self.ledger.refresh()  # its last start line without an end is what it was running
        running = self.ledger.running.get(victim.pid)
        index = self.ledger.gpu_index.get(victim.pid, "?")
        gpus = [f"{self.cluster.worker_names[i]}-gpu{index}"]
        inflight = {running.task_id} if running else set()
        return Kill("executor", at, f"of {gpus[0]}", gpus, inflight, victim.pid)

    async def kill_leader(self) -> Kill | None:
        deadline = time.monotonic() + 10
        api = leader = None
        while api is None and time.monotonic() < deadline:
            with contextlib.suppress(RedisError, OSError):
                leader = await self.r.get(f"{NAMESPACE}leader")
            api = self.cluster.api_of_instance(leader) if leader else None
            if api is None:
                await asyncio.sleep(0.1)
        if api is None:
            return None
        proc = self.cluster.apis[api]
        kill = Kill("leader", time.time(), f"{proc.name} ({leader})", pid=proc.pid)
        proc.kill()
        self._in_background(self.restart_api(api, kill))
        while time.monotonic() < deadline + 30:
            with contextlib.suppress(RedisError, OSError):
                now = await self.r.get(f"{NAMESPACE}leader")
                if now and now != leader:
                    kill.resumed_at = time.time()
                    log(self.t0, f"new leader {now}")
                    break
            await asyncio.sleep(0.05)
        return kill

    async def restart_api(self, i: int, kill: Kill) -> None:
        await asyncio.sleep(max(kill.at + self.p.restart_delay_s - time.time(), 0))
        self.cluster.start_api(i)
        try:
            await asyncio.to_thread(self.cluster.wait_api, i)
        except RuntimeError as exc:
            self.problems.append(f"restarted api {i} did not come up: {exc}")

    async def kill_redis(self) -> Kill:
        inflight: set[str] = set()
        with contextlib.suppress(RedisError, OSError):
            inflight = set(await self.r.zrange(f"{NAMESPACE}idx:status:PROCESSING", 0, -1))
        pid = self.cluster.redis_server.proc.pid if self.cluster.redis_server.proc else 0
        kill = Kill("redis", time.time(), "redis-server", inflight=inflight, pid=pid)
        self.cluster.kill_redis()
        await asyncio.sleep(self.p.redis_down_s)
        await asyncio.to_thread(self.cluster.start_redis)
        kill.resumed_at = time.time()
        return kill

    # --- the run ----------------------------------------------------------------------

    async def wait_final(self) -> None:
        """Until every task of the namespace is in a final state (bounded)."""
        deadline = time.monotonic() + self.p.final_wait_s
        unfinished = -1
        while time.monotonic() < deadline:
            with contextlib.suppress(RedisError, OSError):
                async with self.r.pipeline(transaction=False) as p:
                    for status in ("QUEUED", "PROCESSING"):
                        p.zcard(f"{NAMESPACE}idx:status:{status}")
                    unfinished = sum(await p.execute())
                if unfinished == 0:
                    return
            await asyncio.sleep(0.2)
        self.problems.append(f"{unfinished} task(s) unfinished {self.p.final_wait_s:g} s after")

    def alive_at_end(self) -> None:
        for proc in self.cluster.apis + self.cluster.workers:
            if not proc.alive:
                self.problems.append(f"{proc.name} is not running at the end (see {proc.log})")

    async def run(self) -> Verdict:
        self.r = aredis.Redis.from_url(
            self.cluster.redis_url, decode_responses=True, socket_timeout=5,
            socket_connect_timeout=2,
        )  # fmt: skip
        stop = asyncio.Event()
        headers = {"X-API-Key": self.cluster.admin_key}
        try:
            async with httpx.AsyncClient(headers=headers, timeout=10) as http:
                watcher = asyncio.create_task(self.watch(stop))
                await asyncio.gather(self.submit_all(http), self.chaos())
                log(self.t0, f"all {len(self.acked)} tasks submitted, {len(self.kills)} kills")
                await self.wait_final()
                stop.set()
                await watcher
            self.alive_at_end()
            self.ledger.refresh()
            gpus = [g for i in range(self.p.workers) for g in self.cluster.gpu_ids(i)]
            with self.cluster.client() as r:
                snap = Snapshot.read(r, NAMESPACE, gpus)
        finally:
            await self.r.aclose()
        return verdict(
            self.acked, self.p.tasks, self.kills, snap, self.ledger, self.problems, self.t0
        )


def parse_args(argv: list[str] | None) -> tuple[Profile, argparse.Namespace]:
    ap = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="full")
    ap.add_argument("--tasks", type=int, help="tasks to submit")
    ap.add_argument("--kills", type=int, help="kills in all (>= 2)")
    ap.add_argument("--workers", type=int, help="worker processes (2 GPUs each)")
    ap.add_argument("--duration", type=float, dest="duration_s", help="submission phase, s")
    ap.add_argument("--restart-delay", type=float, dest="restart_delay_s", help="seconds")
    ap.add_argument("--redis-down", type=float, dest="redis_down_s", help="seconds")
    ap.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    ap.add_argument("--work-dir", type=Path, help="logs, ledger, Redis data (default: temp)")
    args = ap.parse_args(argv)
    chosen = {
        k: v
        for k in ("tasks", "kills", "workers", "duration_s", "restart_delay_s", "redis_down_s")
        if (v := getattr(args, k)) is not None
    }
    return dataclasses.replace(PROFILES[args.profile], **chosen), args


def _exit_on_sigterm(*_: object) -> None:
    raise SystemExit(143)


def main(argv: list[str] | None = None) -> int:
    profile, args = parse_args(argv)
    if profile.kills < 2 or profile.workers < 1 or profile.tasks < 1:
        raise SystemExit("need at least 2 kills (leader, Redis), 1 worker and 1 task")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with contextlib.ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        cluster = Cluster(
            work.resolve(), apis=profile.apis, workers=profile.workers, gpus_per_worker=profile.gpus
        )
        print(f"chaos: seed={seed} work_dir={cluster.work_dir} {profile}", file=sys.stderr)
        try:
            cluster.start()
            result = asyncio.run(Run(cluster, profile, random.Random(seed)).run())
        finally:
            cluster.close()
    for line in result.details + [f"PROBLEM: {p}" for p in result.problems[:50]]:
        print(line)
    print(result.line(), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
