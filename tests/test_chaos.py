"""Chaos with real processes: the short profile of bench/chaos.py, and a stale worker.

Both start an embedded Redis, ``gpuflow api`` and ``gpuflow worker`` processes on 127.0.0.1
and kill / freeze them; see docs/chaos.md.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from bench.chaos_cluster import NAMESPACE, ROOT, Cluster
from bench.chaos_report import Execution, Ledger, Snapshot, check_tasks

from gpuflow.store.events import per_task


@pytest.mark.timeout(300)
def test_short_chaos_profile_loses_nothing(tmp_path: Path) -> None:
    """150 tasks over 2 workers (2 GPUs each) and 2 api processes while worker agents,
    executor children, the leader and Redis are SIGKILLed: every task COMPLETED once."""
    cmd = [sys.executable, "-m", "bench.chaos", "--profile", "short", "--work-dir", str(tmp_path)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        out, _ = proc.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the suite then kills everything it started
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"the chaos run did not finish in 200 s:\n{out[-6000:]}")
    finally:
        if proc.poll() is None:  # interrupted: let the suite clean up after itself
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    assert proc.returncode == 0, out[:400] + "\n…\n" + out[-6000:]  # the seed is on line 1
    summary = out.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in summary.split())
    assert fields["tasks"] == fields["completed"] == "150", summary
    assert fields["lost"] == "0" and fields["duplicate_results"] == "0", summary
    assert int(fields["kills"]) >= 5 and int(fields["executions"]) >= 150, summary


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(180)
def test_stale_worker_late_completion_is_refused(tmp_path: Path) -> None:
    """A worker agent frozen (SIGSTOP) while its task runs loses the task: its lease
    expires and another worker runs attempt 2. Thawed, the stale agent reports attempt 1's
    completion, which is refused; the task's only recorded result is attempt 2's."""
    cluster = Cluster(tmp_path, apis=1, workers=2, gpus_per_worker=1)
    try:
        cluster.start_redis()
        cluster.start_api(0)
        stale = cluster.start_worker(0)
        cluster.wait_api(0)
        cluster.wait_worker(0)
        body = {
            "taskType": 1,
            "maxRetries": 3,
            "payload": {"attemptSleepMs": {"1": 1500, "2": 2500}},
        }
        with httpx.Client(
            base_url=cluster.api_url(0), headers={"X-API-Key": cluster.admin_key}
        ) as c:
            task_id = c.post("/api/v2/tasks", json=body).json()["data"]["taskId"]
        ledger = Ledger(cluster.ledger)

        def running(attempt: int) -> bool:
            ledger.refresh()
            return any(
                e.task_id == task_id and e.attempt == attempt for e in ledger.running.values()
            )

        wait_for("attempt 1 to run", lambda: running(1))
        stale.signal(signal.SIGSTOP)  # no heartbeat, no report; its executor child runs on
        cluster.start_worker(1)
        with cluster.client() as r:
            key = f"{NAMESPACE}task:{task_id}"
            moved = ["PROCESSING", "2", "chaos-w1-gpu0"]
            fields = ("status", "attempt", "gpuId")
            wait_for("attempt 2 on the other worker", lambda: r.hmget(key, fields) == moved)
            assert running(2) and not running(1)  # attempt 1's handler returned meanwhile
            stale.signal(signal.SIGCONT)
            refusal = f"report of {task_id} dropped: task {task_id}: stale attempt 1"
            log = cluster.work_dir / "worker0.log"
            wait_for("the late report's refusal", lambda: refusal in log.read_text(), 15)
            wait_for("COMPLETED", lambda: r.hget(key, "status") == "COMPLETED", 15)
            result = json.loads(r.hget(key, "result") or "")
            events = r.xrange(f"{NAMESPACE}events")
        assert result["attempt"] == 2 and result["gpuId"] == "chaos-w1-gpu0"
        ledger.refresh()
        runs = sorted((e.attempt, e.end is not None) for e in ledger.executions)
        assert runs == [(1, True), (2, True)]  # both executions returned; one result recorded
        finals = [
            f
            for f in per_task(f for _, f in events)
            if f.get("taskId") == task_id and f["event"] == "completed"
        ]
        assert len(finals) == 1
    finally:
        cluster.close()


def test_checks_flag_lost_duplicated_and_foreign_results(tmp_path: Path) -> None:
    """The suite's checks themselves: a missing task, a result recorded twice, a result of a
    stale attempt and one that no execution returned are all reported."""

    def done(task_id: str, attempt: int, pid: int, current: int) -> dict[str, str]:
        result = {"taskId": task_id, "attempt": attempt, "pid": pid}
        return {"status": "COMPLETED", "attempt": str(current), "result": json.dumps(result)}

    tasks = {
        "ok": done("ok", 1, 10, 1),
        "twice": done("twice", 1, 10, 1),
        "stale": done("stale", 1, 10, 2),
        "foreign": done("foreign", 1, 99, 1),
    }
    events = [(1.0, {"event": "completed", "taskId": t}) for t in [*tasks, "twice"]]
    snap = Snapshot(tasks, events, {"leases": 0, "running": 1})
    ledger = Ledger(tmp_path / "none")
    ledger.executions = [Execution(t, 1, 10, "g", 0.5, 0.6) for t in tasks]
    acked = {i: t for i, t in enumerate([*tasks, "missing"])}
    completed, lost, dups, problems, _ = check_tasks(acked, snap, ledger)
    assert (completed, lost, dups) == (4, 1, 1)
    text = "\n".join(problems)
    assert "lost missing: missing" in text
    assert "twice: final state recorded 2 times" in text
    assert "stale: result of ('stale', 1) recorded, current attempt is 2" in text
    assert "foreign: result names execution ('foreign', 1, 99)" in text
    assert "left over at the end: {'running': 1}" in text
    assert not any(p.startswith("ok") for p in problems)
