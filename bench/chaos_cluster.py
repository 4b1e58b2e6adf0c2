"""The processes of a chaos run: one embedded Redis, N ``gpuflow api``, M ``gpuflow worker``.

Every process is started in its own session (process group), with its output in a log file
of the work directory, so that it can be killed alone (SIGKILL of its pid) and so that
:meth:`Cluster.close` can kill every group it ever started, even after a failure. Only
127.0.0.1 is used.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import redis

from bench.chaos_handlers import LEDGER_ENV
from gpuflow.store.embedded import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "chaos:"

# Short reliability settings, so that a kill is noticed and repaired within seconds.
RELIABILITY_ENV = {
    "GPUFLOW_LEASE_MS": "3000",
    "GPUFLOW_HEARTBEAT_INTERVAL_S": "0.5",
    "GPUFLOW_LEADER_LEASE_MS": "2000",
    "GPUFLOW_GPU_OFFLINE_AFTER_S": "3",
    "GPUFLOW_RECLAIM_IDLE_MS": "2000",
    "GPUFLOW_RETRY_BASE_MS": "100",
    "GPUFLOW_RETRY_MAX_MS": "2000",
    "GPUFLOW_MAINTENANCE_INTERVAL_S": "0.2",
    # Keep every event: the suite counts the recorded results of each task from them.
    "GPUFLOW_EVENTS_MAXLEN": "2000000",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """One restartable child process; remembers every process group it ever led."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.argv, self.env, self.log = name, argv, env, log
        self.popen: subprocess.Popen[bytes] | None = None
        self.groups: list[int] = []
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.groups.append(self.popen.pid)
        self.started_at = time.time()

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    def kill(self) -> None:
        """SIGKILL this process only (not its children) and reap it."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
        if self.popen is not None:
            self.popen.wait(10)

    def signal(self, sig: signal.Signals) -> None:
        if self.alive:
            os.kill(self.pid, sig)

    def close(self) -> None:
        """Kill every process of every group this Proc started, and reap the last one."""
        for group in self.groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(10)


class Cluster:
    """Redis + api processes + worker processes of one run, in ``work_dir``."""

    def __init__(
        self, work_dir: Path, *, apis: int = 2, workers: int = 3, gpus_per_worker: int = 2
    ) -> None:
        self.work_dir = work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = work_dir / "ledger.txt"
        self.redis_server = EmbeddedRedis(work_dir / "redis")
        self.redis_url = ""
        self.admin_key = secrets.token_urlsafe(24)
        self.gpus_per_worker = gpus_per_worker
        self.ports = [free_port() for _ in range(apis)]
        self.apis: list[Proc] = []
        self.workers: list[Proc] = []
        self.worker_names = [f"chaos-w{i}" for i in range(workers)]

    # --- environment ------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLOW_")}
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)
        env.update(RELIABILITY_ENV)
        env.update(
            GPUFLOW_REDIS_URL=self.redis_url, GPUFLOW_ADMIN_KEY=self.admin_key,
            GPUFLOW_NAMESPACE=NAMESPACE, GPUFLOW_DATA_DIR=str(self.work_dir / "data"),
        )  # fmt: skip
        env[LEDGER_ENV] = str(self.ledger)
        return env

    def api_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def gpu_ids(self, worker: int) -> list[str]:
        return [f"{self.worker_names[worker]}-gpu{g}" for g in range(self.gpus_per_worker)]

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(
            self.redis_url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2
        )

    # --- start ------------------------------------------------------------------------

    def start_redis(self) -> None:
        url = self.redis_server.start()
        if self.redis_url and url != self.redis_url:
            raise RuntimeError(f"Redis came back at {url}, not {self.redis_url}")
        self.redis_url = url

    def start_api(self, i: int) -> Proc:
        if i >= len(self.apis):
            argv = [sys.executable, "-m", "gpuflow", "api", "--port", str(self.ports[i])]
            self.apis.append(Proc(f"api{i}", argv, self.env(), self.work_dir / f"api{i}.log"))
        self.apis[i].start()
        return self.apis[i]

    def start_worker(self, i: int) -> Proc:
        if i >= len(self.workers):
            argv = [
                sys.executable, "-m", "gpuflow", "worker", "bench.chaos_handlers:worker",
                "--gpus", str(self.gpus_per_worker), "--redis-url", self.redis_url,
                "--name", self.worker_names[i], "--grace", "1",
            ]  # fmt: skip
            log = self.work_dir / f"worker{i}.log"
            self.workers.append(Proc(self.worker_names[i], argv, self.env(), log))
        self.workers[i].start()
        return self.workers[i]

    def wait_api(self, i: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.apis[i].alive:
                raise RuntimeError(f"api{i} exited: see {self.apis[i].log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.api_url(i)}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"api{i} not healthy after {timeout:g} s")

    def worker_ready(self, i: int, r: redis.Redis) -> bool:
        """All GPUs of worker ``i`` are ACTIVE and have beaten since it (re)started."""
        since = int(self.workers[i].started_at * 1000)
        for gpu in self.gpu_ids(i):
            status, beat = r.hmget(f"{NAMESPACE}gpu:{gpu}", "status", "lastHeartbeat")
            if status != "ACTIVE" or int(beat or 0) < since:
                return False
        return True

    def wait_worker(self, i: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as r:
            while time.monotonic() < deadline:
                if not self.workers[i].alive:
                    raise RuntimeError(f"worker{i} exited: see {self.workers[i].log}")
                with contextlib.suppress(redis.RedisError):
                    if self.worker_ready(i, r):
                        return
                time.sleep(0.05)
        raise RuntimeError(f"worker{i} not ready after {timeout:g} s")

    def start(self) -> None:
        """Redis, then every api, then every worker; returns once all are serving."""
        self.start_redis()
        for i in range(len(self.ports)):
            self.start_api(i)
        for i in range(len(self.worker_names)):
            self.start_worker(i)
        for i in range(len(self.ports)):
            self.wait_api(i)
        for i in range(len(self.worker_names)):
            self.wait_worker(i)

    # --- chaos ------------------------------------------------------------------------

    def leader(self) -> str | None:
        with self.client() as r:
            leader: str | None = r.get(f"{NAMESPACE}leader")
            return leader

    def api_of_instance(self, instance_id: str) -> int | None:
        """Which api process an instance id (``api-<host>-<pid>-<rand>``) belongs to."""
        try:
            pid = int(instance_id.rsplit("-", 2)[1])
        except (IndexError, ValueError):
            return None
        for i, proc in enumerate(self.apis):
            if proc.alive and proc.pid == pid:
                return i
        return None

    def kill_redis(self) -> None:
        self.redis_server.kill()
        server = self.redis_server.proc
        if server is not None and server.stderr is not None:
            server.stderr.close()

    def close(self) -> None:
        """Kill everything this cluster started (idempotent, never raises)."""
        for proc in self.workers + self.apis:
            with contextlib.suppress(Exception):
                proc.close()
        with contextlib.suppress(Exception):
            self.redis_server.stop()
        server = self.redis_server.proc
        if server is not None and server.stderr is not None:
            server.stderr.close()
