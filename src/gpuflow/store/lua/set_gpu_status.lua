-- Operator action on a GPU: FAULTY (with reason) or ACTIVE (recover: counters reset).
-- ARGV[3] gpuId, ARGV[4] new status, ARGV[5] reason. Returns the old status or false.
local gkey = k_gpu(ARGV[3])
local old = redis.call('HGET', gkey, 'status')
if not old then return false end
redis.call('HSET', gkey, 'status', ARGV[4], 'faultReason', ARGV[5])
if ARGV[4] == 'ACTIVE' then
  local now = now_ms()
  redis.call('HSET', gkey, 'failureCount', 0, 'taskFailureCount', 0, 'lastHeartbeat', now)
  redis.call('ZADD', K_BEATS, now, ARGV[3])
end
return old
