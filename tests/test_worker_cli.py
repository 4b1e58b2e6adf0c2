"""``gpuflow worker`` as a real subprocess: it joins, serves the demo handlers, and on SIGTERM
finishes or releases its tasks and exits 0."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from gpuflow.config import Settings
from gpuflow.store.embedded import URL_FILE
from gpuflow.worker import TaskContext, Worker

from .conftest import Services
from .test_worker_support import create, wait_status

pytestmark = pytest.mark.redis


def start_worker(
    settings: Settings,
    tmp_path: Path,
    *args: str,
    target: str = "gpuflow.worker.demo:worker",
    env_extra: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "GPUFLOW_NAMESPACE": settings.namespace,
        "GPUFLOW_HEARTBEAT_INTERVAL_S": "0.5",
        **(env_extra or {}),
    }
    env.pop("GPUFLOW_REDIS_URL", None)
    cmd = [sys.executable, "-m", "gpuflow", "worker", target, *args]
    with open(tmp_path / "worker.log", "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


async def stop_worker(proc: subprocess.Popen[bytes], tmp_path: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.to_thread(proc.wait, 20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    log = (tmp_path / "worker.log").read_text()
    assert code == 0, log[-3000:]


async def test_worker_via_data_dir(
    services: Services, settings: Settings, redis_url: str, tmp_path: Path
) -> None:
    s = services
    data_dir = tmp_path / "up"
    data_dir.mkdir()
    (data_dir / URL_FILE).write_text(redis_url + "\n")  # as `gpuflow up` leaves it
    name = f"cli{uuid.uuid4().hex[:6]}"
    proc = start_worker(settings, tmp_path, "--gpus", "2", "--data-dir", str(data_dir),
                        "--name", name, "--grace", "5")  # fmt: skip
    try:
        echo = await create(s.tasks, 1, '{"hello": "world"}')
        swap = await create(s.tasks, 2, '{"sleepMs": 20}')
        transcode = await create(s.tasks, 3, '{"sleepMs": 20, "format": "webm"}')
        done = await wait_status(s.store, [echo, swap, transcode], within_s=40)
    finally:
        await stop_worker(proc, tmp_path)
    assert {h["status"] for h in done.values()} == {"COMPLETED"}, done
    assert json.loads(done[echo]["result"]) == {"hello": "world"}
    assert json.loads(done[swap]["result"])["faces"] == 1
    assert json.loads(done[transcode]["result"])["format"] == "webm"
    gpu = await s.gpus.get(f"{name}-gpu1")
    assert gpu["metadata"]["gpuModel"] == "simulated"
    assert gpu["supportedTaskTypes"] == [1, 2, 3, 4]


async def test_worker_sigterm_releases_running_task(
    services: Services, settings: Settings, redis_url: str, tmp_path: Path
) -> None:
    s = services
    proc = start_worker(settings, tmp_path, "--gpus", "1", "--redis-url", redis_url,
                        "--task-types", "1", "--grace", "0.5")  # fmt: skip
    try:
        task = await create(s.tasks, 1, '{"sleepMs": 60000}')
        await wait_status(s.store, [task], want={"PROCESSING"}, within_s=40)
    finally:
        await stop_worker(proc, tmp_path)
    view = await s.tasks.get(task)
    assert (view["status"], view["retryCount"]) == ("QUEUED", 0)


#: Answers with its process's garbage-collector settings (served by the worker below).
gc_worker = Worker(ref="tests.test_worker_cli:gc_worker")


@gc_worker.handler(1)
async def gc_state(payload: Any, ctx: TaskContext) -> dict[str, int]:
    return {"gen0": gc.get_threshold()[0], "frozen": gc.get_freeze_count()}


async def test_worker_tunes_its_garbage_collector(
    services: Services, settings: Settings, redis_url: str, tmp_path: Path
) -> None:
    """Start-up's objects are frozen out of the collector's view and the young generation's
    threshold is GPUFLOW_GC_GEN0_THRESHOLD (gctuning.py)."""
    proc = start_worker(settings, tmp_path, "--gpus", "1", "--redis-url", redis_url,
                        "--name", f"gc{uuid.uuid4().hex[:6]}", "--grace", "1",
                        target="tests.test_worker_cli:gc_worker",
                        env_extra={"GPUFLOW_GC_GEN0_THRESHOLD": "4321"})  # fmt: skip
    try:
        task = await create(services.tasks, 1)
        done = await wait_status(services.store, [task], within_s=40)
    finally:
        await stop_worker(proc, tmp_path)
    assert done[task]["status"] == "COMPLETED", done
    state = json.loads(done[task]["result"])
    assert state["gen0"] == 4321
    assert state["frozen"] > 1000  # the imports of gpuflow, redis-py, pydantic ...


def test_bad_arguments_exit_2(settings: Settings, tmp_path: Path) -> None:
    env = {**os.environ, "GPUFLOW_NAMESPACE": settings.namespace}
    cmd = [sys.executable, "-m", "gpuflow", "worker", "gpuflow.worker.demo:worker",
           "--gpus", "2", "--task-types", "9", "--redis-url", "redis://127.0.0.1:1"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=60)
    assert done.returncode == 2
    assert b"no handler for task type(s) [9]" in done.stderr
