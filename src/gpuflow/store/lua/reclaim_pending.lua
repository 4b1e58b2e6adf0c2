-- Leader loop: stream entries delivered to a GPU's consumer but never started (the reader
-- died between its blocking read and the claim script) are taken back after ARGV[4] ms idle.
-- ARGV[3] stream name, ARGV[5] max entries. A still-valid task gets a fresh entry at the
-- tail of its queue; stale entries are dropped. Then the stream is trimmed below its oldest
-- entry still pending (or its group's last delivered one, when none is): every entry below
-- that was delivered and acknowledged (the claim script leaves them there). Returns the
-- number of entries reclaimed.
local q = ARGV[3]
if redis.call('EXISTS', q) == 0 then  -- deleted by hand: forgotten until a task needs it again
  redis.call('SREM', K_QUEUES, q)
  return 0
end
local r = redis.call('XAUTOCLAIM', q, GROUP, 'gf-reclaimer', ARGV[4], '0-0', 'COUNT', ARGV[5])
local n = 0
for _, e in ipairs(r[2]) do
  n = n + 1
  redis.call('XACK', q, GROUP, e[1])
  redis.call('XDEL', q, e[1])
  if e[2] then
    local id = e[2][2]
    local tkey = k_task(id)
    local t = redis.call('HMGET', tkey, 'status', 'streamId', 'taskType', 'tier')
    if t[3] then redis.call('HINCRBY', k_qstat(t[3], t[4]), 'deq', 1) end
    if t[1] == 'QUEUED' and t[2] == e[1] then
      enqueue(id, tkey)
      emit('reclaimed', id, 'QUEUED')
    end
  end
end

local floor
local pending = redis.call('XPENDING', q, GROUP)
if tonumber(pending[1]) > 0 then
  floor = pending[2]
else
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', q)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == GROUP then floor = info['last-delivered-id'] end
  end
end
if floor then redis.call('XTRIM', q, 'MINID', floor) end
return n
