-- Queue the retries whose backoff has passed. ARGV[3] max number to move. Returns how many.
local due = redis.call('ZRANGEBYSCORE', K_DELAYED, '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do
  redis.call('ZREM', K_DELAYED, id)
  local tkey = k_task(id)
  if redis.call('HGET', tkey, 'status') == 'QUEUED' then enqueue(id, tkey) end
end
return #due
