"""GPU detection: one :class:`NodeSpec` per GPU that NVML reports, or simulated ones.

With NVML (``nvidia-ml-py``, ``import pynvml``) each GPU becomes a node
``{hostname}-gpu{index}`` with metadata ``gpuModel``, ``memory`` (e.g. ``"24GB"``) and
``cudaVersion`` (the driver's CUDA version, e.g. ``"12.4"``), as in the register example of
the API seed. Without NVML (not installed, no driver, no GPU), or when a number of GPUs is
asked for, the nodes are simulated: same ids, metadata ``gpuModel: "simulated"``.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gpuflow import __version__
from gpuflow.worker.transport import NodeSpec

log = logging.getLogger("gpuflow.worker")


@dataclass(frozen=True, slots=True)
class GpuInfo:
    index: int
    model: str
    memory: str
    cuda_version: str


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cuda_version(nvml: Any) -> str:
    v = int(nvml.nvmlSystemGetCudaDriverVersion())
    return f"{v // 1000}.{v % 1000 // 10}"


def nvml_gpus() -> list[GpuInfo] | None:
    """The GPUs NVML sees, or None when NVML is not available."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.info("NVML not available (%s)", exc)
        return None
    try:
        cuda = _cuda_version(pynvml)
        gpus = []
        for i in range(int(pynvml.nvmlDeviceGetCount())):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
            name = _text(pynvml.nvmlDeviceGetName(handle))
            gpus.append(GpuInfo(i, name, f"{round(total / 2**30)}GB", cuda))
        return gpus
    except pynvml.NVMLError as exc:
        log.warning("NVML query failed (%s)", exc)
        return None
    finally:
        pynvml.nvmlShutdown()


def local_ip() -> str:
    """This host's address as its own name resolves (no socket is opened), for the record."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def detect_nodes(
    task_types: Sequence[int],
    *,
    gpus: int | None = None,
    priority: str = "NORMAL",
    max_concurrent_tasks: int = 1,
    hostname: str | None = None,
) -> list[NodeSpec]:
    """One node per GPU (``gpus=None``: detect with NVML, else 1 simulated), or ``gpus``
    simulated nodes."""
    host = hostname or socket.gethostname()
    found = nvml_gpus() if gpus is None else None
    if found:
        infos = found
    else:
        count = 1 if gpus is None else gpus
        if count < 1:
            raise ValueError("the number of GPUs must be at least 1")
        if gpus is None:
            log.info("no GPU detected; simulating one")
        infos = [GpuInfo(i, "simulated", "0GB", "") for i in range(count)]
    ip = local_ip()
    return [
        NodeSpec(
            gpu_id=f"{host}-gpu{g.index}",
            supported_task_types=sorted(set(task_types)),
            supported_task_priority=priority,
            max_concurrent_tasks=max_concurrent_tasks,
            hostname=host,
            ip=ip,
            version=__version__,
            metadata={"gpuModel": g.model, "memory": g.memory, "cudaVersion": g.cuda_version},
            gpu_index=g.index,
        )
        for g in infos
    ]
