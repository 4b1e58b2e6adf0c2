"""Alert records (the seed's AlertInfo), raised by the Lua transitions and the leader loops."""

from __future__ import annotations

import time
from typing import Any

from gpuflow.core.errors import Conflict, NotFound
from gpuflow.store import Store

LEVELS = ("CRITICAL", "WARNING", "INFO")
STATUSES = ("ACTIVE", "ACKNOWLEDGED")


def alert_view(h: dict[str, str]) -> dict[str, Any]:
    return {
        "id": h["id"],
        "title": h["title"],
        "message": h["message"],
        "level": h["level"],
        "status": h["status"],
        "source": h["source"],
        "timestamp": int(h["timestamp"]),
        "acknowledgedAt": int(h["acknowledgedAt"]) if h.get("acknowledgedAt") else None,
        "acknowledgedBy": h.get("acknowledgedBy") or None,
    }


class Alerts:
    """Newest first; filters are applied over the most recent ``SCAN_LIMIT`` alerts."""

    SCAN_LIMIT = 10_000

    def __init__(self, store: Store) -> None:
        self.store = store

    async def _all(self) -> list[dict[str, Any]]:
        k = self.store.keys
        ids = await self.store.redis.zrevrange(k.alerts, 0, self.SCAN_LIMIT - 1)
        async with self.store.redis.pipeline(transaction=False) as p:
            for alert_id in ids:
                p.hgetall(k.alert(alert_id))
            hashes = await p.execute()
        return [alert_view(h) for h in hashes if h]

    async def list(
        self, level: str | None = None, status: str | None = None, page: int = 1, size: int = 20
    ) -> tuple[list[dict[str, Any]], int]:
        rows = [
            a
            for a in await self._all()
            if (level is None or a["level"] == level) and (status is None or a["status"] == status)
        ]
        return rows[(page - 1) * size : page * size], len(rows)

    async def acknowledge(self, alert_id: str, by: str) -> None:
        key = self.store.keys.alert(alert_id)
        status = await self.store.redis.hget(key, "status")
        if status is None:
            raise NotFound(f"alert {alert_id} not found")
        if status == "ACKNOWLEDGED":
            raise Conflict(f"alert {alert_id} is already acknowledged")
        now = int(time.time() * 1000)
        await self.store.redis.hset(
            key, mapping={"status": "ACKNOWLEDGED", "acknowledgedAt": now, "acknowledgedBy": by}
        )

    async def stats(self) -> dict[str, int]:
        rows = await self._all()
        return {
            "total_alerts": len(rows),
            "critical_alerts": sum(a["level"] == "CRITICAL" for a in rows),
            "warning_alerts": sum(a["level"] == "WARNING" for a in rows),
            "info_alerts": sum(a["level"] == "INFO" for a in rows),
            "acknowledged_alerts": sum(a["status"] == "ACKNOWLEDGED" for a in rows),
            "active_alerts": sum(a["status"] == "ACTIVE" for a in rows),
        }
