-- Start up to the GPU's free capacity of tasks, reading its streams in priority order.
-- ARGV[3] gpuId, ARGV[4] lease ms, ARGV[5] timeout grace ms, ARGV[6] timeout warning
-- fraction, ARGV[7] recover 1|0 (first re-read this consumer's own pending entries, left
-- behind by a crash between a blocking read and this script),
-- ARGV[8] n = number of pre-delivered entries, ARGV[9 .. 8+3n] (stream, entryId, taskId)
-- triples the caller already read with a blocking XREADGROUP, then the stream names to
-- read, highest priority first.
-- Returns {free capacity left, started task 1, ...}, each task a flat HGETALL array.
local gpu = ARGV[3]
local lease = tonumber(ARGV[4])
local grace, fraction = tonumber(ARGV[5]), tonumber(ARGV[6])
local recover = ARGV[7] == '1'
local npre = tonumber(ARGV[8])
local gkey = k_gpu(gpu)
local g = redis.call('HMGET', gkey, 'status', 'maxConcurrentTasks')
if not g[1] then return redis.error_reply('NOGPU gpu not registered') end
local now = now_ms()
local free = 0
if g[1] == 'ACTIVE' then free = tonumber(g[2]) - redis.call('SCARD', k_running(gpu)) end
local started = {}
-- A GPU locked by an exclusive task takes nothing else.
if redis.call('EXISTS', k_lock(gpu)) == 1 then free = 0 end

-- Take one delivered entry out of the stream; returns the task key when it is startable.
local function take(q, eid, id)
  redis.call('XACK', q, GROUP, eid)
  redis.call('XDEL', q, eid)
  local tkey = k_task(id)
  local t = redis.call('HMGET', tkey, 'status', 'streamId', 'taskType', 'tier')
  if t[3] then redis.call('HINCRBY', k_qstat(t[3], t[4]), 'deq', 1) end
  if t[1] ~= 'QUEUED' or t[2] ~= eid then return nil end
  return tkey
end

local function start(tkey, id)
  local ttype = redis.call('HGET', tkey, 'taskType')
  local exclusive = redis.call('HGET', P .. 'tasktype:' .. ttype, 'exclusive') == '1'
  if exclusive then
    if redis.call('SCARD', k_running(gpu)) > 0 then
      -- Needs the GPU alone: back to the queue; take nothing more so the GPU drains.
      enqueue(id, tkey)
      free = 0
      return
    end
    redis.call('SET', k_lock(gpu), id, 'PX', lease)
    redis.call('ZADD', K_LOCKS, now, gpu)
  end
  redis.call('HINCRBY', tkey, 'attempt', 1)
  set_status(tkey, id, 'QUEUED', 'PROCESSING')
  redis.call('HSET', tkey, 'gpuId', gpu, 'startedAt', now, 'updatedAt', now, 'progress', 0,
             'progressMessage', '', 'streamId', '')
  redis.call('ZADD', P .. 'idx:gpu:' .. gpu, redis.call('HGET', tkey, 'displayId'), id)
  note_gpu(tkey, gpu)
  arm_timers(id, tkey, now, lease, grace, fraction)
  redis.call('SADD', k_running(gpu), id)
  emit('started', id, 'PROCESSING', {'gpuId', gpu})
  table.insert(started, redis.call('HGETALL', tkey))
  free = free - 1
  if exclusive then free = 0 end
end

for i = 0, npre - 1 do
  local q, eid, id = ARGV[9 + 3 * i], ARGV[10 + 3 * i], ARGV[11 + 3 * i]
  local tkey = take(q, eid, id)
  if tkey then
    if free > 0 then start(tkey, id) else enqueue(id, tkey) end
  end
end

local first = 9 + 3 * npre
if recover then
  for i = first, #ARGV do
    local r = redis.call('XREADGROUP', 'GROUP', GROUP, gpu, 'COUNT', 100, 'STREAMS', ARGV[i], '0')
    if r then
      for _, e in ipairs(r[1][2]) do
        if e[2] then
          local tkey = take(ARGV[i], e[1], e[2][2])
          if tkey then
            if free > 0 then start(tkey, e[2][2]) else enqueue(e[2][2], tkey) end
          end
        else
          redis.call('XACK', ARGV[i], GROUP, e[1])
        end
      end
    end
  end
end
for i = first, #ARGV do
  local q = ARGV[i]
  local rounds = 0
  while free > 0 and rounds < 50 do
    rounds = rounds + 1
    local r = redis.call('XREADGROUP', 'GROUP', GROUP, gpu, 'COUNT', free, 'STREAMS', q, '>')
    if not r then break end
    local entries = r[1][2]
    if #entries == 0 then break end
    for _, e in ipairs(entries) do
      local tkey = take(q, e[1], e[2][2])
      if tkey then
        if free > 0 then start(tkey, e[2][2]) else enqueue(e[2][2], tkey) end
      end
    end
  end
end
table.insert(started, 1, free)
return started
