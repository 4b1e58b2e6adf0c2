-- A GPU's agent stops waiting (it is stopping): nothing is pushed to it any more, the tasks
-- already pushed that it did not take go back to their queues, and an empty row in its
-- inbox ends a blocking read still in progress (push dispatch: waiting_gpu in lib.lua).
-- ARGV[3] gpuId. Returns the number of tasks put back.
local gpu = ARGV[3]
redis.call('DEL', k_waitflag(gpu))
local now = now_ms()
local taken = take_inbox(gpu)
for _, t in ipairs(taken) do requeue(t[1][1], t[2], now, false) end
redis.call('RPUSH', k_inbox(gpu), '')
return #taken
