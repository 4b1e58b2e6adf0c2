"""``gpuflow worker``: serve a Worker's handlers on this machine's GPUs.

It joins through Redis (``--redis-url``, ``--data-dir`` of a ``gpuflow up``, else
``GPUFLOW_REDIS_URL``, else the default data dir) or only through the HTTP API
(``--api-url`` with the key in ``GPUFLOW_API_KEY``). SIGTERM / SIGINT stop claiming, let
running tasks finish for ``--grace`` seconds, release the rest and exit 0; a second signal
ends the grace period at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
import uvloop

from gpuflow.config import get_settings
from gpuflow.gctuning import tune_gc
from gpuflow.store.embedded import EmbeddedRedisError, read_url
from gpuflow.worker import Agent, TransportRejected, Worker, detect_nodes, load_worker
from gpuflow.worker.executor import ExecutorError
from gpuflow.worker.http_transport import HttpTransport
from gpuflow.worker.redis_transport import RedisTransport
from gpuflow.worker.transport import NodeSpec, Transport

log = logging.getLogger("gpuflow.worker")


class Priority(StrEnum):
    VIP = "VIP"
    NORMAL = "NORMAL"


def _gpu_count(gpus: str) -> int | None:
    if gpus == "auto":
        return None
    try:
        count = int(gpus)
    except ValueError:
        raise ValueError(f"--gpus takes 'auto' or a number, not {gpus!r}") from None
    if count < 1:
        raise ValueError("--gpus must be at least 1")
    return count


def _task_types(text: str | None, worker: Worker) -> list[int]:
    if not text:
        if not worker.handlers:
            raise ValueError("the worker has no handlers")
        return worker.task_types
    try:
        types = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise ValueError(f"--task-types takes numbers separated by commas, not {text!r}") from None
    missing = set(types) - set(worker.handlers)
    if missing or not types:
        raise ValueError(f"no handler for task type(s) {sorted(missing)}")
    return types


def _transport_factory(
    redis_url: str | None, data_dir: Path | None, api_url: str | None
) -> Callable[[], Transport]:
    """How to join, decided (and validated) before the event loop starts."""
    if sum(x is not None for x in (redis_url, data_dir, api_url)) > 1:
        raise ValueError("give only one of --redis-url, --data-dir and --api-url")
    settings = get_settings()
    if api_url is not None:
        key = os.environ.get("GPUFLOW_API_KEY")
        if not key:
            raise ValueError("--api-url needs an API key (role worker) in GPUFLOW_API_KEY")
        return lambda: HttpTransport(api_url, key)
    url = redis_url or (read_url(data_dir) if data_dir is not None else settings.redis_url)
    if url is None:
        url = read_url(settings.data_dir)
    return lambda: RedisTransport.connect(url, settings)


async def _serve(
    worker: Worker, make_transport: Callable[[], Transport], nodes: list[NodeSpec], grace_s: float
) -> int:
    transport = make_transport()
    agent = Agent(worker, transport, nodes, grace_s=grace_s)
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            agent.hurry()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await agent.run(stop)
    except (ExecutorError, TransportRejected) as exc:
        log.error("worker stopped: %s", exc)
        return 1
    finally:
        await transport.close()
    log.info("worker stopped")
    return 0


def worker(
    target: Annotated[str, typer.Argument(help="The Worker to serve, as package.module:attr.")],
    gpus: Annotated[str, typer.Option(help="'auto' (detect with NVML) or N simulated.")] = "auto",
    priority: Annotated[
        Priority, typer.Option(help="VIP nodes take only VIP tasks.", case_sensitive=False)
    ] = Priority.NORMAL,
    concurrency: Annotated[int, typer.Option(min=1, help="Tasks at once per GPU.")] = 1,
    task_types: Annotated[
        str | None, typer.Option(help="Comma-separated types (default: all handlers).")
    ] = None,
    redis_url: Annotated[str | None, typer.Option(help="Join through this Redis.")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Join the embedded Redis of `gpuflow up` here.")
    ] = None,
    api_url: Annotated[
        str | None, typer.Option(help="Join only through the HTTP API (GPUFLOW_API_KEY).")
    ] = None,
    grace: Annotated[float, typer.Option(min=0, help="Seconds to finish tasks on stop.")] = 30.0,
    name: Annotated[str | None, typer.Option(help="Host name in GPU ids (default: own).")] = None,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
) -> None:
    """Serve a Worker's handlers on this machine's GPUs (or simulated ones)."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        served = load_worker(target)
        types = _task_types(task_types, served)
        nodes = detect_nodes(
            types,
            gpus=_gpu_count(gpus),
            priority=priority.value,
            max_concurrent_tasks=concurrency,
            hostname=name,
        )
        make_transport = _transport_factory(redis_url, data_dir, api_url)
    except (ValueError, TypeError, ImportError, EmbeddedRedisError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    for node in nodes:
        log.info("node %s: %s", node.gpu_id, node.metadata)
    tune_gc(get_settings().gc_gen0_threshold)
    # uvloop: the agent's loop is the hot path of every task (claim, report, heartbeat).
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        code = runner.run(_serve(served, make_transport, nodes, grace))
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add ``worker``."""
    app.command()(worker)
