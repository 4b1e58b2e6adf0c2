"""``gpuflow submit | tasks | task | gpus | keys``: the HTTP API from a shell, via the client.

Every command takes ``--api-url`` ($GPUFLOW_API_URL) and ``--api-key`` ($GPUFLOW_API_KEY);
with no key given it uses ``<data-dir>/admin.key``, where ``gpuflow up`` keeps the admin key.
An API error prints the API's message on stderr and exits 2 for a 4xx, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from gpuflow.client import (
    DEFAULT_API_URL,
    AuthError,
    Client,
    Gpu,
    GpuflowError,
    TaskProgress,
    ValidationError,
)

ApiUrl = Annotated[
    str,
    typer.Option("--api-url", envvar="GPUFLOW_API_URL", help="Base URL of the gpuflow API."),
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="GPUFLOW_API_KEY",
        show_default=False,
        help="API key (default: the admin key in DATA_DIR/admin.key).",
    ),
]
DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir", envvar="GPUFLOW_DATA_DIR", help="Where `gpuflow up` keeps admin.key."
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the API's data as JSON.")]
DEFAULT_DATA_DIR = Path(".gpuflow")
STATUS_STYLE = {
    "QUEUED": "cyan",
    "PROCESSING": "yellow",
    "COMPLETED": "green",
    "FAILED": "red",
    "TIMEOUT": "red",
    "CANCELED": "dim",
    "ACTIVE": "green",
    "OFFLINE": "dim",
    "FAULTY": "red",
}


# --- plumbing ---------------------------------------------------------------------------


def resolve_key(api_key: str | None, data_dir: Path) -> str | None:
    """The key given, else the admin key `gpuflow up` wrote to ``data_dir/admin.key``."""
    if api_key:
        return api_key
    try:
        return (data_dir / "admin.key").read_text().strip() or None
    except OSError:
        return None


def exit_code(exc: GpuflowError) -> int:
    """2 for what the caller got wrong (4xx, bad input), 1 for everything else."""
    if isinstance(exc, ValidationError) or (exc.status is not None and 400 <= exc.status < 500):
        return 2
    return 1


@contextmanager
def connect(api_url: str, api_key: str | None, data_dir: Path) -> Iterator[Client]:
    """A client for one command; an API or connection error ends it with a clean message."""
    key = resolve_key(api_key, data_dir)
    try:
        with Client(api_url, key) as client:
            yield client
    except GpuflowError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        if isinstance(exc, AuthError) and exc.status == 401 and not key:
            typer.echo(
                f"hint: pass --api-key or set GPUFLOW_API_KEY "
                f"(no admin key in {data_dir / 'admin.key'})",
                err=True,
            )
        raise typer.Exit(exit_code(exc)) from None


def console() -> Console:
    """Stdout; when it is not a terminal, wide enough that ids are never folded."""
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(highlight=False, width=200 if wide else None)


def echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def when(ms: int | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000).strftime(fmt)


def ago(ms: int | None) -> str:
    if not ms:
        return "never"
    return f"{max(time.time() - ms / 1000, 0):.0f}s ago"


def cell(value: Any, style: str = "") -> Text:
    """A table cell as plain text (never rich markup: messages may hold brackets)."""
    if value is None or value == "":
        return Text("-", style="dim")
    if isinstance(value, dict | list):
        value = json.dumps(value, ensure_ascii=False)
    return Text(str(value), style=style)


def status_cell(status: str) -> Text:
    return cell(status, STATUS_STYLE.get(status, ""))


def print_fields(out: Console, rows: Iterable[tuple[str, Any]]) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for name, value in rows:
        grid.add_row(name, status_cell(value) if name == "status" else cell(value))
    out.print(grid)


def parse_payload(text: str | None) -> Any:
    """PAYLOAD: JSON text, or ``@file`` holding JSON (``@-``: stdin)."""
    if text is None:
        return None
    if text.startswith("@"):
        name = text[1:]
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text()
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {name}: {exc}", param_hint="PAYLOAD") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise typer.BadParameter(
            f"not valid JSON ({exc}); quote a plain string as '\"text\"'", param_hint="PAYLOAD"
        ) from None


# --- tasks ------------------------------------------------------------------------------

TASK_TIMES = ("createdAt", "startedAt", "completedAt", "updatedAt")


def print_task(out: Console, task: dict[str, Any]) -> None:
    print_fields(out, ((k, when(v) if k in TASK_TIMES else v) for k, v in task.items()))


def print_result(gf: Client, task_id: str, status: str, as_json: bool) -> None:
    """The result of an ended task on stdout; exit 1 (reason on stderr) unless COMPLETED."""
    result = gf.get_result(task_id)
    if as_json:
        echo_json(result)
    elif isinstance(result["result"], str):
        typer.echo(result["result"])
    elif result["result"] is not None:
        echo_json(result["result"])
    if status != "COMPLETED":
        typer.echo(f"task {task_id} ended {status}: {result['errorMessage'] or '-'}", err=True)
        raise typer.Exit(1)


def submit(
    task_type: Annotated[int, typer.Argument(help="Task type code.", show_default=False)],
    payload: Annotated[
        str | None,
        typer.Argument(help="JSON, or @FILE holding JSON (@- reads stdin).", show_default=False),
    ] = None,
    priority: Annotated[int, typer.Option("--priority", "-p", help=">= 2 goes VIP.")] = 0,
    user: Annotated[str | None, typer.Option("--user", help="Owner (admin keys).")] = None,
    app_name: Annotated[str | None, typer.Option("--app", help="Calling application.")] = None,
    env: Annotated[str | None, typer.Option("--env", help="Environment label.")] = None,
    max_retries: Annotated[int | None, typer.Option("--max-retries", min=0)] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the end, print the result.")] = (
        False
    ),
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Seconds --wait waits at most.", min=0)
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the taskId.")] = False,
    as_json: AsJson = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Queue a task; with --wait, wait for it and print its result (exit 1 unless COMPLETED)."""
    body = parse_payload(payload)
    with connect(api_url, api_key, data_dir) as gf:
        created = gf.create_task(
            task_type, body, priority=priority, user_id=user, app=app_name, env=env,
            max_retries=max_retries,
        )  # fmt: skip
        if quiet:
            typer.echo(created["taskId"])
        elif as_json and not wait:
            echo_json(created)
        elif not as_json:
            print_fields(console(), created.items())
        if wait:
            task = gf.wait(created["taskId"], timeout=timeout)
            print_result(gf, task["taskId"], task["status"], as_json)


