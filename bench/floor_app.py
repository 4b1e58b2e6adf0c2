"""The HTTP heartbeat row's floor: a raw ASGI app (no framework, no Redis) that reads the
request body and answers a fixed envelope, served by uvicorn with the settings
``gpuflow api`` uses. What it costs per request is what any ASGI route costs on uvicorn here.

``python -m bench.floor_app PORT``
"""

from __future__ import annotations

import sys

import uvicorn
from starlette.types import Receive, Scope, Send

BODY = b'{"code":200,"message":"success","data":{"status":"ACTIVE","stop":[]}}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return  # lifespan: nothing to set up
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


if __name__ == "__main__":
    config = uvicorn.Config(
        app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False,
        loop="auto", http="auto", lifespan="off",
    )  # fmt: skip
    uvicorn.Server(config).run()
