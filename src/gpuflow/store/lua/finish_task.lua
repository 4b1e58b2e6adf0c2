-- Record the end of an attempt (fenced by attempt number and GPU).
-- ARGV[3] taskId, ARGV[4] attempt ('' = current), ARGV[5] gpuId ('' = any),
-- ARGV[6] outcome COMPLETED|FAILED|TIMEOUT, ARGV[7] result or error text,
-- ARGV[8] retryable 1|0, ARGV[9] retry backoff base ms (0 = requeue at once),
-- ARGV[10] GPU failure threshold (0 = off), ARGV[11] backoff cap ms, ARGV[12] jitter factor.
-- The backoff of retry n (n = retryCount before it) is min(cap, base * 2^n) * jitter.
-- Returns {'OK', newStatus} or {'NOTFOUND'} / {'CONFLICT', why}.
local id, attempt, gpu_arg, outcome = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local text, retryable, base = ARGV[7], ARGV[8] == '1', tonumber(ARGV[9])
local threshold, cap, jitter = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local tkey = k_task(id)
local t = redis.call('HMGET', tkey, 'status', 'attempt', 'gpuId', 'retryCount', 'maxRetries',
                     'startedAt', 'taskType')
if not t[1] then return {'NOTFOUND'} end
if t[1] ~= 'PROCESSING' then return {'CONFLICT', 'task is ' .. t[1] .. ', not PROCESSING'} end
if attempt ~= '' and attempt ~= t[2] then
  return {'CONFLICT', 'stale attempt ' .. attempt .. ' (current attempt is ' .. t[2] .. ')'}
end
local gpu = t[3]
if gpu_arg ~= '' and gpu_arg ~= gpu then
  return {'CONFLICT', 'task runs on GPU ' .. gpu .. ', not ' .. gpu_arg}
end
local now = now_ms()
clear_timers(id)
redis.call('SREM', k_running(gpu), id)
local gkey = k_gpu(gpu)
local has_gpu = redis.call('EXISTS', gkey) == 1
if outcome == 'COMPLETED' then
  set_status(tkey, id, 'PROCESSING', 'COMPLETED')
  redis.call('HSET', tkey, 'result', text, 'completedAt', now, 'updatedAt', now, 'progress', 100,
             'errorMessage', '', 'leaseDeadline', '')
  local took = now - tonumber(t[6])
  local sk = k_tstat(t[7])
  local avg = tonumber(redis.call('HGET', sk, 'avgMs'))
  if avg then avg = avg * 0.8 + took * 0.2 else avg = took end
  redis.call('HSET', sk, 'avgMs', math.floor(avg))
  redis.call('HINCRBY', sk, 'n', 1)
  if has_gpu then redis.call('HSET', gkey, 'taskFailureCount', 0) end
  emit('completed', id, 'COMPLETED', {'gpuId', gpu})
  return {'OK', 'COMPLETED'}
end
if has_gpu then
  local fails = redis.call('HINCRBY', gkey, 'taskFailureCount', 1)
  if threshold > 0 and fails >= threshold and redis.call('HGET', gkey, 'status') == 'ACTIVE' then
    redis.call('HSET', gkey, 'status', 'FAULTY',
               'faultReason', fails .. ' consecutive task failures')
    raise_alert('CRITICAL', 'GPU fault', 'GPU ' .. gpu .. ' is FAULTY after ' .. fails ..
                ' consecutive task failures (last: ' .. string.sub(text, 1, 200) .. ')',
                'gpu_monitor')
  end
end
return {'OK', retry_or_end(id, tkey, outcome, text, retryable, base, cap, jitter, now)}
