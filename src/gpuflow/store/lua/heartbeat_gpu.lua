-- Nodes' heartbeats, several per call (an api process sends the heartbeats that arrive
-- together as one call): refresh lastHeartbeat, bring OFFLINE back to ACTIVE, renew leases.
-- ARGV[3] lease ms, ARGV[4] orphan grace ms, ARGV[5] retry base ms, ARGV[6] cap ms,
-- ARGV[7] k = number of heartbeats, then k groups: gpuId, jitter, n = number of running
-- tasks the agent lists (or -1 when it lists none: renew every task of the GPU), then n
-- (taskId, attempt) pairs.
-- With a list: listed tasks still PROCESSING here with that attempt are renewed; the GPU's
-- tasks the agent did not list and that do not wait in its inbox (push dispatch) are lost
-- (older than the grace: attempt failed, retried);
-- listed tasks that are no longer PROCESSING here with that attempt must be stopped.
-- Returns one reply per heartbeat, in order: {'OK', status, stop task ids...}, {'NOTFOUND'}
-- when the GPU is not registered, or {'ERROR', message} when a record is damaged (that
-- heartbeat stops where it failed; the others still apply). Each applies as if alone.
local lease_ms, grace = ARGV[3], tonumber(ARGV[4])
local base, cap = tonumber(ARGV[5]), tonumber(ARGV[6])
local k = tonumber(ARGV[7])
local now = now_ms()
local deadline = now + tonumber(lease_ms)

local function beat(gpu, jitter, n, at)
  local gkey = k_gpu(gpu)
  local st = redis.call('HGET', gkey, 'status')
  if not st then return {'NOTFOUND'} end
  if st == 'OFFLINE' then st = 'ACTIVE' end
  redis.call('HSET', gkey, 'lastHeartbeat', now, 'status', st, 'failureCount', 0)
  redis.call('ZADD', K_BEATS, now, gpu)
  local running = k_running(gpu)
  local reply = {'OK', st}
  -- Renew the GPU's exclusive lock while its owner runs here (and is listed, with a list).
  local function renew_lock(listed)
    local owner = redis.call('GET', k_lock(gpu))
    if not owner then return end
    local t = redis.call('HMGET', k_task(owner), 'status', 'gpuId')
    if t[1] == 'PROCESSING' and t[2] == gpu and (listed == nil or listed[owner]) then
      redis.call('PEXPIRE', k_lock(gpu), lease_ms)
    end
  end
  if n < 0 then
    renew_lock(nil)
    for _, id in ipairs(redis.call('SMEMBERS', running)) do
      local t = redis.call('HMGET', k_task(id), 'status', 'gpuId')
      if t[1] == 'PROCESSING' and t[2] == gpu then
        redis.call('ZADD', K_LEASES, 'XX', deadline, id)
      else
        redis.call('SREM', running, id)  -- canceled or moved on: the slot is free again
      end
    end
    return reply
  end
  local listed = {}
  for i = 0, n - 1 do
    local id, attempt = ARGV[at + 2 * i], ARGV[at + 1 + 2 * i]
    listed[id] = true
    local tkey = k_task(id)
    local t = redis.call('HMGET', tkey, 'status', 'gpuId', 'attempt')
    if t[1] == 'PROCESSING' and t[2] == gpu and t[3] == attempt then
      redis.call('ZADD', K_LEASES, 'XX', deadline, id)
    else
      table.insert(reply, id)
    end
  end
  renew_lock(listed)
  -- Tasks pushed to the GPU's inbox wait there for a free slot of its agent: not lost.
  local pushed = nil
  local function in_inbox(id)
    if pushed == nil then
      pushed = {}
      for _, raw in ipairs(redis.call('LRANGE', k_inbox(gpu), 0, -1)) do
        if raw ~= '' then pushed[cjson.decode(raw)[2]] = true end
      end
    end
    return pushed[id]
  end
  for _, id in ipairs(redis.call('SMEMBERS', running)) do
    if not listed[id] and not in_inbox(id) then
      local tkey = k_task(id)
      local t = redis.call('HMGET', tkey, 'status', 'startedAt', 'gpuId', 'attempt')
      if t[1] ~= 'PROCESSING' or t[3] ~= gpu then
        redis.call('SREM', running, id)
      elseif tonumber(t[2] or 0) < now - grace then
        redis.call('SREM', running, id)
        clear_timers(id)
        retry_or_end(id, tkey, 'FAILED', 'the worker of ' .. gpu .. ' lost attempt ' .. t[4] ..
                     ' (not among its running tasks)', true, base, cap, jitter, now)
      end
    end
  end
  return reply
end

local replies = {}
local at = 8
for i = 1, k do
  local gpu, jitter, n = ARGV[at], tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  local ok, reply = pcall(beat, gpu, jitter, n, at + 3)
  if ok then
    replies[i] = reply
  else
    replies[i] = {'ERROR', error_text(reply)}
  end
  at = at + 3 + 2 * math.max(n, 0)
end
return replies
