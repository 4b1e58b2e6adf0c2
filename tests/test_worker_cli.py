"""``gpuflow worker`` as a real subprocess: it joins, serves the demo handlers, and on SIGTERM
finishes or releases its tasks and exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from gpuflow.config import Settings
from gpuflow.store.embedded import URL_FILE

from .conftest import Services
from .test_worker_support import create, wait_status

pytestmark = pytest.mark.redis


def start_worker(settings: Settings, tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "GPUFLOW_NAMESPACE": settings.namespace,
        "GPUFLOW_HEARTBEAT_INTERVAL_S": "0.5",
    }
    env.pop("GPUFLOW_REDIS_URL", None)
    cmd = [sys.executable, "-m", "gpuflow", "worker", "gpuflow.worker.demo:worker", *args]
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


def test_bad_arguments_exit_2(settings: Settings, tmp_path: Path) -> None:
    env = {**os.environ, "GPUFLOW_NAMESPACE": settings.namespace}
    cmd = [sys.executable, "-m", "gpuflow", "worker", "gpuflow.worker.demo:worker",
           "--gpus", "2", "--task-types", "9", "--redis-url", "redis://127.0.0.1:1"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=60)
    assert done.returncode == 2
    assert b"no handler for task type(s) [9]" in done.stderr
