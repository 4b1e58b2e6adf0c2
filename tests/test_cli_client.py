"""`gpuflow submit | tasks | task | gpus | keys` through typer's CliRunner, against a real API."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from gpuflow.cli import app
from gpuflow.cli.client_cmds import show_progress
from gpuflow.client import Client, TaskProgress

from .servers import ApiServer
from .test_client_support import Node, closed_port_url

runner = CliRunner()


@pytest.fixture
def admin(api_server: ApiServer) -> Iterator[Client]:
    with Client(api_server.url, api_server.admin_key) as client:
        yield client


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("GPUFLOW_API_URL", "GPUFLOW_API_KEY", "GPUFLOW_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray ./.gpuflow/admin.key


def gpuflow(server: ApiServer, *args: str, key: str | None = None) -> Result:
    """Run a command against ``server`` with the admin key (or ``key``)."""
    creds = ["--api-url", server.url, "--api-key", key or server.admin_key]
    return runner.invoke(app, [*args, *creds])


def json_out(result: Result) -> Any:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def test_submit_prints_the_new_task(api_server: ApiServer, admin: Client) -> None:
    result = gpuflow(api_server, "submit", "1", '{"prompt": "a cat"}', "--priority", "2")
    assert result.exit_code == 0, result.output
    task = admin.list_tasks()[0]
    assert task["taskId"] in result.stdout and "estimatedWaitTime" in result.stdout
    assert (task["payload"], task["priority"]) == ('{"prompt":"a cat"}', 2)
    quiet = gpuflow(api_server, "submit", "1", "--quiet", "--user", "u9", "--app", "ap")
    assert quiet.exit_code == 0 and quiet.stdout.strip() == admin.list_tasks()[0]["taskId"]
    assert admin.get_task(quiet.stdout.strip())["userId"] == "u9"
    created = json_out(gpuflow(api_server, "submit", "3", '"plain text"', "--json"))
    assert admin.get_task(created["taskId"])["payload"] == "plain text"


def test_submit_reads_the_payload_from_a_file(api_server: ApiServer, admin: Client) -> None:
    Path("job.json").write_text('{"frames": [1, 2]}')
    task_id = gpuflow(api_server, "submit", "1", "@job.json", "-q").stdout.strip()
    assert admin.get_task(task_id)["payload"] == '{"frames":[1,2]}'


def test_submit_refuses_bad_payloads_with_usage_errors(api_server: ApiServer) -> None:
    for payload in ("{not json", "@missing.json"):
        result = gpuflow(api_server, "submit", "1", payload)
        assert result.exit_code == 2 and "PAYLOAD" in result.stderr, result.output
    result = gpuflow(api_server, "submit", "1", "--priority", "1000")
    assert result.exit_code == 2 and result.stderr.startswith("error: priority")
    assert "Traceback" not in result.output


def test_submit_wait_prints_the_result(api_server: ApiServer, admin: Client) -> None:
    node = Node(admin)
    # The node long-polls for the task the command is about to submit: no clock involved.
    worker = threading.Thread(target=node.run, args=({"url": "s3://x.mp4"}, 10))
    worker.start()
    try:
        result = gpuflow(api_server, "submit", "1", "{}", "--wait", "--timeout", "15", "-q")
    finally:
        worker.join(15)
    assert result.exit_code == 0, result.output
    task_id, _, printed = result.stdout.partition("\n")
    assert json.loads(printed) == {"url": "s3://x.mp4"}
    assert admin.get_task(task_id)["status"] == "COMPLETED"


def test_submit_wait_exits_1_when_the_task_fails(api_server: ApiServer, admin: Client) -> None:
    node = Node(admin)

    def fail_next() -> None:
        task_id, attempt = node.claim(10)
        node.fail(task_id, attempt, "codec missing")

    worker = threading.Thread(target=fail_next)
    worker.start()
    try:
        result = gpuflow(
            api_server, "submit", "1", "--max-retries", "0", "--wait", "--timeout", "15", "--json"
        )
    finally:
        worker.join(15)
    assert result.exit_code == 1
    assert json.loads(result.stdout)["status"] == "FAILED"
    assert "ended FAILED: codec missing" in result.stderr


def test_tasks_lists_newest_first_with_the_total(api_server: ApiServer, admin: Client) -> None:
    ids = [admin.create_task(t)["taskId"] for t in (1, 2, 1)]
    result = gpuflow(api_server, "tasks")
    assert result.exit_code == 0, result.output
    assert [result.stdout.index(i) for i in ids[::-1]] == sorted(
        result.stdout.index(i) for i in ids
    )
    assert "1-3 of 3 tasks (page 1)" in result.stdout
    page = json_out(gpuflow(api_server, "tasks", "--type", "1", "--size", "1", "--json"))
    assert (page["total"], [t["taskId"] for t in page["items"]]) == (2, [ids[2]])
    assert "none of 0 tasks" in gpuflow(api_server, "tasks", "--status", "FAILED").stdout
    bad = gpuflow(api_server, "tasks", "--status", "DONE")
    assert bad.exit_code == 2 and bad.stderr.startswith("error: status")


def test_task_shows_the_detail(api_server: ApiServer, admin: Client) -> None:
    task_id = admin.create_task(4, {"a": 1}, app="studio")["taskId"]
    result = gpuflow(api_server, "task", task_id)
    assert result.exit_code == 0, result.output
    assert task_id in result.stdout and "studio" in result.stdout and "QUEUED" in result.stdout
    assert json_out(gpuflow(api_server, "task", task_id, "--json"))["taskType"] == 4
    missing = gpuflow(api_server, "task", "task_nope")
    assert missing.exit_code == 2
    assert missing.stderr == "error: task task_nope not found\n"


def test_task_follow_exit_code_tells_the_outcome(api_server: ApiServer, admin: Client) -> None:
    node = Node(admin)
    done = admin.create_task(1)["taskId"]
    node.run("ok")
    result = gpuflow(api_server, "task", done, "--follow", "--timeout", "10")
    assert result.exit_code == 0, result.output
    assert "COMPLETED  100%" in result.stdout
    lines = gpuflow(api_server, "task", done, "-f", "--json").stdout.splitlines()
    assert [json.loads(line)["status"] for line in lines] == ["COMPLETED", "COMPLETED"]

    failed = admin.create_task(1, max_retries=0)["taskId"]
    node.fail(*node.claim(), "bad input video")
    result = gpuflow(api_server, "task", failed, "--follow")
    assert result.exit_code == 1 and "ended FAILED: bad input video" in result.stderr

    queued = admin.create_task(9)["taskId"]
    result = gpuflow(api_server, "task", queued, "--follow", "--timeout", "0.05")
    assert result.exit_code == 1 and "still QUEUED" in result.stderr
    assert "QUEUED       0% #1 in line" in result.stdout


def test_task_follow_shows_progress_pushed_while_it_runs(
    api_server: ApiServer, admin: Client
) -> None:
    node = Node(admin)
    task_id = admin.create_task(1)["taskId"]
    notifier = api_server.server.config.app.state.notifier  # type: ignore[attr-defined]

    def run() -> None:
        # Drive the task only once the command's event stream is open (bounded, no clock).
        for _ in range(2000):
            if notifier.watchers:
                break
            threading.Event().wait(0.005)
        claimed, attempt = node.claim()
        node.progress(claimed, attempt, 40, "encoding")
        node.complete(claimed, attempt, "ok")

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    result = gpuflow(api_server, "task", task_id, "--follow", "--json", "--timeout", "20")
    worker.join(10)
    assert result.exit_code == 0, result.output
    statuses = [json.loads(line)["status"] for line in result.stdout.splitlines()]
    # The node may start the task before the stream's first read: QUEUED may be skipped,
    # and quick changes may coalesce; the order and the end are certain.
    assert statuses[0] in ("QUEUED", "PROCESSING") and statuses[-2:] == ["COMPLETED"] * 2
    assert statuses[:-1] == sorted(statuses[:-1], key=["QUEUED", "PROCESSING", "COMPLETED"].index)


def test_follow_draws_a_progress_bar_on_a_terminal() -> None:
    buffer = io.StringIO()
    out = Console(file=buffer, force_terminal=True, width=100)

    def update(status: str, pct: int) -> TaskProgress:
        return {"taskId": "t", "status": status, "progress": pct, "message": "[encoding]",
                "estimatedRemainingTime": 0, "gpuId": "g", "startTime": 1, "updateTime": 1,
                "queuePosition": 0}  # fmt: skip

    show_progress(out, [update("PROCESSING", 30), update("COMPLETED", 100)], as_json=False)
    text = buffer.getvalue()
    assert "COMPLETED" in text and "100%" in text and "[encoding]" in text


def test_gpus_table_and_json(api_server: ApiServer, admin: Client) -> None:
    Node(admin, "gpu-z", [1, 5])
    admin.fault_gpu("gpu-z", "ecc errors")
    result = gpuflow(api_server, "gpus")
    assert result.exit_code == 0, result.output
    for text in ("gpu-z", "FAULTY", "1,5", "0/1", "ecc errors", "1 GPU nodes"):
        assert text in result.stdout
    assert json_out(gpuflow(api_server, "gpus", "--json"))[0]["gpuId"] == "gpu-z"


def test_keys_create_and_a_client_key_sees_only_its_tasks(
    api_server: ApiServer, admin: Client
) -> None:
    result = gpuflow(api_server, "keys", "create", "--role", "client", "--user", "alice", "-q")
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    assert key.startswith("gf_client_") and "\n" not in key
    admin.create_task(1, user_id="bob")
    mine = gpuflow(api_server, "submit", "1", "-q", key=key).stdout.strip()
    listed = json_out(gpuflow(api_server, "tasks", "--json", key=key))
    assert (listed["total"], [t["taskId"] for t in listed["items"]]) == (1, [mine])
    assert json_out(gpuflow(api_server, "tasks", "--json"))["total"] == 2  # the admin sees all
    forbidden = gpuflow(api_server, "gpus", key=key)
    assert forbidden.exit_code == 2 and "role client may not" in forbidden.stderr

    table = gpuflow(api_server, "keys", "create", "--role", "viewer", "--name", "dash")
    assert table.exit_code == 0 and "gf_viewer_" in table.stdout
    assert "cannot be shown again" in table.stderr
    keys = gpuflow(api_server, "keys", "list")
    assert keys.exit_code == 0 and "alice" in keys.stdout and "dash" in keys.stdout
    assert "gf_client_" not in keys.stdout
    assert len(json_out(gpuflow(api_server, "keys", "list", "--json"))) == 2
    bad = gpuflow(api_server, "keys", "create", "--role", "client")
    assert bad.exit_code == 2 and "needs a userId" in bad.stderr


def test_the_admin_key_file_is_the_fallback(api_server: ApiServer, tmp_path: Path) -> None:
    data = tmp_path / "state"
    data.mkdir()
    (data / "admin.key").write_text(api_server.admin_key + "\n")
    result = runner.invoke(app, ["gpus", "--api-url", api_server.url, "--data-dir", str(data)])
    assert result.exit_code == 0, result.output
    env = {"GPUFLOW_API_URL": api_server.url, "GPUFLOW_DATA_DIR": str(data)}
    assert runner.invoke(app, ["keys", "list"], env=env).exit_code == 0
    result = runner.invoke(app, ["gpus", "--api-url", api_server.url])
    assert result.exit_code == 2
    assert "missing API key" in result.stderr and "hint: pass --api-key" in result.stderr


def test_an_unreachable_server_is_one_clear_line() -> None:
    url = closed_port_url()
    result = runner.invoke(app, ["tasks", "--api-url", url, "--api-key", "k"])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cannot reach gpuflow at {url}: ")
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
