"""The run's settings (command line), the machine's facts, and process helpers for bench/run.py."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import psutil
import redis

from bench.chaos_cluster import Proc
from bench.peer_setup import PEERS
from gpuflow.store.embedded import find_redis_server

ROOT = Path(__file__).resolve().parent.parent


def _shown(path: str | Path) -> str:
    """A path as the report shows it: relative to the repository (the report is committed, and
    this checkout's location means nothing elsewhere); the venv's copy by its package."""
    text = str(path)
    if "site-packages/" in text:
        return "the " + text.split("site-packages/", 1)[1].split("/", 1)[0] + " package's binary"
    with contextlib.suppress(ValueError):
        return str(Path(text).resolve().relative_to(ROOT))
    return Path(text).name


def machine(r: redis.Redis, redis_server: str | None) -> dict[str, str]:
    """The facts that go at the top of the report."""
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = r.info("server")
    binary = _shown(find_redis_server(redis_server))
    return {
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "redis": f"{info['redis_version']} ({binary}, AOF everysec)",
        "python": platform.python_version(),
        "os": platform.platform(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load": "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
    }


def tree_cpu(procs: list[Proc]) -> float:
    """CPU seconds (user + system) of these processes and their children, as now."""
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(proc.pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
    return total


def has_node() -> bool:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return (
            subprocess.run(["node", "--version"], capture_output=True, timeout=10).returncode == 0
        )
    return False


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description="gpuflow against its peers (see bench/run.py)."
    )
    p.add_argument("--n", type=int, default=20_000, help="tasks drained (and batch-enqueued)")
    p.add_argument("--e2e", type=int, default=500, help="end-to-end round trips")
    p.add_argument("--enqueue", type=int, default=2_000, help="single-call enqueues")
    p.add_argument(
        "--quick", action="store_true", help="N=2000, 100 round trips, 500 enqueues, 1 round"
    )
    p.add_argument("--only", default="gpuflow," + ",".join(PEERS), help="systems to run")
    p.add_argument(
        "--gpuflow-setup", default="2x1x128", help="worker processes x GPUs x concurrency"
    )
    p.add_argument("--skip-http", action="store_true", help="no HTTP ceiling runs")
    p.add_argument("--conns", type=int, default=32, help="HTTP ceiling: concurrent connections")
    p.add_argument("--http-seconds", type=float, default=5.0)
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="run the systems round-robin this many times; the tables show medians",
    )
    p.add_argument("--scale", action="store_true", help="include bench/scale.py's rows")
    p.add_argument("--phase-timeout", type=int, default=300, help="seconds per phase")
    p.add_argument("--redis-server", default=os.environ.get("GPUFLOW_REDIS_SERVER"))
    p.add_argument("--py-spy", metavar="BINARY", help="profile gpuflow's worker and api")
    p.add_argument("--py-spy-seconds", type=int, default=4)
    p.add_argument("--py-spy-format", default="raw", choices=["raw", "speedscope", "flamegraph"])
    p.add_argument("--work", type=Path, default=ROOT / "bench" / ".work")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.e2e, args.enqueue, args.rounds = (
            min(args.n, 2_000),
            min(args.e2e, 100),
            min(args.enqueue, 500),
            1,
        )
    args.rounds = max(1, args.rounds)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    return args
