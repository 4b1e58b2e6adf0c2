-- Hand a PROCESSING task back to its queue without counting a failure.
-- ARGV[3] taskId, ARGV[4] attempt ('' = current). Returns {'OK'} / {'NOTFOUND'} / {'CONFLICT', why}.
local id, attempt = ARGV[3], ARGV[4]
local tkey = k_task(id)
local t = redis.call('HMGET', tkey, 'status', 'attempt')
if not t[1] then return {'NOTFOUND'} end
if t[1] ~= 'PROCESSING' then return {'CONFLICT', 'task is ' .. t[1] .. ', not PROCESSING'} end
if attempt ~= '' and attempt ~= t[2] then return {'CONFLICT', 'stale attempt ' .. attempt} end
requeue(id, tkey, now_ms(), false)
return {'OK'}
