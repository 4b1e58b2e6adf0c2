"""The worker SDK without Redis: handler registration, loading by ref, GPU detection."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from gpuflow.worker import TaskContext, Worker, detect_nodes, load_worker
from gpuflow.worker.detect import nvml_gpus
from gpuflow.worker.sdk import encode_result, outcome_of_value


def test_handlers_by_decorator_and_mapping() -> None:
    def one(payload: Any, ctx: TaskContext) -> Any:
        return payload

    async def two(payload: Any, ctx: TaskContext) -> Any:
        return payload

    class Three:
        async def __call__(self, payload: Any, ctx: TaskContext) -> Any:
            return payload

    w = Worker({1: one})
    assert w.handler(2)(two) is two
    w.add(3, Three())
    assert w.task_types == [1, 2, 3]
    assert [w.is_async(t) for t in (1, 2, 3)] == [False, True, True]
    assert w.sync_handlers() == {1: one}
    with pytest.raises(ValueError, match="already has a handler"):
        w.handler(1)(one)


def test_load_worker_by_ref() -> None:
    demo = load_worker("gpuflow.worker.demo:worker")
    assert demo.task_types == [1, 2, 3, 4]
    assert demo.ref == "gpuflow.worker.demo:worker"
    assert not demo.is_async(1) and demo.is_async(3)
    with pytest.raises(ValueError, match="module:attr"):
        load_worker("gpuflow.worker.demo")
    with pytest.raises(ValueError, match="no attribute"):
        load_worker("gpuflow.worker.demo:nope")
    with pytest.raises(TypeError, match="not a gpuflow Worker"):
        load_worker("gpuflow.worker.demo:echo")


def test_results_and_progress_bounds() -> None:
    assert encode_result("as is") == "as is"
    assert encode_result({"a": [1, "é"]}) == '{"a":[1,"é"]}'
    assert encode_result(None) == "null"
    bad = outcome_of_value(object())
    assert not bad.ok and not bad.retryable and "JSON" in bad.text
    sent: list[tuple[int, str | None]] = []
    ctx = TaskContext("t", 1, 1, "g", "", _report=lambda p, m: sent.append((p, m)))
    ctx.progress(12.7, "x")
    with pytest.raises(ValueError):
        ctx.progress(101)
    assert sent == [(12, "x")]


def test_simulated_gpus() -> None:
    specs = detect_nodes([2, 1, 2], gpus=3, priority="VIP", max_concurrent_tasks=2, hostname="b")
    assert [s.gpu_id for s in specs] == ["b-gpu0", "b-gpu1", "b-gpu2"]
    assert [s.gpu_index for s in specs] == [0, 1, 2]
    for s in specs:
        assert s.supported_task_types == [1, 2]
        assert (s.supported_task_priority, s.max_concurrent_tasks) == ("VIP", 2)
        assert s.metadata["gpuModel"] == "simulated"
        assert set(s.metadata) == {"gpuModel", "memory", "cudaVersion"}
        assert s.hostname == "b" and s.ip and s.version
    with pytest.raises(ValueError):
        detect_nodes([1], gpus=0)


def test_auto_detection_falls_back_without_nvml() -> None:
    """On a machine without NVML (no driver) one simulated GPU; with it, the real ones."""
    real = nvml_gpus()
    specs = detect_nodes([1])
    host = socket.gethostname()
    if real is None or not real:
        assert len(specs) == 1
        assert specs[0].gpu_id == f"{host}-gpu0"
        assert specs[0].metadata["gpuModel"] == "simulated"
    else:
        assert [s.gpu_id for s in specs] == [f"{host}-gpu{g.index}" for g in real]
        assert all(s.metadata["memory"].endswith("GB") for s in specs)
        assert all(s.metadata["cudaVersion"] for s in specs)
