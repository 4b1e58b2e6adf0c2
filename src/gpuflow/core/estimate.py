"""Wait-time estimates.

``estimatedWaitTime`` (seconds) of a QUEUED task =
``ceil(ahead / capacity) * avg_s``, plus ``avg_s`` for the task itself, where

* ``ahead`` = tasks in front of it: those before it in its own queue
  (``queueSeq - deq`` - 1) plus, for a NORMAL task, every queued VIP task of the same type
  (VIP goes first on NORMAL nodes);
* ``capacity`` = the sum of ``maxConcurrentTasks`` of ACTIVE GPUs that serve this type and tier;
* ``avg_s`` = exponentially weighted average (alpha 0.2) of this type's recent processing times
  (``completedAt - startedAt``), or ``GPUFLOW_DEFAULT_PROCESSING_MS`` before the first sample.

With no ACTIVE GPU able to serve it the wait is unknown and reported as ``-1``.
``store/lua/create_task.lua`` computes the same formula at creation, so that creating a
task stays one round trip; keep the two in step.
``queuePosition`` is ``ahead + 1`` for a QUEUED task and 0 once it runs.
"""

from __future__ import annotations

import math


def wait_seconds(ahead: int, capacity: int, avg_ms: float) -> int:
    if capacity <= 0:
        return -1
    avg_s = avg_ms / 1000.0
    return math.ceil(math.ceil(max(ahead, 0) / capacity) * avg_s + avg_s)
