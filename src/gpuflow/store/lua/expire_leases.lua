-- Leader loop: end the attempts whose lease ran out (worker or executor died, network cut).
-- ARGV[3] max number to handle, ARGV[4] retry base ms, ARGV[5] cap ms, ARGV[6] jitter.
-- Each goes back to QUEUED with retryCount + 1 (after the retry backoff) or ends FAILED when
-- its retries are used up. Returns the ids handled.
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do
  clear_timers(id)
  local tkey = k_task(id)
  local t = redis.call('HMGET', tkey, 'status', 'gpuId', 'attempt')
  if t[1] == 'PROCESSING' then
    if t[2] and t[2] ~= '' then redis.call('SREM', k_running(t[2]), id) end
    retry_or_end(id, tkey, 'FAILED', 'lease expired: attempt ' .. t[3] .. ' on ' ..
                 (t[2] or '?') .. ' stopped reporting', true,
                 tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), now)
  end
end
return due