def tasks(
    status: Annotated[str | None, typer.Option("--status", help="QUEUED, PROCESSING …")] = None,
    task_type: Annotated[int | None, typer.Option("--type", help="Task type code.")] = None,
    gpu: Annotated[str | None, typer.Option("--gpu", help="GPU id.")] = None,
    user: Annotated[str | None, typer.Option("--user", help="User id.")] = None,
    page: Annotated[int, typer.Option("--page", min=1)] = 1,
    size: Annotated[int, typer.Option("--size", min=1, max=200)] = 20,
    as_json: AsJson = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """List tasks, newest first (a client key sees only its own)."""
    with connect(api_url, api_key, data_dir) as gf:
        items, total = gf.list_tasks_page(status, task_type, gpu, user, page, size)
    if as_json:
        echo_json({"total": total, "page": page, "size": size, "items": items})
        return
    table = Table("#")
    table.add_column(
        "Task", no_wrap=True, min_width=max((len(t["taskId"]) for t in items), default=4)
    )
    table.add_column("Type")
    table.add_column("Status", no_wrap=True, min_width=10)
    for name in ("Prio", "User", "GPU", "Progress", "Created"):
        table.add_column(name)
    for t in items:
        table.add_row(
            cell(t["displayId"]), cell(t["taskId"]), cell(t["taskType"]),
            status_cell(t["status"]), cell(t["priority"]), cell(t["userId"]), cell(t["gpuId"]),
            cell(f"{t['progress']}%"), cell(when(t["createdAt"], "%m-%d %H:%M:%S")),
        )  # fmt: skip
    first = (page - 1) * size + 1
    shown = f"{first}-{first + len(items) - 1}" if items else "none"
    table.caption = f"{shown} of {total} tasks (page {page})"
    console().print(table)


def progress_line(p: TaskProgress) -> str:
    where = f" #{p['queuePosition']} in line" if p["status"] == "QUEUED" else ""
    note = f"  {p['message']}" if p["message"] else ""
    eta = f"  ~{p['estimatedRemainingTime']}s left" if p["estimatedRemainingTime"] > 0 else ""
    return f"{p['status']:<10} {p['progress']:>3}%{where}{eta}{note}"


def show_progress(out: Console, updates: Iterable[TaskProgress], as_json: bool) -> None:
    """Each update as a JSON line (--json), a progress bar (terminal), or a text line."""
    if as_json:
        for p in updates:
            typer.echo(json.dumps(p, ensure_ascii=False))
    elif out.is_terminal:
        columns = (
            TextColumn("{task.description:<10}", markup=False),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[note]}", markup=False),
        )
        with Progress(*columns, console=out) as bar:
            handle = bar.add_task("", total=100, note="")
            for p in updates:
                bar.update(
                    handle, completed=p["progress"], description=p["status"],
                    note=p["message"] or "",
                )  # fmt: skip
    else:
        for p in updates:
            out.print(progress_line(p), markup=False)


