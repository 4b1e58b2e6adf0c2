-- Record the end of attempts (each fenced by attempt number and GPU), several per call: the
-- agent sends the reports of one event-loop tick together, so a busy node pays one round
-- trip (and one script start) for many tasks.
-- ARGV[3] retry backoff base ms (0 = requeue at once), ARGV[4] GPU failure threshold
-- (0 = off), ARGV[5] backoff cap ms, ARGV[6] n, then n groups of 7: taskId, attempt
-- ('' = current), gpuId ('' = any), outcome COMPLETED|FAILED|TIMEOUT, result or error text,
-- retryable 1|0, jitter factor.
-- The backoff of retry n (n = retryCount before it) is min(cap, base * 2^n) * jitter.
-- Returns one reply per task, in order: {'OK', newStatus} or {'NOTFOUND'} / {'CONFLICT', why},
-- or {'ERROR', message} when its task record is damaged (a field missing): that report
-- stops where it failed (Redis does not undo a script's writes), the others still apply.
-- Each report is applied exactly as if it came alone, in the order given.
local base, threshold, cap = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local n = tonumber(ARGV[6])
local now = now_ms()
local durations = {}  -- taskType -> run times (ms) of this call's completions, in order
local clean = {}      -- gpu -> its taskFailureCount is known to be 0 in this call
local freed = {}      -- gpu -> {queue key -> true}: GPUs that ended tasks of those queues

local function fail_count(gpu, gkey, text)
  clean[gpu] = nil
  if redis.call('EXISTS', gkey) == 0 then return end
  local fails = redis.call('HINCRBY', gkey, 'taskFailureCount', 1)
  if threshold > 0 and fails >= threshold and redis.call('HGET', gkey, 'status') == 'ACTIVE' then
    redis.call('HSET', gkey, 'status', 'FAULTY',
               'faultReason', fails .. ' consecutive task failures')
    raise_alert('CRITICAL', 'GPU fault', 'GPU ' .. gpu .. ' is FAULTY after ' .. fails ..
                ' consecutive task failures (last: ' .. string.sub(text, 1, 200) .. ')',
                'gpu_monitor')
  end
end

local function finish(id, attempt, gpu_arg, outcome, text, retryable, jitter)
  local tkey = k_task(id)
  local t = redis.call('HMGET', tkey, 'status', 'attempt', 'gpuId', 'startedAt', 'taskType',
                       'displayId', 'awaited', 'tier')
  if not t[1] then return {'NOTFOUND'} end
  if t[1] ~= 'PROCESSING' then return {'CONFLICT', 'task is ' .. t[1] .. ', not PROCESSING'} end
  if attempt ~= '' and attempt ~= t[2] then
    return {'CONFLICT', 'stale attempt ' .. attempt .. ' (current attempt is ' .. t[2] .. ')'}
  end
  local gpu = t[3]
  if gpu_arg ~= '' and gpu_arg ~= gpu then
    return {'CONFLICT', 'task runs on GPU ' .. gpu .. ', not ' .. gpu_arg}
  end
  clear_timers(id, gpu)
  srem(k_running(gpu), id)
  local qs = freed[gpu]
  if not qs then qs = {}; freed[gpu] = qs end
  if t[5] and t[8] then qs[k_queue(t[5], t[8])] = true end
  local gkey = k_gpu(gpu)
  if outcome == 'COMPLETED' then
    move_index(id, 'PROCESSING', 'COMPLETED', t[6], t[5], now)
    redis.call('HSET', tkey, 'status', 'COMPLETED', 'result', text, 'completedAt', now,
               'updatedAt', now, 'progress', 100, 'errorMessage', '')
    local runs = durations[t[5]]
    if not runs then runs = {}; durations[t[5]] = runs end
    table.insert(runs, now - tonumber(t[4]))
    if not clean[gpu] then  -- a write only when there is a count to reset
      local fails = redis.call('HGET', gkey, 'taskFailureCount')
      if fails and fails ~= '0' then redis.call('HSET', gkey, 'taskFailureCount', 0) end
      clean[gpu] = true
    end
    emit('completed', id, 'COMPLETED', {'gpuId', gpu}, t[7] == '1' and tkey)
    return {'OK', 'COMPLETED'}
  end
  fail_count(gpu, gkey, text)
  return {'OK', retry_or_end(id, tkey, outcome, text, retryable, base, cap, jitter, now)}
end

local replies = {}
write_later()  -- index and timer writes: one call per key at the end (lib.lua)
for i = 0, n - 1 do
  local a = 7 + 7 * i
  local ok, reply = pcall(finish, ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4],
                          ARGV[a + 5] == '1', tonumber(ARGV[a + 6]))
  if ok then
    replies[i + 1] = reply
  else
    replies[i + 1] = {'ERROR', error_text(reply)}
  end
end
flush_later()  -- a failed report's writes up to its failure stand, as they would alone
-- A GPU left with nothing running that waits for pushed tasks of those queues goes first
-- among the idle ones (waiter_score in lib.lua); XX: only where it is registered.
for gpu, qs in pairs(freed) do
  if redis.call('SCARD', k_running(gpu)) == 0 then
    for q in pairs(qs) do redis.call('ZADD', k_waiters(q), 'XX', waiter_score(0, now), gpu) end
  end
end
-- Each type's average run time: the same moving average as one report at a time.
for ttype, runs in pairs(durations) do
  local sk = k_tstat(ttype)
  local avg = tonumber(redis.call('HGET', sk, 'avgMs'))
  for _, took in ipairs(runs) do
    if avg then avg = math.floor(avg * 0.8 + took * 0.2) else avg = took end
  end
  redis.call('HSET', sk, 'avgMs', avg)
  redis.call('HINCRBY', sk, 'n', #runs)
end
return replies
