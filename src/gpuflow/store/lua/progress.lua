-- Record progress of the current attempt and renew its lease.
-- ARGV[3] taskId, ARGV[4] attempt ('' = current), ARGV[5] gpuId ('' = any),
-- ARGV[6] percent, ARGV[7] message, ARGV[8] lease ms.
-- Returns {'OK'} or {'NOTFOUND'} / {'CONFLICT', why}.
local id, attempt, gpu_arg = ARGV[3], ARGV[4], ARGV[5]
local tkey = k_task(id)
local t = redis.call('HMGET', tkey, 'status', 'attempt', 'gpuId')
if not t[1] then return {'NOTFOUND'} end
if t[1] ~= 'PROCESSING' then return {'CONFLICT', 'task is ' .. t[1] .. ', not PROCESSING'} end
if attempt ~= '' and attempt ~= t[2] then
  return {'CONFLICT', 'stale attempt ' .. attempt .. ' (current attempt is ' .. t[2] .. ')'}
end
if gpu_arg ~= '' and gpu_arg ~= t[3] then
  return {'CONFLICT', 'task runs on GPU ' .. t[3] .. ', not ' .. gpu_arg}
end
local now = now_ms()
local deadline = now + tonumber(ARGV[8])
redis.call('HSET', tkey, 'progress', ARGV[6], 'progressMessage', ARGV[7], 'updatedAt', now)
redis.call('ZADD', K_LEASES, 'XX', deadline, id)
emit('progress', id, 'PROCESSING', {'progress', ARGV[6]})
return {'OK'}
