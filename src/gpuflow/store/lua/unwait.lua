-- A GPU's agent stops waiting (it is stopping): nothing is pushed to it any more, the tasks
-- already pushed that it did not take go back to their queues, and an empty row in its
-- inbox ends a blocking read still in progress (push dispatch: waiting_gpu in lib.lua).
-- ARGV[3] gpuId. Returns the number of tasks put back.
local gpu = ARGV[3]
redis.call('DEL', k_waitflag(gpu))
local rows = redis.call('LRANGE', k_inbox(gpu), 0, -1)
redis.call('DEL', k_inbox(gpu))
local now = now_ms()
local n = 0
for _, raw in ipairs(rows) do
  if raw ~= '' then
    local row = cjson.decode(raw)  -- {stay waiting, taskId, taskType, attempt, ...}
    local tkey = k_task(row[2])
    local t = redis.call('HMGET', tkey, 'status', 'gpuId', 'attempt')
    if t[1] == 'PROCESSING' and t[2] == gpu and tonumber(t[3]) == tonumber(row[4]) then
      requeue(row[2], tkey, now, false)
      n = n + 1
    end
  end
end
redis.call('RPUSH', k_inbox(gpu), '')
return n