def task(
    task_id: Annotated[str, typer.Argument(help="Task id.", show_default=False)],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Show progress until the task ends.")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Seconds --follow follows at most.", min=0)
    ] = None,
    as_json: AsJson = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """One task's detail; with --follow, its progress until it ends (exit 0 iff COMPLETED)."""
    out = console()
    with connect(api_url, api_key, data_dir) as gf:
        if follow:
            show_progress(out, gf.follow(task_id, timeout=timeout), as_json)
        detail = gf.get_task(task_id)
    if as_json:
        typer.echo(json.dumps(detail, ensure_ascii=False, indent=None if follow else 2))
    else:
        print_task(out, dict(detail))
    if follow and detail["status"] != "COMPLETED":
        typer.echo(f"task {task_id} ended {detail['status']}: {detail['errorMessage']}", err=True)
        raise typer.Exit(1)


# --- GPUs and keys ----------------------------------------------------------------------


def gpu_row(g: Gpu) -> list[Text]:
    types = ",".join(str(t) for t in g["supportedTaskTypes"])
    return [
        cell(g["gpuId"]), status_cell(g["status"]), cell(g["supportedTaskPriority"]),
        cell(types), cell(f"{g['currentTasks']}/{g['maxConcurrentTasks']}"),
        cell(ago(g["lastHeartbeat"])), cell(g["hostname"]), cell(g["faultReason"]),
    ]  # fmt: skip


def gpus(
    as_json: AsJson = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """List GPU nodes."""
    with connect(api_url, api_key, data_dir) as gf:
        nodes = gf.list_gpus()
    if as_json:
        echo_json(nodes)
        return
    table = Table("GPU", "Status", "Tier", "Types", "Tasks", "Heartbeat", "Host", "Fault")
    for g in nodes:
        table.add_row(*gpu_row(g))
    table.caption = f"{len(nodes)} GPU nodes"
    console().print(table)


keys_app = typer.Typer(help="API keys (admin only).", no_args_is_help=True)


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option("--role", help="admin, client, worker or viewer.")],
    user: Annotated[
        str | None, typer.Option("--user", help="Owning user (required for client).")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="A label.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the key.")] = False,
    as_json: AsJson = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Create a key; it is shown once (only its hash is stored)."""
    with connect(api_url, api_key, data_dir) as gf:
        created = gf.create_key(role, user, name)
    if quiet:
        typer.echo(created["key"])
    elif as_json:
        echo_json(created)
    else:
        rows: list[tuple[str, Any]] = [("key", created["key"]), ("keyId", created["keyId"])]
        rows += [("role", created["role"]), ("userId", created["userId"])]
        rows += [("name", created["name"]), ("createdAt", when(created["createdAt"]))]
        print_fields(console(), rows)
        typer.echo("Store the key now: it cannot be shown again.", err=True)


@keys_app.command("list")
def keys_list(
    as_json: AsJson = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """List keys: id, role, user, name (never the key itself)."""
    with connect(api_url, api_key, data_dir) as gf:
        keys = gf.list_keys()
    if as_json:
        echo_json(keys)
        return
    table = Table("Key id", "Role", "User", "Name", "Created")
    for k in keys:
        table.add_row(
            cell(k["keyId"]), cell(k["role"]), cell(k["userId"]), cell(k["name"]),
            cell(when(k["createdAt"])),
        )  # fmt: skip
    console().print(table)


def register(app: typer.Typer) -> None:
    """Add ``submit``, ``tasks``, ``task``, ``gpus`` and ``keys`` to ``app``."""
    for command in (submit, tasks, task, gpus):
        app.command()(command)
    app.add_typer(keys_app, name="keys")
