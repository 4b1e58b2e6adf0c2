"""Settings, read once from ``GPUFLOW_*`` environment variables (and an optional ``.env``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every tunable of the system; the README's configuration table mirrors this class."""

    model_config = SettingsConfigDict(env_prefix="GPUFLOW_", env_file=".env", extra="ignore")

    redis_url: str | None = Field(
        default=None, description="External Redis URL; when unset, `up` starts an embedded one."
    )
    redis_server: str | None = Field(
        default=None, description="Path of a redis-server >= 6.2 binary for the embedded Redis."
    )
    data_dir: Path = Field(default=Path(".gpuflow"), description="Embedded Redis data and keys.")
    namespace: str = Field(default="gf:", description="Prefix of every Redis key.")
    admin_key: str | None = Field(default=None, description="Admin API key (else generated).")
    host: str = Field(default="127.0.0.1", description="API listen address (`up`, `api`).")
    port: int = Field(default=8000, description="API port.")
    vip_priority: int = Field(default=2, description="Tasks with priority >= this go to VIP.")
    max_payload_bytes: int = Field(default=1_048_576, description="Largest payload / result.")
    default_timeout_ms: int = Field(default=300_000, description="Task `timeout` when unset.")
    default_max_retries: int = Field(default=3, description="Task `maxRetries` when unset.")
    default_processing_ms: int = Field(
        default=60_000, description="Processing time assumed before a task type has samples."
    )
    retry_base_ms: int = Field(default=1_000, description="First retry backoff (doubles).")
    retry_max_ms: int = Field(default=60_000, description="Largest retry backoff.")
    gpu_fault_threshold: int = Field(
        default=5, description="Consecutive task failures that make a GPU FAULTY (0 = never)."
    )
    lease_ms: int = Field(
        default=60_000, description="Lease of a PROCESSING task, renewed by heartbeats."
    )
    gpu_offline_after_s: float = Field(
        default=30.0, description="Heartbeat silence after which a GPU becomes OFFLINE."
    )
    leader_lease_ms: int = Field(
        default=10_000, description="Leader lease; a new leader takes over within 2 of these."
    )
    maintenance_interval_s: float = Field(
        default=0.5, description="Period of the leader's loops (leases, retries, OFFLINE)."
    )
    reclaim_idle_ms: int = Field(
        default=15_000, description="Idle time before an unstarted delivered entry is reclaimed."
    )
    timeout_warning_fraction: float = Field(
        default=0.8, description="Share of a task's timeout at which a warning alert is raised."
    )
    timeout_grace_ms: int = Field(
        default=10_000, description="After the timeout (soft stop), time before the hard kill."
    )
    retry_on_timeout: bool = Field(
        default=True, description="Retry a timed-out attempt while retries last."
    )
    retention_s: int = Field(
        default=7 * 86_400, description="Finished tasks (and alerts) are deleted after this."
    )
    idempotency_ttl_s: int = Field(
        default=86_400, description="How long an Idempotency-Key returns the same task."
    )
    heartbeat_interval_s: float = Field(default=5.0, description="Worker heartbeat period.")
    claim_wait_max_s: float = Field(default=60.0, description="Longest claim long-poll.")
    gc_gen0_threshold: int = Field(
        default=10_000,
        ge=0,
        description="Allocations between young-generation GC passes in the api and worker "
        "processes (0: Python's default, 700).",
    )
    events_maxlen: int = Field(
        default=10_000,
        description="Length cap of the events stream, in entries (a batch call's like "
        "transitions share one).",
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
