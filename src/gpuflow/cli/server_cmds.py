"""``gpuflow up`` (everything on one machine) and ``gpuflow api`` (the API process only)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from gpuflow.adminkey import load_or_create_admin_key
from gpuflow.config import Settings
from gpuflow.gctuning import tune_gc
from gpuflow.store.embedded import EmbeddedRedis, EmbeddedRedisError

Host = Annotated[str, typer.Option(help="Interface to listen on.")]
Port = Annotated[int, typer.Option(help="HTTP port.")]
DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="Embedded Redis data and the admin key.")
]


def _settings(host: str, port: int, data_dir: Path | None) -> Settings:
    overrides: dict[str, object] = {"host": host, "port": port}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    return Settings(**overrides)  # type: ignore[arg-type]


def _admin_key(settings: Settings) -> Settings:
    if settings.admin_key:
        return settings
    key, created = load_or_create_admin_key(settings.data_dir)
    where = (settings.data_dir / "admin.key").resolve()
    if created:
        typer.echo(f"Admin API key (shown once, stored in {where}):\n  {key}")
    else:
        typer.echo(f"Admin API key: stored in {where}")
    return settings.model_copy(update={"admin_key": key})


def _demo_worker(settings: Settings, redis_url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "GPUFLOW_REDIS_URL": redis_url}
    cmd = [sys.executable, "-m", "gpuflow", "worker", "gpuflow.worker.demo:worker",
           "--gpus", "2", "--redis-url", redis_url]  # fmt: skip
    return subprocess.Popen(cmd, env=env)


def _exit_on_sigterm(*_: object) -> None:
    raise SystemExit(0)


def _serve(settings: Settings, redis_url: str) -> None:
    # uvicorn re-raises the signal it stopped on; a Python handler turns SIGTERM into
    # SystemExit so that the caller's cleanup (demo worker, embedded Redis) still runs.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # Imported here: `gpuflow worker` and the client commands need neither FastAPI nor uvicorn.
    import uvicorn

    from gpuflow.api.app import create_app

    app = create_app(settings, redis_url)
    tune_gc(settings.gc_gen0_threshold)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="info", access_log=False,
        loop="auto", http="auto", lifespan="on", timeout_graceful_shutdown=10,
    )  # fmt: skip
    uvicorn.Server(config).run()


def up(
    host: Host = "127.0.0.1",
    port: Port = 8000,
    data_dir: DataDir = None,
    demo: Annotated[bool, typer.Option(help="Also start a worker with 2 simulated GPUs.")] = False,
) -> None:
    """Start the whole system: embedded Redis (unless GPUFLOW_REDIS_URL), API, loops."""
    settings = _admin_key(_settings(host, port, data_dir))
    embedded: EmbeddedRedis | None = None
    if settings.redis_url:
        redis_url = settings.redis_url
        typer.echo("Using the Redis at GPUFLOW_REDIS_URL")
    else:
        embedded = EmbeddedRedis(settings.data_dir, settings.redis_server)
        try:
            redis_url = embedded.start()
        except EmbeddedRedisError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc
        typer.echo(f"Embedded Redis (AOF on) in {embedded.data_dir}")
    worker = _demo_worker(settings, redis_url) if demo else None
    typer.echo(f"API docs: http://{settings.host}:{settings.port}/docs")
    try:
        _serve(settings, redis_url)
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(40)
            except subprocess.TimeoutExpired:
                worker.kill()
        if embedded is not None:
            embedded.stop()
        typer.echo("gpuflow stopped")


def api(host: Host = "127.0.0.1", port: Port = 8000) -> None:
    """Run only the API process against GPUFLOW_REDIS_URL (production; run several)."""
    settings = _settings(host, port, None)
    if not settings.redis_url:
        typer.echo("error: set GPUFLOW_REDIS_URL (the api command starts no Redis)", err=True)
        raise typer.Exit(2)
    if not settings.admin_key:
        typer.echo("warning: GPUFLOW_ADMIN_KEY unset: only stored keys are accepted", err=True)
    _serve(settings, settings.redis_url)


def register(app: typer.Typer) -> None:
    """Add ``up`` and ``api``."""
    app.command()(up)
    app.command()(api)
