-- A node's heartbeat: refresh lastHeartbeat, bring OFFLINE back to ACTIVE, renew its leases.
-- ARGV[3] gpuId, ARGV[4] lease ms. Returns the status, or false when not registered.
local gpu = ARGV[3]
local gkey = k_gpu(gpu)
local st = redis.call('HGET', gkey, 'status')
if not st then return false end
local now = now_ms()
if st == 'OFFLINE' then st = 'ACTIVE' end
redis.call('HSET', gkey, 'lastHeartbeat', now, 'status', st, 'failureCount', 0)
redis.call('ZADD', K_BEATS, now, gpu)
local deadline = now + tonumber(ARGV[4])
for _, id in ipairs(redis.call('SMEMBERS', k_running(gpu))) do
  redis.call('ZADD', K_LEASES, 'XX', deadline, id)
  redis.call('HSET', k_task(id), 'leaseDeadline', deadline)
end
return st
