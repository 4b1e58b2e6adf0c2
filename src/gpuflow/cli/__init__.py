"""The ``gpuflow`` command: one typer app, with each command family in its own module."""

from __future__ import annotations

import typer

from gpuflow.cli import client_cmds, server_cmds, worker_cmds

app = typer.Typer(
    name="gpuflow",
    help="Run AI media jobs on a fleet of GPU machines.",
    no_args_is_help=True,
    add_completion=False,
)
server_cmds.register(app)
worker_cmds.register(app)
client_cmds.register(app)


def main() -> None:
    app()
