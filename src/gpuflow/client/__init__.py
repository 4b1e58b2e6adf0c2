"""Python client for gpuflow's HTTP API.

::

    from gpuflow.client import Client

    with Client("http://127.0.0.1:8000", api_key="gf_client_...") as gf:
        created = gf.create_task(1, {"prompt": "a cat"}, priority=2)
        task = gf.wait(created["taskId"], timeout=600)
        print(task["status"], gf.get_result(created["taskId"])["result"])

``AsyncClient`` has the same methods as coroutines (``follow`` is an async iterator).
Errors are listed at the top of :mod:`gpuflow.client._exceptions`.
"""

from gpuflow.client._async import AsyncClient
from gpuflow.client._calls import DEFAULT_API_URL
from gpuflow.client._exceptions import (
    AuthError,
    ConflictError,
    GpuflowError,
    NotFoundError,
    ServerError,
    TransportError,
    ValidationError,
    WaitTimeout,
)
from gpuflow.client._sync import Client
from gpuflow.client._types import (
    ApiKey,
    Gpu,
    Health,
    NewApiKey,
    Task,
    TaskCreated,
    TaskPage,
    TaskProgress,
    TaskResult,
)

__all__ = [
    "DEFAULT_API_URL",
    "ApiKey",
    "AsyncClient",
    "AuthError",
    "Client",
    "ConflictError",
    "Gpu",
    "GpuflowError",
    "Health",
    "NewApiKey",
    "NotFoundError",
    "ServerError",
    "Task",
    "TaskCreated",
    "TaskPage",
    "TaskProgress",
    "TaskResult",
    "TransportError",
    "ValidationError",
    "WaitTimeout",
]
