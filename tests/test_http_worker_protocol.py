"""A GPU node driven through the HTTP worker protocol with plain HTTP calls, end to end."""

from __future__ import annotations

import asyncio
import time

import httpx

from .servers import ApiServer


async def worker_key(c: httpx.AsyncClient) -> dict[str, str]:
    r = await c.post("/api/v2/keys", json={"role": "worker", "name": "node-1"})
    return {"X-API-Key": r.json()["data"]["key"]}


async def test_node_lifecycle_over_http(api_server: ApiServer) -> None:
    admin = {"X-API-Key": api_server.admin_key}
    async with httpx.AsyncClient(base_url=api_server.url, headers=admin, timeout=30) as c:
        node = await worker_key(c)
        body = {
            "gpuId": "http-gpu-1",
            "hostname": "box-1",
            "ip": "127.0.0.1",
            "port": 9001,
            "supportedTaskTypes": [3],
            "supportedTaskPriority": "NORMAL",
            "version": "1.0.0",
            "maxConcurrentTasks": 1,
            "metadata": {"gpuModel": "RTX 4090", "memory": "24GB", "cudaVersion": "12.4"},
        }
        r = await c.post("/api/v2/gpus/register", json=body, headers=node)
        assert r.json() == {"code": 200, "message": "success", "data": "GPU registered"}
        r = await c.post("/api/v2/gpus/http-gpu-1/heartbeat", headers=node)
        assert r.status_code == 200

        # A long-poll claim that is waiting when the task arrives returns it at once.
        claim = asyncio.create_task(
            c.post("/api/v2/gpus/http-gpu-1/claim", params={"wait": 10}, headers=node)
        )
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        created = await c.post("/api/v2/tasks", json={"taskType": 3, "payload": {"n": 1}})
        task_id = created.json()["data"]["taskId"]
        claimed = (await asyncio.wait_for(claim, 10)).json()["data"]
        assert time.monotonic() - t0 < 2.0
        assert [t["taskId"] for t in claimed] == [task_id]
        task = claimed[0]
        assert (task["status"], task["gpuId"], task["attempt"]) == ("PROCESSING", "http-gpu-1", 1)
        assert task["payload"] == '{"n":1}'

        # The node is at capacity: another claim gets nothing.
        await c.post("/api/v2/tasks", json={"taskType": 3})
        r = await c.post("/api/v2/gpus/http-gpu-1/claim", params={"wait": 0}, headers=node)
        assert r.json()["data"] == []
        gpu = (await c.get("/api/v2/gpus/http-gpu-1")).json()["data"]
        assert gpu["currentTasks"] == 1 and gpu["metadata"]["gpuModel"] == "RTX 4090"

        progress = {"progress": 40, "message": "frames 40/100", "gpuId": "http-gpu-1",
                    "attempt": 1}  # fmt: skip
        r = await c.post(f"/api/v2/tasks/{task_id}/progress", json=progress, headers=node)
        assert r.status_code == 200
        seen = (await c.get(f"/api/v2/tasks/{task_id}/progress")).json()["data"]
        assert (seen["progress"], seen["message"], seen["queuePosition"]) == (
            40, "frames 40/100", 0)  # fmt: skip

        result = {"result": {"resultImages": ["a.jpg"]}, "gpuId": "http-gpu-1", "attempt": 1}
        r = await c.post(f"/api/v2/tasks/{task_id}/result", json=result, headers=node)
        assert r.status_code == 200
        # A duplicate report of the same attempt is refused.
        r = await c.post(f"/api/v2/tasks/{task_id}/result", json=result, headers=node)
        assert r.status_code == 409 and r.json()["code"] == 409
        done = (await c.get(f"/api/v2/tasks/{task_id}/result")).json()["data"]
        assert done["status"] == "COMPLETED"
        assert done["result"] == {"resultImages": ["a.jpg"]}
        detail = (await c.get(f"/api/v2/tasks/{task_id}")).json()["data"]
        assert detail["completedAt"] >= detail["startedAt"] >= detail["createdAt"]
        assert detail["result"] == '{"resultImages":["a.jpg"]}'


async def test_status_reports_fail_retry_and_release(api_server: ApiServer) -> None:
    admin = {"X-API-Key": api_server.admin_key}
    async with httpx.AsyncClient(base_url=api_server.url, headers=admin, timeout=30) as c:
        await c.post("/api/v2/gpus/register", json={"gpuId": "n1", "supportedTaskTypes": [4]})
        created = await c.post("/api/v2/tasks", json={"taskType": 4, "maxRetries": 1})
        task_id = created.json()["data"]["taskId"]

        async def claim_one() -> dict[str, object]:
            got = (await c.post("/api/v2/gpus/n1/claim", params={"wait": 5})).json()["data"]
            assert len(got) == 1
            task: dict[str, object] = got[0]
            return task

        t = await claim_one()
        # QUEUED hands it back without counting a failure.
        r = await c.post(f"/api/v2/tasks/{task_id}/status",
                         json={"status": "QUEUED", "attempt": t["attempt"]})  # fmt: skip
        assert r.status_code == 200
        t = await claim_one()
        assert (t["attempt"], t["retryCount"]) == (2, 0)
        fail = {"status": "FAILED", "attempt": 2, "gpuId": "n1", "message": "CUDA OOM"}
        assert (await c.post(f"/api/v2/tasks/{task_id}/status", json=fail)).status_code == 200
        # The stale attempt 2 may not report again; attempt 3 runs after the retry.
        t = await claim_one()
        assert (t["attempt"], t["retryCount"]) == (3, 1)
        stale = {"status": "COMPLETED", "attempt": 2, "result": "late"}
        r = await c.post(f"/api/v2/tasks/{task_id}/status", json=stale)
        assert r.status_code == 409 and "stale attempt" in r.json()["message"]
        final = {"status": "FAILED", "attempt": 3, "message": "CUDA OOM again"}
        assert (await c.post(f"/api/v2/tasks/{task_id}/status", json=final)).status_code == 200
        detail = (await c.get(f"/api/v2/tasks/{task_id}")).json()["data"]
        assert (detail["status"], detail["errorMessage"], detail["retryCount"]) == (
            "FAILED", "CUDA OOM again", 1)  # fmt: skip
        gpu = (await c.get("/api/v2/gpus/n1")).json()["data"]
        assert gpu["taskFailureCount"] == 2 and gpu["currentTasks"] == 0


async def test_push_style_processing_report(api_server: ApiServer) -> None:
    admin = {"X-API-Key": api_server.admin_key}
    async with httpx.AsyncClient(base_url=api_server.url, headers=admin, timeout=30) as c:
        await c.post("/api/v2/gpus/register", json={"gpuId": "p1", "supportedTaskTypes": [5]})
        task_id = (await c.post("/api/v2/tasks", json={"taskType": 5})).json()["data"]["taskId"]
        start = {"status": "PROCESSING", "gpuId": "p1", "message": "started"}
        assert (await c.post(f"/api/v2/tasks/{task_id}/status", json=start)).status_code == 200
        # Its queue entry is skipped: nobody can claim it a second time.
        assert (await c.post("/api/v2/gpus/p1/claim", params={"wait": 0})).json()["data"] == []
        done = {"status": "COMPLETED", "gpuId": "p1", "result": {"ok": True}}
        assert (await c.post(f"/api/v2/tasks/{task_id}/status", json=done)).status_code == 200
        res = (await c.get(f"/api/v2/tasks/{task_id}/result")).json()["data"]
        assert res == {**res, "status": "COMPLETED", "result": {"ok": True}}
