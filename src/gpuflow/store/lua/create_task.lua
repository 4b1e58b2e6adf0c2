-- Create a task and queue it.
-- ARGV[3] idempotency key name ('' = none), ARGV[4] body hash, ARGV[5] its TTL (s),
-- ARGV[6] capacity serving (type, tier), ARGV[7] processing ms assumed while the type has
-- no measured average (tstat avgMs),
-- ARGV[8] lease ms, ARGV[9] timeout grace ms, ARGV[10] timeout warning fraction (for a
-- task started at once on a waiting GPU: start_on in lib.lua),
-- ARGV[11] task id, ARGV[12..] field/value pairs of the task hash (taskType, tier included;
-- empty optional fields are left out: a missing field reads as null).
-- A GPU waiting on the task's queue (waiting_gpu in lib.lua) gets it started and pushed to
-- its inbox instead of the queue (not for an exclusive type: those need the claim's
-- checks): {stay waiting 1|0, compact row...} as JSON.
-- Writes estimatedWaitTime = ceil(ceil(ahead / capacity) * avg_s + avg_s), -1 with no capacity
-- (the formula of core/estimate.py), ahead = tasks before it in its queue + queued VIP tasks
-- of its type for a NORMAL task (0 for a task started at once).
-- Returns {'OK', displayId, estimatedWaitTime, status},
-- {'DUP', taskId} for a repeat of the same key and body, {'CONFLICT', why} for another body.
local idem, body_hash = ARGV[3], ARGV[4]
if idem ~= '' then
  local seen = redis.call('GET', idem)
  if seen then
    local sep = string.find(seen, ' ', 1, true)
    if string.sub(seen, sep + 1) == body_hash then return {'DUP', string.sub(seen, 1, sep - 1)} end
    return {'CONFLICT', 'Idempotency-Key was used with a different request body'}
  end
end
local lease, grace, fraction = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local id = ARGV[11]
local tkey = k_task(id)
if redis.call('EXISTS', tkey) == 1 then
  -- The same call resent by the client after a dropped connection (the id is per request).
  local t = redis.call('HMGET', tkey, 'displayId', 'estimatedWaitTime', 'status')
  return {'OK', tonumber(t[1]), tonumber(t[2] or -1), t[3]}
end
local display = redis.call('INCR', P .. 'seq:display')
local now = now_ms()
local fields = {'HSET', tkey, 'taskId', id, 'displayId', display, 'createdAt', now,
                'retryCount', 0, 'progress', 0}
local f = {}  -- the task's own fields, as stored
for i = 12, #ARGV, 2 do
  fields[#fields + 1] = ARGV[i]; fields[#fields + 1] = ARGV[i + 1]
  f[ARGV[i]] = ARGV[i + 1]
end
local ttype, tier = f.taskType, f.tier
local q = k_queue(ttype, tier)
local gpu, room, ttl = nil, 0, nil
if redis.call('HGET', P .. 'tasktype:' .. ttype, 'exclusive') ~= '1' then
  gpu, room, ttl = waiting_gpu(q)
end
local avg_ms = redis.call('HGET', k_tstat(ttype), 'avgMs') or ARGV[7]
local capacity, avg_s = tonumber(ARGV[6]), tonumber(avg_ms) / 1000
local function estimate(ahead)
  if capacity <= 0 then return -1 end
  return math.ceil(math.ceil(math.max(ahead, 0) / capacity) * avg_s + avg_s)
end
if idem ~= '' then fields[#fields + 1] = 'idemKey'; fields[#fields + 1] = idem end
redis.call('ZADD', P .. 'idx:all', display, id)
redis.call('ZADD', P .. 'idx:type:' .. ttype, display, id)
if f.userId then redis.call('ZADD', P .. 'idx:user:' .. f.userId, display, id) end
emit('created', id, 'QUEUED', {'taskType', ttype}, 'new')
local status, wait = 'QUEUED', 0
if gpu then
  -- Started at once: never in the queue (its qstat counters and QUEUED indexes skip it);
  -- the record is written once, with the start's fields (start_on).
  wait = estimate(0)
  fields[#fields + 1] = 'estimatedWaitTime'; fields[#fields + 1] = wait
  local t = {'QUEUED', false, ttype, tier, display, false, f.timeout, 0, f.payload, f.priority,
             f.userId, f.app, 0, f.maxRetries}  -- START_FIELDS
  local row = start_on(gpu, id, tkey, t, now, lease, grace, fraction, fields)
  status = 'PROCESSING'
  local stay = 0
  if room > 1 then  -- room for more: it stays waiting, now as a busy GPU (waiter_score)
    stay = 1
    redis.call('PEXPIRE', k_waitflag(gpu), ttl)
    redis.call('ZADD', k_waiters(q), waiter_score(1, now), gpu)
  else
    redis.call('DEL', k_waitflag(gpu))
  end
  table.insert(row, 1, stay)
  redis.call('RPUSH', k_inbox(gpu), cjson.encode(row))
else
  for _, v in ipairs({'status', 'QUEUED', 'updatedAt', now, 'attempt', 0}) do
    fields[#fields + 1] = v
  end
  redis.call(unpack(fields))
  redis.call('ZADD', k_status('QUEUED'), display, id)
  redis.call('ZADD', k_status_type('QUEUED', ttype), display, id)
  enqueue(id, tkey)
  local ahead = tonumber(redis.call('HGET', tkey, 'queueSeq')) - 1 -
                tonumber(redis.call('HGET', k_qstat(ttype, tier), 'deq') or '0')
  if tier ~= 'VIP' then
    local v = redis.call('HMGET', k_qstat(ttype, 'VIP'), 'enq', 'deq')
    ahead = ahead + math.max(tonumber(v[1] or 0) - tonumber(v[2] or 0), 0)
  end
  wait = estimate(ahead)
  redis.call('HSET', tkey, 'estimatedWaitTime', wait)
end
if idem ~= '' then redis.call('SET', idem, id .. ' ' .. body_hash, 'EX', ARGV[5]) end
return {'OK', display, wait, status}
