"""Helpers for the client and CLI tests (no tests here): a fake GPU node that drives tasks
through the HTTP worker protocol with the admin key, so tests never wait on a clock."""

from __future__ import annotations

import socket
from typing import Any

from gpuflow.client import Client


class Node:
    """A GPU node speaking the HTTP worker protocol (register, claim, progress, result)."""

    def __init__(
        self, admin: Client, gpu_id: str = "gpu-test-1", task_types: list[int] | None = None
    ):
        self.admin = admin
        self.gpu_id = gpu_id
        body = {"gpuId": gpu_id, "supportedTaskTypes": task_types or [1], "maxConcurrentTasks": 1}
        admin.request("POST", "/api/v2/gpus/register", json=body)

    def claim(self, wait: float = 1) -> tuple[str, int]:
        """Start the next task on this node: (taskId, attempt)."""
        claimed: list[dict[str, Any]] = self.admin.request(
            "POST", f"/api/v2/gpus/{self.gpu_id}/claim", params={"wait": str(wait)}
        )
        assert len(claimed) == 1, claimed
        return claimed[0]["taskId"], claimed[0]["attempt"]

    def progress(self, task_id: str, attempt: int, pct: int, message: str | None = None) -> None:
        body = {"progress": pct, "attempt": attempt, "message": message}
        self.admin.request("POST", f"/api/v2/tasks/{task_id}/progress", json=body)

    def complete(self, task_id: str, attempt: int, result: Any) -> None:
        body = {"result": result, "attempt": attempt}
        self.admin.request("POST", f"/api/v2/tasks/{task_id}/result", json=body)

    def fail(self, task_id: str, attempt: int, message: str) -> None:
        body = {"status": "FAILED", "attempt": attempt, "message": message, "retryable": False}
        self.admin.request("POST", f"/api/v2/tasks/{task_id}/status", json=body)

    def run(self, result: Any, wait: float = 1) -> str:
        """Claim the next task and complete it at once; returns its id."""
        task_id, attempt = self.claim(wait)
        self.complete(task_id, attempt, result)
        return task_id


def closed_port_url() -> str:
    """A loopback URL nothing listens on (the port was just free)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
