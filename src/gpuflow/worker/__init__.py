"""The worker SDK and agent: handlers per task type, GPU detection, executors, transports.

Public API::

    from gpuflow.worker import Worker, TaskContext, NonRetryableError   # write handlers
    from gpuflow.worker import StopRequested                            # (interrupt_on_stop)
    from gpuflow.worker import Agent, run_worker, detect_nodes          # run them
    from gpuflow.worker.redis_transport import RedisTransport           # join through Redis
    from gpuflow.worker.http_transport import HttpTransport             # or through HTTP

The transports live in their own modules so that executor child processes, which import
this package, do not pay for importing redis-py or httpx.
"""

from gpuflow.worker.agent import Agent, run_worker
from gpuflow.worker.detect import detect_nodes
from gpuflow.worker.sdk import (
    NonRetryableError,
    StopRequested,
    TaskContext,
    Worker,
    load_worker,
)
from gpuflow.worker.transport import (
    ClaimedTask,
    NodeSpec,
    NodeUnknown,
    StaleAttempt,
    Transport,
    TransportError,
    TransportRejected,
)

__all__ = [
    "Agent",
    "ClaimedTask",
    "NodeSpec",
    "NodeUnknown",
    "NonRetryableError",
    "StaleAttempt",
    "StopRequested",
    "TaskContext",
    "Transport",
    "TransportError",
    "TransportRejected",
    "Worker",
    "detect_nodes",
    "load_worker",
    "run_worker",
]
