"""The embedded Redis killed with SIGKILL while tasks are created and run: after a restart of
the system, every task whose creation was answered 2xx still exists and completes."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx

from .test_up import Up


def create_until(stop: threading.Event, url: str, key: str, accepted: list[str]) -> None:
    """Create echo tasks as fast as one client can, keeping the ids answered 2xx."""
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=5) as c:
        for i in range(100_000):
            if stop.is_set():
                return
            try:
                r = c.post("/api/v2/tasks", json={"taskType": 1, "payload": {"i": i, "sleepMs": 5}})
            except httpx.TransportError:
                continue
            if r.status_code == 200:
                accepted.append(r.json()["data"]["taskId"])
            else:
                assert r.status_code == 503, r.text  # Redis down: a clear 503, never a 500
                time.sleep(0.01)


def test_sigkill_of_redis_loses_no_acknowledged_task(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = Up(data, "--demo")
    first.wait_healthy()
    key = (data / "admin.key").read_text().strip()
    accepted: list[str] = []
    stop = threading.Event()
    creator = threading.Thread(target=create_until, args=(stop, first.url, key, accepted))
    creator.start()
    try:
        deadline = time.monotonic() + 20
        while len(accepted) < 150 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(int((data / "redis.pid").read_text()), signal.SIGKILL)
        killed_at = len(accepted)
        time.sleep(0.5)
    finally:
        stop.set()
        creator.join(10)
        first.stop()
    assert killed_at >= 150

    second = Up(data, "--demo")
    try:
        second.wait_healthy()
        with httpx.Client(base_url=second.url, headers={"X-API-Key": key}, timeout=10) as c:
            deadline = time.monotonic() + 90
            pending = set(accepted)
            while pending and time.monotonic() < deadline:
                for task_id in list(pending)[:200]:
                    r = c.get(f"/api/v2/tasks/{task_id}")
                    assert r.status_code == 200, f"acknowledged task {task_id} is gone"
                    if r.json()["data"]["status"] == "COMPLETED":
                        pending.discard(task_id)
                time.sleep(0.2)
            assert not pending, f"{len(pending)} of {len(accepted)} tasks never completed"
    finally:
        second.stop()
