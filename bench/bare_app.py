"""The HTTP ceiling's reference: a bare FastAPI app whose ``POST /api/v2/tasks`` parses the same
body and does one Redis ``XADD``, served by uvicorn with the settings ``gpuflow api`` uses.

``python -m bench.bare_app PORT`` with ``BENCH_REDIS_URL`` set.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()
r = aioredis.Redis.from_url(
    os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1"), decode_responses=True
)


class Body(BaseModel):
    taskType: int
    payload: Any = None


@app.post("/api/v2/tasks")
async def create(body: Body) -> dict[str, Any]:
    entry = await r.xadd(
        "bare:tasks", {"taskType": body.taskType, "payload": json.dumps(body.payload)}
    )
    return {"code": 200, "message": "success", "data": {"taskId": entry, "status": "QUEUED"}}


if __name__ == "__main__":
    config = uvicorn.Config(
        app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False,
        loop="auto", http="auto", lifespan="on",
    )  # fmt: skip
    uvicorn.Server(config).run()
