-- Cancel a task. ARGV[3] taskId, ARGV[4] reason.
-- QUEUED (or waiting for a retry) ends CANCELED at once; its stream entry is skipped later.
-- PROCESSING ends CANCELED too: the attempt is fenced off (its reports get 409) and the GPU's
-- next heartbeat tells the agent to stop it; the GPU keeps the slot until it has.
-- Returns {'OK', previous status} / {'NOTFOUND'} / {'CONFLICT', why}.
local id = ARGV[3]
local tkey = k_task(id)
local st = redis.call('HGET', tkey, 'status')
if not st then return {'NOTFOUND'} end
if st ~= 'QUEUED' and st ~= 'PROCESSING' then
  return {'CONFLICT', 'task is already ' .. st}
end
local now = now_ms()
redis.call('ZREM', K_DELAYED, id)
clear_timers(id)
set_status(tkey, id, st, 'CANCELED')
redis.call('HSET', tkey, 'completedAt', now, 'updatedAt', now, 'streamId', '',
           'errorMessage', ARGV[4])
emit('canceled', id, 'CANCELED', {'was', st})
return {'OK', st}
