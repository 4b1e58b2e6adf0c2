-- Leader loop: graded timeouts of running attempts.
-- ARGV[3] max per kind, ARGV[4] retry base ms, ARGV[5] cap ms, ARGV[6] jitter,
-- ARGV[7] retry a timed-out attempt 1|0.
-- Warning (timeout x fraction): an alert record and an event. Hard (timeout + grace, the
-- worker did not report by then): the attempt is fenced off and ends TIMEOUT, or goes back to
-- QUEUED while retries last; the GPU's next heartbeat tells its agent to stop the handler.
-- Returns {warnings raised, attempts timed out}.
local now = now_ms()
local limit = tonumber(ARGV[3])
local warned, timed_out = 0, 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_WARNINGS, '-inf', now, 'LIMIT', 0, limit)) do
  redis.call('ZREM', K_WARNINGS, id)
  local t = redis.call('HMGET', k_task(id), 'status', 'gpuId', 'timeout', 'startedAt')
  if t[1] == 'PROCESSING' then
    warned = warned + 1
    raise_alert('WARNING', 'Task timeout warning', 'task ' .. id .. ' on GPU ' .. t[2] ..
                ' has run ' .. (now - tonumber(t[4])) .. ' ms of its ' .. t[3] .. ' ms timeout',
                'timeout_manager')
    emit('timeout_warning', id, 'PROCESSING', {'gpuId', t[2]})
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_TIMEOUTS, '-inf', now, 'LIMIT', 0, limit)) do
  redis.call('ZREM', K_TIMEOUTS, id)
  local tkey = k_task(id)
  local t = redis.call('HMGET', tkey, 'status', 'gpuId', 'timeout', 'attempt')
  if t[1] == 'PROCESSING' then
    timed_out = timed_out + 1
    retry_or_end(id, tkey, 'TIMEOUT', 'hard timeout: attempt ' .. t[4] .. ' on GPU ' .. t[2] ..
                 ' ran past its ' .. t[3] .. ' ms timeout and grace', ARGV[7] == '1',
                 tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), now)
  end
end
return {warned, timed_out}
