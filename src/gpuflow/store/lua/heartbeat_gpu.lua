-- A node's heartbeat: refresh lastHeartbeat, bring OFFLINE back to ACTIVE, renew leases.
-- ARGV[3] gpuId, ARGV[4] lease ms, ARGV[5] orphan grace ms, ARGV[6] retry base ms,
-- ARGV[7] cap ms, ARGV[8] jitter, ARGV[9] n = number of running tasks the agent lists, or -1
-- when it lists none (renew every task of the GPU), then n (taskId, attempt) pairs.
-- With a list: listed tasks still PROCESSING here with that attempt are renewed; the GPU's
-- tasks the agent did not list are lost (older than the grace: attempt failed, retried);
-- listed tasks that are no longer PROCESSING here with that attempt must be stopped.
-- Returns false when the GPU is not registered, else {status, stop task ids...}.
local gpu = ARGV[3]
local gkey = k_gpu(gpu)
local st = redis.call('HGET', gkey, 'status')
if not st then return false end
local now = now_ms()
if st == 'OFFLINE' then st = 'ACTIVE' end
redis.call('HSET', gkey, 'lastHeartbeat', now, 'status', st, 'failureCount', 0)
redis.call('ZADD', K_BEATS, now, gpu)
local deadline = now + tonumber(ARGV[4])
local running = k_running(gpu)
local n = tonumber(ARGV[9])
local reply = {st}
-- Renew the GPU's exclusive lock while its owner runs here (and is listed, with a list).
local function renew_lock(listed)
  local owner = redis.call('GET', k_lock(gpu))
  if not owner then return end
  local t = redis.call('HMGET', k_task(owner), 'status', 'gpuId')
  if t[1] == 'PROCESSING' and t[2] == gpu and (listed == nil or listed[owner]) then
    redis.call('PEXPIRE', k_lock(gpu), ARGV[4])
  end
end
if n < 0 then
  renew_lock(nil)
  for _, id in ipairs(redis.call('SMEMBERS', running)) do
    local t = redis.call('HMGET', k_task(id), 'status', 'gpuId')
    if t[1] == 'PROCESSING' and t[2] == gpu then
      redis.call('ZADD', K_LEASES, 'XX', deadline, id)
      redis.call('HSET', k_task(id), 'leaseDeadline', deadline)
    else
      redis.call('SREM', running, id)  -- canceled or moved on: the slot is free again
    end
  end
  return reply
end
local listed = {}
for i = 0, n - 1 do
  local id, attempt = ARGV[10 + 2 * i], ARGV[11 + 2 * i]
  listed[id] = true
  local tkey = k_task(id)
  local t = redis.call('HMGET', tkey, 'status', 'gpuId', 'attempt')
  if t[1] == 'PROCESSING' and t[2] == gpu and t[3] == attempt then
    redis.call('ZADD', K_LEASES, 'XX', deadline, id)
    redis.call('HSET', tkey, 'leaseDeadline', deadline)
  else
    table.insert(reply, id)
  end
end
renew_lock(listed)
local grace = tonumber(ARGV[5])
for _, id in ipairs(redis.call('SMEMBERS', running)) do
  if not listed[id] then
    local tkey = k_task(id)
    local t = redis.call('HMGET', tkey, 'status', 'startedAt', 'gpuId', 'attempt')
    if t[1] ~= 'PROCESSING' or t[3] ~= gpu then
      redis.call('SREM', running, id)
    elseif tonumber(t[2] or 0) < now - grace then
      redis.call('SREM', running, id)
      clear_timers(id)
      retry_or_end(id, tkey, 'FAILED', 'the worker of ' .. gpu .. ' lost attempt ' .. t[4] ..
                   ' (not among its running tasks)', true, tonumber(ARGV[6]),
                   tonumber(ARGV[7]), tonumber(ARGV[8]), now)
    end
  end
end
return reply
