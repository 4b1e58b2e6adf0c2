"""What a chaos run found: the ledger, the kills, the final state in Redis, and the verdict.

Checks (see docs/chaos.md): every task whose create answered 2xx exists and is COMPLETED
(``lost`` otherwise); no task of the namespace ended in another final state or stayed
unfinished; each task's final result was recorded exactly once (``completed`` events of the
events stream, which the run keeps uncapped) and names an execution of that task, of its
current attempt, that the ledger saw return; nothing is left running, leased or delayed.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuflow.store.events import per_task

FINAL_EVENTS = ("completed", "failed", "timeout", "canceled")


@dataclass(slots=True)
class Execution:
    task_id: str
    attempt: int
    pid: int
    gpu: str
    start: float
    end: float | None = None


class Ledger:
    """Reads the handlers' ledger incrementally (``refresh``); see bench/chaos_handlers.py."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.executions: list[Execution] = []
        self.running: dict[int, Execution] = {}  # pid → the execution it has not ended
        self.gpu_index: dict[int, str] = {}  # executor pid → its CUDA_VISIBLE_DEVICES

    def refresh(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode().splitlines():
            self._add(line.split())

    def _add(self, parts: list[str]) -> None:
        kind, task_id, attempt, pid, gpu, at = parts
        if kind == "R":
            self.gpu_index[int(pid)] = gpu
        elif kind == "S":
            ex = Execution(task_id, int(attempt), int(pid), gpu, float(at))
            self.executions.append(ex)
            self.running[ex.pid] = ex
        elif kind == "E":
            ex = self.running.pop(int(pid))
            ex.end = float(at)

    def returned(self) -> set[tuple[str, int, int]]:
        return {(e.task_id, e.attempt, e.pid) for e in self.executions if e.end is not None}


@dataclass(slots=True)
class Kill:
    kind: str  # worker | executor | leader | redis
    at: float  # unix time of the SIGKILL
    target: str
    gpus: list[str] = field(default_factory=list)
    inflight: set[str] = field(default_factory=set)  # tasks running on it at the kill
    pid: int = 0
    resumed_at: float | None = None  # leader: another leader seen; redis: serving again
    lingering: int = 0  # worker: executor children still alive after their agent died

    def describe(self) -> str:
        return f"{self.kind} {self.target} (pid {self.pid}, {len(self.inflight)} running)"


@dataclass(slots=True)
class Snapshot:
    """The namespace at the end of a run, read from Redis."""

    tasks: dict[str, dict[str, str]]
    events: list[tuple[float, dict[str, str]]]
    leftovers: dict[str, int]

    @classmethod
    def read(cls, r: Any, ns: str, gpus: list[str]) -> Snapshot:
        """``r``: a ``redis.Redis`` with ``decode_responses``."""
        ids: list[str] = r.zrange(f"{ns}idx:all", 0, -1)
        tasks: dict[str, dict[str, str]] = {}
        for i in range(0, len(ids), 500):
            with r.pipeline(transaction=False) as p:
                for task_id in ids[i : i + 500]:
                    p.hgetall(f"{ns}task:{task_id}")
                tasks.update(zip(ids[i : i + 500], p.execute(), strict=True))
        events: list[tuple[float, dict[str, str]]] = []
        start = "-"
        while True:
            page = r.xrange(f"{ns}events", start, "+", count=10_000)
            for eid, fields in page:  # a batch script's entry: once per task it names
                at = int(eid.split("-")[0]) / 1000.0
                events += [(at, one) for one in per_task([fields])]
            if len(page) < 10_000:
                break
            start = "(" + page[-1][0]
        leftovers = {
            "leases": r.zcard(f"{ns}leases"),
            "delayed": r.zcard(f"{ns}delayed"),
            "running": sum(r.scard(f"{ns}gpu:{g}:running") for g in gpus),
            "inactive_gpus": sum(r.hget(f"{ns}gpu:{g}", "status") != "ACTIVE" for g in gpus),
        }
        return cls(tasks, events, leftovers)


@dataclass
class Verdict:
    tasks: int
    completed: int
    lost: int
    duplicate_results: int
    executions: int
    kills: int
    recovery: list[float]
    problems: list[str]
    details: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def recovery_p99(self) -> float:
        return percentile(self.recovery, 99)

    def line(self) -> str:
        return (
            f"tasks={self.tasks} completed={self.completed} lost={self.lost} "
            f"duplicate_results={self.duplicate_results} executions={self.executions} "
            f"kills={self.kills} recovery_p99_s={self.recovery_p99:.2f}"
        )


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]


def _result_problem(task_id: str, h: dict[str, str], returned: set[tuple[str, int, int]]) -> str:
    """Why the recorded result of a COMPLETED task is wrong, or '' when it is right."""
    try:
        result: Any = json.loads(h.get("result") or "")
        key = (result["taskId"], int(result["attempt"]), int(result["pid"]))
    except (ValueError, KeyError, TypeError):
        return f"{task_id}: result {h.get('result')!r} is not a handler's"
    if key[0] != task_id or str(key[1]) != h.get("attempt"):
        return f"{task_id}: result of {key[:2]} recorded, current attempt is {h.get('attempt')}"
    if key not in returned:
        return f"{task_id}: result names execution {key}, which the ledger never saw return"
    return ""


