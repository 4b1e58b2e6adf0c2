-- Register (or re-register) a GPU node and make sure its queues have the consumer group.
-- ARGV[3] gpuId, ARGV[4] number of field/value pairs n, ARGV[5 .. 4+2n] pairs, then queue names.
-- A FAULTY node stays FAULTY (recover it explicitly); any other becomes ACTIVE.
-- Returns the resulting status.
local gpu = ARGV[3]
local n = tonumber(ARGV[4])
local gkey = k_gpu(gpu)
local now = now_ms()
local old = redis.call('HGET', gkey, 'status')
local args = {'HSET', gkey}
for i = 5, 4 + 2 * n do table.insert(args, ARGV[i]) end
redis.call(unpack(args))
local status = 'ACTIVE'
if old == 'FAULTY' then status = 'FAULTY' end
redis.call('HSET', gkey, 'gpuId', gpu, 'status', status, 'lastHeartbeat', now, 'failureCount', 0)
if not old then
  redis.call('HSET', gkey, 'taskFailureCount', 0, 'registeredAt', now)
end
redis.call('ZADD', P .. 'gpus', 'NX', now, gpu)
redis.call('ZADD', K_BEATS, now, gpu)
for i = 5 + 2 * n, #ARGV do ensure_group(ARGV[i]) end
return status
