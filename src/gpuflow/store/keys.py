"""The one place where Redis key names are built.

Every key lives under the namespace prefix (default ``gf:``):

==============================  =======  ==============================================
key                             type     meaning
==============================  =======  ==============================================
``task:{id}``                   hash     one task: the seed's TaskDO fields + internals
``seq:display``                 string   counter behind ``displayId``
``q:{type}:{tier}``             stream   the queue of one (task type, tier); group ``workers``
``qstat:{type}:{tier}``         hash     ``enq`` / ``deq`` counters of that queue
``tstat:{type}``                hash     running average of processing time (``avgMs``, ``n``)
``idx:all``                     zset     every task, score = displayId
``idx:status:{status}``         zset     tasks by status, score = displayId
``idx:type:{type}``             zset     tasks by type
``idx:st:{status}:{type}``      zset     tasks by status and type (bounded status+type lists)
``idx:gpu:{gpuId}``             zset     tasks that ran (or run) on a GPU
``idx:user:{userId}``           zset     tasks by owner
``leases``                      zset     PROCESSING task ids, score = lease deadline (ms)
``delayed``                     zset     QUEUED task ids waiting for a retry backoff
``gpu:{id}``                    hash     one GPU node (seed's GpuNodeInfo)
``gpu:{id}:running``            set      task ids running on that GPU
``gpu:{id}:waiting``            string   set while the GPU's agent waits for pushed tasks (PX TTL)
``gpu:{id}:inbox``              list     tasks started for the waiting GPU, as JSON rows
``q:{type}:{tier}:waiters``     zset     GPUs waiting on the queue: idle first (-ms), then busy (ms)
``gpus``                        zset     GPU ids, score = registration time
``gpus:beats``                  zset     GPU ids, score = last heartbeat (OFFLINE detection)
``queues``                      set      every queue stream (for reclaiming stale entries)
``tasktype:{t}``                hash     type defaults: name, timeout, maxRetries, exclusive
``tasktypes``                   zset     configured task types
``timeouts``                    zset     PROCESSING task ids, score = hard timeout deadline (ms)
``warnings``                    zset     PROCESSING task ids, score = timeout warning time (ms)
``finished``                    zset     finished task ids, score = completion time (retention)
``gpulock:{gpu}``               string   exclusive lock of a GPU: the owning task id, with a PX TTL
``gpulocks``                    zset     GPUs with a lock (stale-lock sweep)
``alert:{id}``                  hash     an alert (the seed's AlertInfo)
``alerts``                      zset     alert ids, score = timestamp; ``alerts:seq`` numbers them
``idem:{scope}:{key}``          string   Idempotency-Key → "taskId body-sha256", 24 h TTL
``leader``                      string   the leader's instance id, with a PX lease
``instances``                   zset     cluster instance ids, score = last heartbeat (ms)
``instance:{id}``               hash     one process: role, start time, version, host, pid
``apikey:{sha256}``             hash     an API key's role / user (the key itself is never stored)
``apikeys``                     set      the hashes of all API keys
``events``                      stream   capped log of every transition
``tmp:{uuid}``                  zset     scratch intersection of indexes (expires in 10 s)
==============================  =======  ==============================================
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "workers"
TIERS = ("VIP", "NORMAL")


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builder bound to one namespace prefix."""

    prefix: str = "gf:"

    def task(self, task_id: str) -> str:
        return f"{self.prefix}task:{task_id}"

    @property
    def task_prefix(self) -> str:
        return f"{self.prefix}task:"

    @property
    def display_seq(self) -> str:
        return f"{self.prefix}seq:display"

    def queue(self, task_type: int, tier: str) -> str:
        return f"{self.prefix}q:{task_type}:{tier}"

    def qstat(self, task_type: int, tier: str) -> str:
        return f"{self.prefix}qstat:{task_type}:{tier}"

    def tstat(self, task_type: int) -> str:
        return f"{self.prefix}tstat:{task_type}"

    @property
    def idx_all(self) -> str:
        return f"{self.prefix}idx:all"

    def idx_status(self, status: str) -> str:
        return f"{self.prefix}idx:status:{status}"

    def idx_status_type(self, status: str, task_type: int) -> str:
        return f"{self.prefix}idx:st:{status}:{task_type}"

    def idx_type(self, task_type: int) -> str:
        return f"{self.prefix}idx:type:{task_type}"

    def idx_gpu(self, gpu_id: str) -> str:
        return f"{self.prefix}idx:gpu:{gpu_id}"

    def idx_user(self, user_id: str) -> str:
        return f"{self.prefix}idx:user:{user_id}"

    @property
    def leases(self) -> str:
        return f"{self.prefix}leases"

    @property
    def delayed(self) -> str:
        return f"{self.prefix}delayed"

    def gpu(self, gpu_id: str) -> str:
        return f"{self.prefix}gpu:{gpu_id}"

    def gpu_inbox(self, gpu_id: str) -> str:
        return f"{self.prefix}gpu:{gpu_id}:inbox"

    def gpu_waiting(self, gpu_id: str) -> str:
        return f"{self.prefix}gpu:{gpu_id}:waiting"

    def gpu_running(self, gpu_id: str) -> str:
        return f"{self.prefix}gpu:{gpu_id}:running"

    @property
    def gpus(self) -> str:
        return f"{self.prefix}gpus"

    @property
    def gpu_beats(self) -> str:
        return f"{self.prefix}gpus:beats"

    @property
    def queues(self) -> str:
        return f"{self.prefix}queues"

    @property
    def leader(self) -> str:
        return f"{self.prefix}leader"

    @property
    def instances(self) -> str:
        return f"{self.prefix}instances"

    def instance(self, instance_id: str) -> str:
        return f"{self.prefix}instance:{instance_id}"

    def apikey(self, key_hash: str) -> str:
        return f"{self.prefix}apikey:{key_hash}"

    @property
    def apikeys(self) -> str:
        return f"{self.prefix}apikeys"

    def tasktype(self, task_type: int) -> str:
        return f"{self.prefix}tasktype:{task_type}"

    @property
    def tasktypes(self) -> str:
        return f"{self.prefix}tasktypes"

    def gpulock(self, gpu_id: str) -> str:
        return f"{self.prefix}gpulock:{gpu_id}"

    @property
    def gpulocks(self) -> str:
        return f"{self.prefix}gpulocks"

    def alert(self, alert_id: str) -> str:
        return f"{self.prefix}alert:{alert_id}"

    @property
    def alerts(self) -> str:
        return f"{self.prefix}alerts"

    @property
    def finished(self) -> str:
        return f"{self.prefix}finished"

    def idem(self, scope: str, key: str) -> str:
        return f"{self.prefix}idem:{scope}:{key}"

    def tmp(self, token: str) -> str:
        return f"{self.prefix}tmp:{token}"

    @property
    def events(self) -> str:
        return f"{self.prefix}events"
