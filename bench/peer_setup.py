"""The peers: how each is installed (its own virtual environment under the work directory) and
how its workers are started for the drain (``Peer.workers``), with that setup in words.

Every peer's driver and worker module lives in ``bench/peers/`` (see ``peers/_common.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PEERS_DIR = Path(__file__).resolve().parent / "peers"
DONE_KEY = "bench:done"

Argv = list[str]


@dataclass(frozen=True)
class Peer:
    name: str
    packages: list[str]
    #: (work_dir) -> the argv of each worker process of the drain setup
    workers: Callable[[Path], list[Argv]]
    setup: str
    #: Redis command that counts finished no-op tasks
    count: tuple[str, ...] = ("GET", DONE_KEY)
    node: bool = False
    dist: str = ""  # the distribution whose version is reported
    extra: dict[str, str] = field(default_factory=dict)

    def venv(self, work: Path) -> Path:
        return work / "venvs" / self.name

    def bin(self, work: Path, exe: str) -> str:
        return str(self.venv(work) / "bin" / exe)

    def driver(self, work: Path) -> Argv:
        if self.node:
            return ["node", str(work / "node" / "bullmq_app.mjs")]
        return [self.bin(work, "python"), str(PEERS_DIR / f"{self.name}_app.py")]

    @property
    def cwd_hint(self) -> str:
        return "node" if self.node else "peers"


def _twice(argv: Callable[[Path], Argv]) -> Callable[[Path], list[Argv]]:
    return lambda work: [argv(work), argv(work)]


PEERS: dict[str, Peer] = {
    p.name: p
    for p in [
        Peer(
            "celery",
            ["celery[redis]", "redis[hiredis]"],
            lambda w: [
                [
                    str(w / "venvs/celery/bin/celery"),
                    "-A",
                    "celery_app",
                    "worker",
                    "-c",
                    "2",
                    "-P",
                    "prefork",
                    "-O",
                    "fair",
                    "-l",
                    "WARNING",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                ]
            ],
            "1 `celery worker`, prefork pool -c 2, -O fair, no gossip/mingle/heartbeat; "
            "task `ignore_result=True`",
        ),
        Peer(
            "rq",
            ["rq", "redis[hiredis]"],
            _twice(
                lambda w: [
                    str(w / "venvs/rq/bin/rq"),
                    "worker",
                    "-q",
                    "-u",
                    os.environ["BENCH_REDIS_URL"],
                    "-w",
                    "rq.worker.SimpleWorker",
                    "default",
                ]
            ),
            "2 `rq worker` processes, `SimpleWorker` (no fork per job; faster than the default)",
        ),
        Peer(
            "arq",
            ["arq", "hiredis"],
            _twice(lambda w: [str(w / "venvs/arq/bin/arq"), "arq_app.WorkerSettings"]),
            "2 `arq` worker processes, `max_jobs=50`, `poll_delay=0.01 s` (defaults 10 and 0.5 s)",
        ),
        Peer(
            "dramatiq",
            ["dramatiq[redis]", "redis[hiredis]"],
            lambda w: [
                [str(w / "venvs/dramatiq/bin/dramatiq"), "dramatiq_app", "-p", "2", "-t", "8"]
            ],
            "`dramatiq` with 2 processes × 8 threads (its defaults on 2 cores)",
        ),
        Peer(
            "saq",
            ["saq[redis]", "hiredis", "typing_extensions"],
            lambda w: [[str(w / "venvs/saq/bin/saq"), "saq_app.settings", "--workers", "2"]],
            "`saq` with 2 worker processes × concurrency 10 (the default)",
        ),
        Peer(
            "bullmq",
            ["bullmq"],
            _twice(lambda w: ["node", str(w / "node" / "bullmq_app.mjs"), "worker"]),
            "2 Node.js processes, one `Worker` each with concurrency 128",
            count=("ZCARD", "bull:bench:completed"),
            node=True,
        ),
    ]
}


def _uv() -> str | None:
    for candidate in (shutil.which("uv"), ".tools/bin/uv"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def install(peer: Peer, work: Path, log: Path) -> None:
    """Create the peer's venv (or node dir) unless already made with the same packages."""
    with log.open("ab") as out:
        if peer.node:
            node_dir = work / "node"
            node_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(PEERS_DIR / "bullmq_app.mjs", node_dir / "bullmq_app.mjs")
            if not (node_dir / "node_modules" / "ioredis").is_dir():
                if not (node_dir / "package.json").is_file():
                    (node_dir / "package.json").write_text(
                        '{"name": "bench-bullmq", "private": true}\n'
                    )
                subprocess.run(
                    ["npm", "install", "bullmq", "ioredis"],
                    cwd=node_dir,
                    stdout=out,
                    stderr=out,
                    check=True,
                    timeout=600,
                )
            return
        venv = peer.venv(work)
        marker = venv / "bench-packages.json"
        if marker.is_file() and json.loads(marker.read_text()) == peer.packages:
            return
        uv = _uv()
        if uv:
            subprocess.run(
                [uv, "venv", "-q", "--allow-existing", "-p", sys.executable, str(venv)],
                stdout=out,
                stderr=out,
                check=True,
                timeout=300,
            )
            env = {**os.environ, "VIRTUAL_ENV": str(venv)}
            subprocess.run(
                [uv, "pip", "install", "-q", *peer.packages],
                env=env,
                stdout=out,
                stderr=out,
                check=True,
                timeout=600,
            )
        else:
            subprocess.run(
                [sys.executable, "-m", "venv", str(venv)],
                stdout=out,
                stderr=out,
                check=True,
                timeout=300,
            )
            pip = [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
            ]
            subprocess.run([*pip, *peer.packages], stdout=out, stderr=out, check=True, timeout=900)
        marker.write_text(json.dumps(peer.packages))


def version(peer: Peer, work: Path) -> str:
    if peer.node:
        pkg = work / "node" / "node_modules" / "bullmq" / "package.json"
        node = subprocess.run(
            ["node", "--version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        return f"{json.loads(pkg.read_text())['version']} (node {node})"
    code = f"import importlib.metadata as m; print(m.version({peer.name!r}))"
    out = subprocess.run(
        [peer.bin(work, "python"), "-c", code], capture_output=True, text=True, timeout=60
    )
    return out.stdout.strip() or "?"