def _recorded_finals(snap: Snapshot) -> Counter[str]:
    return Counter(f["taskId"] for _, f in snap.events if f.get("event") in FINAL_EVENTS)


def check_tasks(
    acked: dict[int, str], snap: Snapshot, ledger: Ledger
) -> tuple[int, int, int, list[str], list[str]]:
    """(completed, lost, duplicate_results, problems, details) of the tasks."""
    problems: list[str] = []
    acked_ids = set(acked.values())
    lost = [t for t in acked_ids if snap.tasks.get(t, {}).get("status") != "COMPLETED"]
    problems += [f"lost {t}: {snap.tasks.get(t, {}).get('status', 'missing')}" for t in lost]
    states = Counter(h.get("status", "?") for h in snap.tasks.values())
    wrong = {s: n for s, n in states.items() if s != "COMPLETED"}
    if wrong:
        problems.append(f"tasks not COMPLETED at the end: {wrong}")
    finals = _recorded_finals(snap)
    dups = sorted(t for t, n in finals.items() if n > 1)
    problems += [f"{t}: final state recorded {finals[t]} times" for t in dups]
    returned = ledger.returned()
    for task_id, h in snap.tasks.items():
        why = _result_problem(task_id, h, returned) if h.get("status") == "COMPLETED" else ""
        if why:
            problems.append(why)
        elif h.get("status") == "COMPLETED" and finals[task_id] == 0:
            problems.append(f"{task_id}: COMPLETED without a completed event")
    leftovers = {k: v for k, v in snap.leftovers.items() if v}
    if leftovers:
        problems.append(f"left over at the end: {leftovers}")
    extra = len(snap.tasks) - len(acked_ids & snap.tasks.keys())
    per_task = Counter(e.task_id for e in ledger.executions)
    details = [
        f"tasks in Redis: {len(snap.tasks)} ({extra} created by creates that got no 2xx)",
        f"executions: {len(ledger.executions)} ({sum(e.end is None for e in ledger.executions)}"
        f" killed mid-way), most for one task: {max(per_task.values(), default=0)}",
    ]
    completed = sum(snap.tasks.get(t, {}).get("status") == "COMPLETED" for t in acked_ids)
    return completed, len(lost), len(dups), problems, details


def _first_after(times: list[float], after: float) -> float | None:
    return next((t for t in times if t > after), None)


def recovery_of(kill: Kill, snap: Snapshot, ledger: Ledger) -> tuple[float | None, float | None]:
    """(done, served): seconds from the kill until the tasks running on the killed component
    had their results recorded, and until the component served again (docs/chaos.md).
    None when that never happened."""
    ends = [int(snap.tasks.get(t, {}).get("completedAt") or 0) / 1000 for t in kill.inflight]
    done = None if any(e <= 0 for e in ends) else max([kill.at, *ends]) - kill.at
    served: float | None
    if kill.kind == "worker":
        starts = [
            t for t, f in snap.events if f.get("event") == "started" and f.get("gpuId") in kill.gpus
        ]
        served = _first_after(starts, kill.at)
    elif kill.kind == "executor":
        runs = [e.start for e in ledger.executions if e.gpu in kill.gpus and e.pid != kill.pid]
        served = _first_after(sorted(runs), kill.at)
    elif kill.kind == "redis":
        completions = [t for t, f in snap.events if f.get("event") == "completed"]
        served = _first_after(completions, kill.resumed_at or kill.at)
    else:
        served = kill.resumed_at
    return done, None if served is None else served - kill.at


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"+{value:.2f} s"


def verdict(
    acked: dict[int, str],
    wanted: int,
    kills: list[Kill],
    snap: Snapshot,
    ledger: Ledger,
    extra_problems: list[str],
    t0: float,
) -> Verdict:
    completed, lost, dups, problems, details = check_tasks(acked, snap, ledger)
    if len(acked) < wanted:
        problems.append(f"only {len(acked)} of {wanted} tasks could be submitted")
    recovery: list[float] = []
    by_kind: dict[str, list[float]] = defaultdict(list)
    for kill in kills:
        done, served = recovery_of(kill, snap, ledger)
        details.append(
            f"kill at +{kill.at - t0:.1f} s: {kill.describe()}; its tasks done {_seconds(done)},"
            f" serving again {_seconds(served)}"
        )
        if done is None or served is None:
            problems.append(f"never recovered from the kill of {kill.describe()}")
            continue
        recovery.append(max(done, served))
        by_kind[kill.kind].append(max(done, served))
    for kind, values in sorted(by_kind.items()):
        details.append(
            f"kills of {kind}: {len(values)}, recovery p50 {percentile(values, 50):.2f} s, "
            f"max {max(values):.2f} s"
        )
    lingering = sum(k.lingering for k in kills)
    details.append(f"executor children alive 1 s after their agent was killed: {lingering}")
    problems += extra_problems
    return Verdict(
        tasks=len(acked), completed=completed, lost=lost, duplicate_results=dups,
        executions=len(ledger.executions), kills=len(kills), recovery=recovery,
        problems=problems, details=details,
    )  # fmt: skip
