"""API keys: stored hashed (sha256) in Redis, each with a role and an owning user."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from gpuflow.core.errors import InvalidInput
from gpuflow.store import Store


class Role(StrEnum):
    ADMIN = "admin"
    CLIENT = "client"
    WORKER = "worker"
    VIEWER = "viewer"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a role and, for clients, the user whose tasks they own."""

    role: Role
    user_id: str | None = None
    key_id: str = ""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """Create and look up keys; lookups are cached for ``CACHE_TTL_S`` seconds."""

    CACHE_TTL_S = 5.0

    def __init__(self, store: Store, admin_key: str | None) -> None:
        self.store = store
        self._admin_hash = hash_key(admin_key) if admin_key else None
        self._cache: dict[str, tuple[float, Principal | None]] = {}

    async def create(
        self, role: Role, user_id: str | None = None, name: str | None = None
    ) -> dict[str, Any]:
        if role is Role.CLIENT and not user_id:
            raise InvalidInput("a client key needs a userId: it sees only that user's tasks")
        key = f"gf_{role.value}_{secrets.token_urlsafe(24)}"
        digest = hash_key(key)
        record = {
            "keyId": digest[:12],
            "role": role.value,
            "userId": user_id or "",
            "name": name or "",
            "createdAt": int(time.time() * 1000),
        }
        async with self.store.redis.pipeline(transaction=True) as p:
            p.hset(self.store.keys.apikey(digest), mapping=record)
            p.sadd(self.store.keys.apikeys, digest)
            await p.execute()
        return {**record, "userId": user_id, "name": name, "key": key}

    async def all(self) -> list[dict[str, Any]]:
        digests = await self.store.redis.smembers(self.store.keys.apikeys)
        async with self.store.redis.pipeline(transaction=False) as p:
            for d in sorted(digests):
                p.hgetall(self.store.keys.apikey(d))
            records = await p.execute()
        return [
            {**r, "createdAt": int(r["createdAt"]), "userId": r["userId"] or None,
             "name": r["name"] or None}
            for r in records
            if r
        ]  # fmt: skip

    async def lookup(self, key: str) -> Principal | None:
        digest = hash_key(key)
        if self._admin_hash and hmac.compare_digest(digest, self._admin_hash):
            return Principal(Role.ADMIN, None, "admin")
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached and now - cached[0] < self.CACHE_TTL_S:
            return cached[1]
        h = await self.store.redis.hgetall(self.store.keys.apikey(digest))
        principal = Principal(Role(h["role"]), h.get("userId") or None, h["keyId"]) if h else None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now, principal)
        return principal
