"""Reading the events stream (``{prefix}events``), the capped log of every transition.

An entry holds ``event``, ``status``, the event's own fields, and the task it speaks of in
``taskId``; or, written by a batch script (claim, finish), the tasks that made the same
transition with the same fields in one call in ``taskIds``, comma-separated (task ids hold
no comma): one XADD per call instead of one per task, a fifth of a drained task's time in
Redis. Readers go through :func:`per_task` so that both shapes read alike."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping


def task_ids(fields: Mapping[str, str]) -> list[str]:
    """The tasks an entry speaks of (none for a GPU or alert event)."""
    many = fields.get("taskIds")
    if many:
        return many.split(",")
    one = fields.get("taskId")
    return [one] if one else []


def per_task(entries: Iterable[Mapping[str, str]]) -> Iterator[dict[str, str]]:
    """Each entry's fields once per task it names (``taskId`` set, ``taskIds`` dropped);
    entries that name no task as they are."""
    for fields in entries:
        ids = task_ids(fields)
        if not ids:
            yield dict(fields)
            continue
        base = {k: v for k, v in fields.items() if k != "taskIds"}
        for task_id in ids:
            yield {**base, "taskId": task_id}
