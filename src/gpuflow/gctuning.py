"""Garbage-collector settings for gpuflow's long-running processes (``api``, ``worker``).

CPython's cyclic collector runs a young-generation pass every 700 net container allocations
and, every hundred of those, a full pass over every object the process holds. For the api
and the worker most of those objects are what start-up built and keep for the process's
life (modules, FastAPI's routes, pydantic models, the handlers' imports): a full pass took
~40 ms in a worker draining tasks, a pause in which no task moves, and the young passes
~3 % of its CPU. Start-up's objects are therefore frozen out of the collector's view, and
young passes run every ``threshold`` allocations (``GPUFLOW_GC_GEN0_THRESHOLD``).
Measured in docs/architecture.md ("Cost per task").
"""

from __future__ import annotations

import gc


def tune_gc(threshold: int) -> None:
    """Freeze what exists now (call it once start-up is done); ``threshold`` > 0 sets the
    young generation's, 0 keeps Python's."""
    if threshold < 0:
        raise ValueError(f"GC threshold must be >= 0, not {threshold}")
    gc.collect()
    gc.freeze()
    if threshold > 0:
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(threshold, older, oldest)
