-- Push-style start: a node reports PROCESSING for a QUEUED task it was handed directly.
-- ARGV[3] taskId, ARGV[4] gpuId, ARGV[5] lease ms, ARGV[6] message, ARGV[7] timeout grace
-- ms, ARGV[8] timeout warning fraction.
-- Its stream entry stays behind and is skipped by claim (streamId is cleared).
-- Returns {'OK', attempt} or {'NOTFOUND'} / {'NOGPU'} / {'CONFLICT', why}.
local id, gpu = ARGV[3], ARGV[4]
local tkey = k_task(id)
local st = redis.call('HGET', tkey, 'status')
if not st then return {'NOTFOUND'} end
if redis.call('EXISTS', k_gpu(gpu)) == 0 then return {'NOGPU'} end
if st == 'PROCESSING' and redis.call('HGET', tkey, 'gpuId') == gpu then
  return {'OK', redis.call('HGET', tkey, 'attempt')}
end
if st ~= 'QUEUED' then return {'CONFLICT', 'task is ' .. st .. ', not QUEUED'} end
local now = now_ms()
local attempt = redis.call('HINCRBY', tkey, 'attempt', 1)
redis.call('ZREM', K_DELAYED, id)
set_status(tkey, id, 'QUEUED', 'PROCESSING')
redis.call('HSET', tkey, 'gpuId', gpu, 'startedAt', now, 'updatedAt', now, 'progress', 0,
           'progressMessage', ARGV[6], 'streamId', '')
redis.call('ZADD', P .. 'idx:gpu:' .. gpu, redis.call('HGET', tkey, 'displayId'), id)
note_gpu(tkey, gpu)
arm_timers(id, tkey, now, tonumber(ARGV[5]), tonumber(ARGV[7]), tonumber(ARGV[8]))
redis.call('SADD', k_running(gpu), id)
emit('started', id, 'PROCESSING', {'gpuId', gpu})
return {'OK', tostring(attempt)}
