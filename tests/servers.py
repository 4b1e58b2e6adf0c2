"""Real servers for tests: the API in uvicorn on 127.0.0.1, in a thread of the test process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp

from gpuflow.api.app import create_app
from gpuflow.config import Settings


@dataclass
class ApiServer:
    url: str
    admin_key: str
    server: uvicorn.Server
    thread: threading.Thread
    app: FastAPI

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def start_api(
    settings: Settings,
    redis_url: str,
    timeout: float = 10.0,
    *,
    fast_paths: bool = True,
    wrap: Callable[[ASGIApp], ASGIApp] | None = None,
) -> ApiServer:
    """The api in uvicorn; ``wrap`` puts an ASGI layer in front of it (an older api)."""
    app = create_app(settings, redis_url, fast_paths=fast_paths)
    served = wrap(app) if wrap else app
    config = uvicorn.Config(served, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("API server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return ApiServer(f"http://127.0.0.1:{port}", settings.admin_key or "", server, thread, app)
