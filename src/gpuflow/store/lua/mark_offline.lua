-- Leader loop: GPUs silent since before ARGV[3] (ms) become OFFLINE; their running tasks go
-- back to the queue (retryCount + 1, as for an expired lease). ARGV[4] max GPUs,
-- ARGV[5] retry base ms, ARGV[6] cap ms, ARGV[7] jitter. Returns the GPU ids marked.
local now = now_ms()
local silent = redis.call('ZRANGEBYSCORE', K_BEATS, '-inf', '(' .. ARGV[3], 'LIMIT', 0,
                          tonumber(ARGV[4]))
local marked = {}
for _, gpu in ipairs(silent) do
  local gkey = k_gpu(gpu)
  local st = redis.call('HGET', gkey, 'status')
  if not st then
    redis.call('ZREM', K_BEATS, gpu)
  elseif st ~= 'OFFLINE' then
    if st == 'ACTIVE' then redis.call('HSET', gkey, 'status', 'OFFLINE') end
    redis.call('HINCRBY', gkey, 'failureCount', 1)
    for _, id in ipairs(redis.call('SMEMBERS', k_running(gpu))) do
      redis.call('SREM', k_running(gpu), id)
      local tkey = k_task(id)
      if redis.call('HGET', tkey, 'status') == 'PROCESSING' then
        clear_timers(id)
        retry_or_end(id, tkey, 'FAILED', 'GPU ' .. gpu .. ' went OFFLINE (missed heartbeats)',
                     true, tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), now)
      end
    end
    -- Looked at once per silence: it returns to the index with its next heartbeat.
    redis.call('ZREM', K_BEATS, gpu)
    emit('gpu_offline', '', st, {'gpuId', gpu})
    raise_alert('WARNING', 'GPU offline', 'GPU ' .. gpu .. ' missed its heartbeats',
                'gpu_monitor')
    table.insert(marked, gpu)
  else
    redis.call('ZREM', K_BEATS, gpu)
  end
end
return marked
