-- Unregister a GPU; its running tasks go back to their queues.
-- ARGV[3] gpuId. Returns the number of requeued tasks, or false when not registered.
local gpu = ARGV[3]
local gkey = k_gpu(gpu)
if redis.call('EXISTS', gkey) == 0 then return false end
local now = now_ms()
local ids = redis.call('SMEMBERS', k_running(gpu))
for _, id in ipairs(ids) do
  local tkey = k_task(id)
  if redis.call('HGET', tkey, 'status') == 'PROCESSING' then requeue(id, tkey, now, false) end
end
redis.call('DEL', gkey, k_running(gpu), k_waitflag(gpu), k_inbox(gpu))
redis.call('ZREM', P .. 'gpus', gpu)
redis.call('ZREM', K_BEATS, gpu)
return #ids
