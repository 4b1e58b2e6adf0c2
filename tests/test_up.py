"""`gpuflow up` as a real process: embedded Redis, admin key, health, clean stop, restart."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Up:
    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLOW_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpuflow", "up", "--port", str(self.port),
             "--data-dir", str(data_dir), *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read() if self.proc.stdout else ""
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("gpuflow up did not become healthy")

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=60)
        return out


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "gf-data"


def redis_alive(data_dir: Path) -> bool:
    pid_file = data_dir / "redis.pid"
    if not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text()), 0)
    except ProcessLookupError:
        return False
    return True


def test_up_persists_tasks_and_gpus_across_restarts(data_dir: Path) -> None:
    first = Up(data_dir)
    first.wait_healthy()
    key_file = data_dir / "admin.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    h = {"X-API-Key": key}
    with httpx.Client(base_url=first.url, headers=h) as c:
        assert c.get("/api/v2/tasks").status_code == 200
        assert c.get("/api/v2/tasks", headers={"X-API-Key": "wrong"}).status_code == 401
        gpu = {"gpuId": "g-persist", "supportedTaskTypes": [1], "maxConcurrentTasks": 2}
        assert c.post("/api/v2/gpus/register", json=gpu).status_code == 200
        ids = [c.post("/api/v2/tasks", json={"taskType": 1, "payload": str(i)}).json()["data"]
               for i in range(5)]  # fmt: skip
        docs = c.get("/docs")
        assert docs.status_code == 200
    out = first.stop()
    assert first.proc.returncode == 0, out
    assert key in out and "/docs" in out  # the key is printed once, with the docs URL
    assert not redis_alive(data_dir), "embedded Redis left running"

    second = Up(data_dir)
    second.wait_healthy()
    with httpx.Client(base_url=second.url, headers=h) as c:
        listed = c.get("/api/v2/tasks", params={"size": 100}).json()["data"]
        assert {t["taskId"] for t in listed} == {t["taskId"] for t in ids}
        assert c.get("/api/v2/gpus/g-persist").json()["data"]["maxConcurrentTasks"] == 2
        new = c.post("/api/v2/tasks", json={"taskType": 1}).json()["data"]
        assert new["displayId"] == max(t["displayId"] for t in ids) + 1
        claimed = c.post("/api/v2/gpus/g-persist/claim", params={"wait": 1}).json()["data"]
        assert [t["taskId"] for t in claimed] == [ids[0]["taskId"], ids[1]["taskId"]]
    out = second.stop()
    assert key not in out  # printed only the first time
    assert second.proc.returncode == 0, out


def test_up_refuses_a_data_dir_in_use(data_dir: Path) -> None:
    first = Up(data_dir)
    try:
        first.wait_healthy()
        second = Up(data_dir)
        out, _ = second.proc.communicate(timeout=30)
        assert second.proc.returncode != 0
        assert "already runs" in out
    finally:
        first.stop()


def test_health_is_503_when_redis_is_gone(data_dir: Path) -> None:
    up = Up(data_dir)
    try:
        up.wait_healthy()
        os.kill(int((data_dir / "redis.pid").read_text()), signal.SIGKILL)
        deadline = time.monotonic() + 20
        status = 200
        while time.monotonic() < deadline and status != 503:
            r = httpx.get(f"{up.url}/health", timeout=15)
            status = r.status_code
        assert status == 503
        assert r.json()["data"]["redis"] == "DOWN"
    finally:
        up.stop()
