"""gpuflow against its peers: drain throughput, enqueue throughput, end-to-end latency and the
HTTP ceiling, all on one Redis server started here; writes ``docs/benchmarks.md``.

    uv run --group bench python -m bench.run            # N = 20,000, every peer
    uv run --group bench python -m bench.run --quick    # N = 2,000, fewer samples

Peers are installed on first use, each in its own virtual environment under ``--work``
(BullMQ with npm when ``node`` is on PATH). Every child process runs in its own process group
and is killed in ``finally``; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis

from bench import e2e_floor
from bench import gpuflow_app as gfa
from bench.chaos_cluster import Proc, free_port
from bench.peer_setup import PEERS, PEERS_DIR, Peer, install, version
from bench.report import FLOOR, Results, write_report
from bench.runenv import has_node, machine, parse, tree_cpu
from gpuflow.config import Settings
from gpuflow.store.embedded import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "gf:"
#: gpuflow's and BullMQ's e2e round trips are taken in this many turns each (run_e2e_duel).
DUEL_CHUNKS = 10


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work: Path = args.work.resolve()
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.redis_server = EmbeddedRedis(self.work / "redis", binary=args.redis_server)
        self.url = ""
        self.procs: list[Proc] = []
        self.admin_key = secrets.token_urlsafe(24)
        self.results = Results()

    # --- processes --------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUFLOW_", "VIRTUAL_ENV"))}
        env.update(
            BENCH_REDIS_URL=self.url, GPUFLOW_REDIS_URL=self.url, GPUFLOW_NAMESPACE=NAMESPACE,
            GPUFLOW_ADMIN_KEY=self.admin_key, GPUFLOW_DATA_DIR=str(self.work / "gpuflow-data"),
            BENCH_PHASE_TIMEOUT_S=str(self.args.phase_timeout), PYTHONPATH=str(ROOT),
        )  # fmt: skip
        env.update(extra)
        return env

    def spawn(self, name: str, argv: list[str], env: dict[str, str], cwd: Path = ROOT) -> Proc:
        proc = Proc(name, argv, env, self.logs / f"{name}.log")
        proc.popen = None
        with proc.log.open("ab") as out:
            proc.popen = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        proc.groups.append(proc.popen.pid)
        self.procs.append(proc)
        return proc

    def stop(self, procs: list[Proc]) -> None:
        for proc in procs:
            proc.close()
            with contextlib.suppress(ValueError):
                self.procs.remove(proc)

    def close(self) -> None:
        self.stop(list(self.procs))
        self.redis_server.stop()

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=10)

    def settle(self, timeout_s: float = 120.0) -> None:
        """Before an end-to-end run: compact the AOF now and wait for Redis's background
        writers (AOF rewrite, RDB save) to finish, so that no system's round trips share
        the cores with a fork that rewrites what its drain left behind."""
        with redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=30) as r:
            deadline = time.monotonic() + timeout_s
            busy = ("aof_rewrite_in_progress", "aof_rewrite_scheduled", "rdb_bgsave_in_progress")
            started = False
            while time.monotonic() < deadline:
                info = r.info("persistence")
                if not any(int(info.get(k, 0)) for k in busy):
                    if started:
                        return
                    r.bgrewriteaof()
                    started = True
                time.sleep(0.05)
            raise RuntimeError(f"Redis still rewriting its files after {timeout_s:g} s")

    def flush(self) -> None:
        # Synchronous (a lazy free would bill the next system's Redis CPU); a million tasks
        # (--scale) take longer to free than the polling client's timeout.
        with redis.Redis.from_url(self.url, socket_timeout=120) as r:
            r.flushall()

    # --- shared measurements ----------------------------------------------------------

    def drain(
        self,
        name: str,
        count: Callable[[], int],
        workers: list[Proc],
        on_first: Callable[[], None] | None = None,
    ) -> dict[str, float]:
        """Poll ``count()`` until it reaches N; the rate is timed from the first finished task
        (so that interpreter and framework start-up are not counted) to the last."""
        n, t_start = self.args.n, time.monotonic()
        first: tuple[float, int] | None = None
        cpu0 = wcpu0 = 0.0
        calls0: dict[str, tuple[int, int]] = {}
        while True:
            done, now = count(), time.monotonic()
            if done > 0 and first is None:
                first = (now, done)
                cpu0, wcpu0 = self.redis_cpu(), tree_cpu(workers)
                calls0 = self.redis_calls()
                if on_first is not None:
                    on_first()
            if done >= n:
                break
            if now - t_start > self.args.phase_timeout:
                raise TimeoutError(f"{name}: {done}/{n} finished after {self.args.phase_timeout} s")
            dead = [p.name for p in workers if not p.alive]
            if dead:
                raise RuntimeError(f"{name}: worker(s) {dead} exited; see {self.logs}")
            time.sleep(0.01)
        assert first is not None
        span = max(now - first[0], 1e-6)
        # CPU from the first finished task on, as the rate (start-up excluded)
        measured = max(n - first[1], 1)
        redis_us = (self.redis_cpu() - cpu0) / measured * 1e6
        worker_us = (tree_cpu(workers) - wcpu0) / measured * 1e6
        calls = self.redis_calls()
        per_task = {
            k: (round((v[0] - calls0.get(k, (0, 0))[0]) / measured, 2),
                round((v[1] - calls0.get(k, (0, 0))[1]) / measured, 2))
            for k, v in calls.items()
        }  # fmt: skip
        return {
            # command: (calls, µs inside Redis) per task, from INFO commandstats
            "calls_per_task": {k: v for k, v in per_task.items() if v[0] >= 0.01},
            "rate": (n - first[1]) / span,
            "total_s": now - t_start,
            "redis_us": redis_us,
            "worker_us": worker_us,
        }

    def redis_calls(self) -> dict[str, tuple[int, int]]:
        """Calls and µs per Redis command so far (INFO commandstats), for the log."""
        with self.redis() as r:
            stats = r.info("commandstats")
        return {
            k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in stats.items()
        }

    def redis_cpu(self) -> float:
        """CPU seconds the Redis server has used (user + system)."""
        with self.redis() as r:
            info = r.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def driver(self, peer: Peer, mode: str, count: int) -> dict[str, Any]:
        argv = [*peer.driver(self.work), mode, str(count)]
        cwd = self.work / "node" if peer.node else PEERS_DIR
        env = self.env(PYTHONPATH=str(PEERS_DIR))
        with (self.logs / f"{peer.name}-driver.log").open("ab") as err:
            out = subprocess.run(
                argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err,
                timeout=self.args.phase_timeout + 60, check=False,
            )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"{peer.name} {mode} failed; see {err.name}")
        return dict(json.loads(out.stdout.decode().strip().splitlines()[-1]))

    # --- peers ------------------------------------------------------------------------

    def run_peer(self, peer: Peer) -> None:
        print(f"== {peer.name}", flush=True)
        install(peer, self.work, self.logs / "install.log")
        row = self.results.system(peer.name, version(peer, self.work), peer.setup)
        self.flush()
        row["single"] = self.driver(peer, "single", self.args.enqueue)["rate"]
        self.flush()
        batch = self.driver(peer, "batch", self.args.n)
        row["batch"], row["batch_how"] = batch["rate"], batch.get("how", "")
        cwd = self.work / "node" if peer.node else PEERS_DIR
        env = self.env(PYTHONPATH=str(PEERS_DIR))
        workers = [
            self.spawn(f"{peer.name}-w{i}", argv, env, cwd)
            for i, argv in enumerate(peer.workers(self.work))
        ]
        try:
            with self.redis() as r:
                row.update(
                    self.drain(peer.name, lambda: int(r.execute_command(*peer.count) or 0), workers)
                )
            if not (peer.name == "bullmq" and self.duel):
                self.settle()
                row["e2e"] = self.driver(peer, "e2e", self.args.e2e)
        finally:
            self.stop(workers)
        print(f"   {row}", flush=True)

    # --- gpuflow ----------------------------------------------------------------------

    def settings(self) -> Settings:
        return Settings(redis_url=self.url, namespace=NAMESPACE, admin_key=self.admin_key)

    def start_api(self, port: int) -> Proc:
        argv = [sys.executable, "-m", "gpuflow", "api", "--port", str(port)]
        proc = self.spawn("gpuflow-api", argv, self.env())
        self.wait_http(proc, f"http://127.0.0.1:{port}/health")
        return proc

    def wait_http(self, proc: Proc, url: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive:
                raise RuntimeError(f"{proc.name} exited; see {proc.log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1).status_code < 500:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{proc.name} not answering {url} after {timeout:g} s")

    def gpuflow_workers(self, setup: str) -> list[Proc]:
        procs, gpus, conc = (int(x) for x in setup.split("x"))
        return [
            self.spawn(
                f"gpuflow-w{i}",
                [
                    sys.executable,
                    "-m",
                    "gpuflow",
                    "worker",
                    "bench.gpuflow_app:worker",
                    "--gpus",
                    str(gpus),
                    "--concurrency",
                    str(conc),
                    "--redis-url",
                    self.url,
                    "--name",
                    f"bench{i}",
                    "--grace",
                    "1",
                    "--log-level",
                    "WARNING",
                ],
                self.env(),
            )
            for i in range(procs)
        ]

    def run_gpuflow(self) -> None:
        import gpuflow

        print("== gpuflow", flush=True)
        setup = self.args.gpuflow_setup
        procs, gpus, conc = setup.split("x")
        desc = (
            f"{procs} `gpuflow worker` processes × {gpus} simulated GPU × `--concurrency {conc}`, "
            "async no-op handler"
        )
        row = self.results.system("gpuflow", gpuflow.__version__, desc)
        http = self.results.system(
            "gpuflow (HTTP API)",
            gpuflow.__version__,
            "1 `gpuflow api` (uvicorn) + the workers above; "
            '`gpuflow.client.AsyncClient(transport="aiohttp")`',
        )
        s, n, t = self.settings(), self.args.n, float(self.args.phase_timeout)
        self.flush()
        port = free_port()
        api_url, key = f"http://127.0.0.1:{port}", self.admin_key
        api = self.start_api(port)
        try:
            row["batch"] = asyncio.run(gfa.direct_enqueue(self.url, s, n, batch=True, deadline_s=t))
            row["batch_how"] = f"`Tasks.create`, {gfa.BATCH_CONCURRENCY} concurrent (no bulk call)"
            workers = self.gpuflow_workers(setup)
            spies: list[Proc | None] = []
            try:
                key_done = f"{NAMESPACE}idx:status:COMPLETED"
                with self.redis() as r:
                    row.update(
                        self.drain(
                            "gpuflow",
                            lambda: int(r.zcard(key_done)),
                            workers,
                            on_first=lambda: spies.append(self.py_spy("gpuflow-w0", workers[0])),
                        )
                    )
                for spy in spies:
                    self.py_spy_wait(spy)
                if not self.duel:
                    self.settle()
                    http["e2e"] = asyncio.run(
                        gfa.http_e2e(api_url, key, self.args.e2e, t, self.url, s)
                    )
            finally:
                self.stop(workers)
            m = self.args.enqueue
            row["single"] = asyncio.run(
                gfa.direct_enqueue(self.url, s, m, batch=False, deadline_s=t)
            )
            http["single"] = asyncio.run(
                gfa.http_enqueue(api_url, key, m, batch=False, deadline_s=t)
            )
            http["batch"] = asyncio.run(gfa.http_enqueue(api_url, key, m, batch=True, deadline_s=t))
            http["batch_how"] = f"`create_task`, {gfa.HTTP_CONCURRENCY} concurrent (no bulk call)"
            if not self.args.skip_http:
                hdr = f"Authorization: Bearer {key}"
                spy = self.py_spy("gpuflow-api", api, delay=1.0)
                self.results.http["gpuflow"] = self.loadgen(f"{api_url}/api/v2/tasks", hdr)
                self.py_spy_wait(spy)
        finally:
            self.stop([api])
        print(f"   {row}\n   {http}", flush=True)

    @property
    def duel(self) -> bool:
        """gpuflow's and BullMQ's e2e are measured together (:meth:`run_e2e_duel`)."""
        only = self.args.only
        return "gpuflow" in only and "bullmq" in only and has_node()

    def run_e2e_duel(self) -> None:
        """gpuflow (HTTP) and BullMQ end to end in one phase: both systems' workers up (idle
        but for this), ``DUEL_CHUNKS`` turns each of N / ``DUEL_CHUNKS`` round trips, the
        first of each pair alternating, so that the machine's drift within the phase weighs
        on both alike; each side warmed up first (BullMQ's driver is one process for all its
        turns); their p50 / p99 are over all their samples."""
        print("== e2e: gpuflow and BullMQ taking turns", flush=True)
        gf_row = self.results.systems.get("gpuflow (HTTP API)")
        bull_row = self.results.systems.get("bullmq")
        if gf_row is None or bull_row is None:
            raise RuntimeError("gpuflow's or BullMQ's step failed in this round")
        peer = PEERS["bullmq"]
        s, t = self.settings(), float(self.args.phase_timeout)
        per_turn = max(1, self.args.e2e // DUEL_CHUNKS)
        self.flush()
        port = free_port()
        api_url, key = f"http://127.0.0.1:{port}", self.admin_key
        procs = [self.start_api(port)]
        driver: subprocess.Popen[str] | None = None
        try:
            procs += self.gpuflow_workers(self.args.gpuflow_setup)
            env, cwd = self.env(PYTHONPATH=str(PEERS_DIR)), self.work / "node"
            procs += [
                self.spawn(f"bullmq-duel-w{i}", argv, env, cwd)
                for i, argv in enumerate(peer.workers(self.work))
            ]
            self.settle()
            with (self.logs / "bullmq-driver.log").open("a") as err:
                driver = subprocess.Popen(
                    [*peer.driver(self.work), "e2e-turns", str(gfa.DUEL_WARM_UP)], cwd=cwd, env=env,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                )  # fmt: skip
            assert driver.stdin is not None and driver.stdout is not None
            pipe_in, pipe_out = driver.stdin, driver.stdout

            def bullmq(n: int) -> list[float]:
                pipe_in.write(f"{n}\n")
                pipe_in.flush()
                line = pipe_out.readline()
                if not line:
                    raise RuntimeError("the BullMQ driver stopped; see logs/bullmq-driver.log")
                return [float(x) for x in json.loads(line)["samples"]]

            if "ready" not in json.loads(pipe_out.readline() or "{}"):
                raise RuntimeError("the BullMQ driver did not warm up; see its log")
            ours, theirs, ids = asyncio.run(
                gfa.http_e2e_turns(api_url, key, DUEL_CHUNKS, per_turn, bullmq, t)
            )
            parts = asyncio.run(gfa.breakdown(self.url, s, ids))
        finally:
            if driver is not None:
                with contextlib.suppress(Exception):
                    driver.stdin.close()  # type: ignore[union-attr]
                    driver.wait(30)
                if driver.poll() is None:
                    driver.kill()
            self.stop(procs)
        gf_row["e2e"] = {**gfa.pct_ms(ours), **parts, "how": gfa.E2E_HOW}
        bull_row["e2e"] = gfa.pct_ms(theirs)
        print(f"   gpuflow {gf_row['e2e']}\n   bullmq {bull_row['e2e']}", flush=True)

    def run_floor(self) -> None:
        """The end-to-end floor (``bench/e2e_floor.py``): gpuflow's six hops, no work in them."""
        print("== e2e floor", flush=True)
        row = self.results.system(
            FLOOR,
            "—",
            "the same six hops with no work: raw ASGI app on uvicorn, a 2-command script "
            "(HSET, RPUSH), a `BLPOP` loop, a 2-command script (HSET, PUBLISH), one pattern "
            "subscription; aiohttp client (`bench/e2e_floor.py`)",
        )
        self.flush()
        port = free_port()
        argv = [sys.executable, "-m", "bench.e2e_floor"]
        api = self.spawn("floor-api", [*argv, "api", str(port)], self.env())
        procs = [api, self.spawn("floor-worker", [*argv, "worker"], self.env())]
        try:
            self.wait_http(api, f"http://127.0.0.1:{port}/")
            self.settle()
            url, t = f"http://127.0.0.1:{port}/api/v2/tasks", float(self.args.phase_timeout)
            row["e2e"] = asyncio.run(e2e_floor.drive(url, self.args.e2e, t))
        finally:
            self.stop(procs)
        print(f"   {row}", flush=True)

    def py_spy(self, name: str, target: Proc, delay: float = 0.0) -> Proc | None:
        """With ``--py-spy BINARY``: sample ``target`` for ``--py-spy-seconds`` into
        ``logs/NAME.pyspy.txt`` (collapsed stacks; ``--py-spy-format`` to change)."""
        if not self.args.py_spy:
            return None
        time.sleep(delay)
        out = self.logs / f"{name}.pyspy.{self.args.py_spy_format}"
        argv = [
            self.args.py_spy, "record", "--pid", str(target.pid), "--rate", "250",
            "--duration", str(self.args.py_spy_seconds), "--format", self.args.py_spy_format,
            "--output", str(out), "--nonblocking",
        ]  # fmt: skip
        return self.spawn(f"py-spy-{name}", argv, self.env())

    def py_spy_wait(self, spy: Proc | None) -> None:
        if spy is not None and spy.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.popen.wait(self.args.py_spy_seconds + 30)
            self.stop([spy])

    # --- HTTP ceiling -----------------------------------------------------------------

    def loadgen(self, url: str, header: str | None = None) -> dict[str, Any]:
        argv = [
            sys.executable,
            "-m",
            "bench.loadgen",
            url,
            "--conns",
            str(self.args.conns),
            "--seconds",
            str(self.args.http_seconds),
        ]
        if header:
            argv += ["--header", header]
        out = subprocess.run(
            argv,
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=self.args.http_seconds + 60,
            check=True,
        )
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))

    def run_bare(self) -> None:
        print("== bare FastAPI + XADD", flush=True)
        port = free_port()
        proc = self.spawn(
            "bare-app", [sys.executable, "-m", "bench.bare_app", str(port)], self.env()
        )
        try:
            self.wait_http(proc, f"http://127.0.0.1:{port}/docs")
            self.results.http["bare"] = self.loadgen(f"http://127.0.0.1:{port}/api/v2/tasks")
        finally:
            self.stop([proc])
        print(f"   {self.results.http}", flush=True)

    # --- scale rows (bench/scale.py, by another suite) --------------------------------

    def run_scale(self) -> None:
        """With ``--scale``: the rows of ``bench.scale.scale_rows`` (memory per task, list p99
        at 1M tasks, heartbeat CPU; another suite) on this Redis, which it flushes."""
        try:
            scale = importlib.import_module("bench.scale")
        except ImportError:
            return
        rows_fn = getattr(scale, "scale_rows", None)
        if rows_fn is None:
            return
        print("== scale (bench/scale.py)", flush=True)
        self.flush()
        kw: dict[str, Any] = {"redis_url": self.url}
        if self.args.quick:
            kw.update(tasks=100_000, core_tasks=10_000, calls=50, seconds=5.0)
        for row in rows_fn(**kw):
            self.results.scale.append(
                {
                    "metric": row.name,
                    "value": f"{row.value:g} {row.unit}".strip(),
                    "target": f"{row.name} {row.target}" if row.target != "-" else "",
                    "result": row.verdict,
                }
            )

    # --- all --------------------------------------------------------------------------

    def run(self) -> None:
        # A fresh server: an AOF left by an earlier run can take long to load.
        shutil.rmtree(self.work / "redis", ignore_errors=True)
        self.url = self.redis_server.start()
        os.environ["BENCH_REDIS_URL"] = self.url
        with self.redis() as r:
            self.results.machine = machine(r, self.args.redis_server)
        self.results.args = vars(self.args) | {"work": str(self.args.work)}
        argv = shlex.join(sys.argv[1:])
        self.results.command = f"uv run --group bench python -m bench.run {argv}".rstrip()
        steps = self.steps()
        # Round-robin: this machine's speed drifts by tens of percent over minutes, so each
        # system runs once per round and the report shows medians over the rounds. Every
        # other round runs in reverse order, so that a drift within a round weighs on the
        # systems a target compares alike (they run next to each other: see steps).
        for i in range(self.args.rounds):
            print(f"== round {i + 1} of {self.args.rounds}", flush=True)
            for name, step in steps if i % 2 == 0 else steps[::-1]:
                self.attempt(name, step)
            if self.duel:  # last: it fills in the rows the round's steps made
                self.attempt("e2e duel", self.run_e2e_duel)
            self.results.end_round()
        if self.args.scale:
            self.attempt("scale", self.run_scale)
        self.flush()

    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        """The systems of one round: BullMQ (the peer gpuflow's drain and, most often, its
        e2e latency are compared with), gpuflow, the bare app its HTTP ceiling is compared
        with, the e2e floor, then the Python peers."""
        only = self.args.only
        steps: list[tuple[str, Callable[[], None]]] = []

        def peer(name: str) -> None:
            if name in only and name in PEERS and (not PEERS[name].node or has_node()):
                steps.append((name, lambda p=PEERS[name]: self.run_peer(p)))

        peer("bullmq")
        if "gpuflow" in only:
            steps.append(("gpuflow", self.run_gpuflow))
            if not self.args.skip_http:
                steps.append(("bare", self.run_bare))
            steps.append(("e2e floor", self.run_floor))
        for name in only:
            if name != "bullmq":
                peer(name)
        return steps

    def attempt(self, name: str, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception as exc:  # one failed peer must not sink the others
            print(f"!! {name} failed: {exc!r} (traceback in logs/errors.log)", flush=True)
            with (self.logs / "errors.log").open("a") as log:
                log.write(f"--- {name}\n{traceback.format_exc()}\n")
            self.results.errors[name] = str(exc)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    bench = Bench(args)
    try:
        bench.run()
    finally:
        bench.close()
    text = write_report(bench.results, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
