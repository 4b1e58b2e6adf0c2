-- Leader loop: retention. Tasks finished before ARGV[3] (ms) are deleted with their index
-- entries; alerts older than that too. ARGV[4] max per call. Returns {tasks, alerts} purged.
local cutoff, limit = ARGV[3], tonumber(ARGV[4])
local ids = redis.call('ZRANGEBYSCORE', K_FINISHED, '-inf', cutoff, 'LIMIT', 0, limit)
for _, id in ipairs(ids) do
  redis.call('ZREM', K_FINISHED, id)
  local tkey = k_task(id)
  local t = redis.call('HMGET', tkey, 'status', 'taskType', 'userId', 'ranOn')
  if t[1] then
    redis.call('ZREM', P .. 'idx:all', id)
    redis.call('ZREM', k_status(t[1]), id)
    redis.call('ZREM', k_status_type(t[1], t[2]), id)
    redis.call('ZREM', P .. 'idx:type:' .. t[2], id)
    if t[3] and t[3] ~= '' then redis.call('ZREM', P .. 'idx:user:' .. t[3], id) end
    for gpu in string.gmatch(t[4] or '', '[^,]+') do
      redis.call('ZREM', P .. 'idx:gpu:' .. gpu, id)
    end
    redis.call('DEL', tkey)
  end
end
local alerts = redis.call('ZRANGEBYSCORE', P .. 'alerts', '-inf', cutoff, 'LIMIT', 0, limit)
for _, aid in ipairs(alerts) do
  redis.call('ZREM', P .. 'alerts', aid)
  redis.call('DEL', P .. 'alert:' .. aid)
end
return {#ids, #alerts}
