-- Start up to the GPU's free capacity of tasks, reading its streams in priority order.
-- ARGV[3] gpuId, ARGV[4] lease ms, ARGV[5] timeout grace ms, ARGV[6] timeout warning
-- fraction, ARGV[7] recover 1|0 (first re-read this consumer's own pending entries, left
-- behind by a crash between a blocking read and this script),
-- ARGV[8] reply 'full' | 'compact', ARGV[9] wait ms: when > 0 and the call reads every
-- stream empty with room left, the GPU registers as waiting for that long (push dispatch,
-- see waiting_gpu in lib.lua; 0: it does not), ARGV[10] n = number of pre-delivered entries,
-- ARGV[11 .. 10+3n] (stream, entryId, taskId) triples the caller already read with a
-- blocking XREADGROUP, then the stream names to read, highest priority first.
-- Tasks pushed to the GPU's inbox that its agent did not take (its blocking read ended
-- first, or it restarted) and that still run here are started tasks of this call.
-- Returns {free capacity left, waiting 1|0, started task 1, ...}, each task a flat HGETALL array
-- ('full', the TaskDO of the HTTP claim), or ('compact', what the agent runs a task with)
-- the values of taskId, taskType, attempt, gpuId, payload, priority, displayId, userId, app,
-- timeout, retryCount, maxRetries ('' for a missing one) in that order
-- (core/dispatch.py: COMPACT_FIELDS).
-- Per started task: one HMGET, one HSET, the event (and with 'full' the HGETALL of the
-- reply); stream acks and dequeue counters go once per read, the index, timer and
-- running-set writes once per key and call (write_later in lib.lua). Acknowledged entries stay in the
-- stream until the reclaim loop trims them (reclaim_pending.lua): an XDEL per entry cost
-- more than the rest of the claim's stream work.
local gpu = ARGV[3]
local lease = tonumber(ARGV[4])
local grace, fraction = tonumber(ARGV[5]), tonumber(ARGV[6])
local recover = ARGV[7] == '1'
local compact = ARGV[8] == 'compact'
local wait_ms = tonumber(ARGV[9])
local npre = tonumber(ARGV[10])
local gkey = k_gpu(gpu)
local running = k_running(gpu)
local g = redis.call('HMGET', gkey, 'status', 'maxConcurrentTasks')
if not g[1] then return redis.error_reply('NOGPU gpu not registered') end
local now = now_ms()
local free = 0
if g[1] == 'ACTIVE' then free = tonumber(g[2]) - redis.call('SCARD', running) end
local started = {}
write_later()
redis.call('DEL', k_waitflag(gpu))  -- not waiting while it claims
-- A GPU locked by an exclusive task takes nothing else.
if redis.call('EXISTS', k_lock(gpu)) == 1 then free = 0 end
local exclusive_of = {}  -- taskType -> exclusive (read once per call)
local dequeued = {}      -- qstat key -> entries taken out of its stream in this call

-- Acknowledge a read's entries in one call.
local function drop_entries(q, eids)
  if #eids > 0 then redis.call('XACK', q, GROUP, unpack(eids)) end
end

local function is_exclusive(ttype)
  local x = exclusive_of[ttype]
  if x == nil then
    x = redis.call('HGET', P .. 'tasktype:' .. ttype, 'exclusive') == '1'
    exclusive_of[ttype] = x
  end
  return x
end

local function start(id, tkey, t)
  local ttype = t[3]
  local exclusive = is_exclusive(ttype)
  if exclusive then
    if #started > 0 or redis.call('SCARD', running) > 0 then  -- started here: added later
      -- Needs the GPU alone: back to the queue; take nothing more so the GPU drains.
      enqueue(id, tkey)
      free = 0
      return
    end
    redis.call('SET', k_lock(gpu), id, 'PX', lease)
    redis.call('ZADD', K_LOCKS, now, gpu)
  end
  local row = start_on(gpu, id, tkey, t, now, lease, grace, fraction)
  if compact then
    table.insert(started, row)
  else
    table.insert(started, redis.call('HGETALL', tkey))
  end
  free = free - 1
  if exclusive then free = 0 end
end

-- One delivered entry (already acknowledged): start it, put it back, or skip
-- it when the task moved on (canceled, started by push, requeued under a newer entry).
local function take(eid, id)
  local tkey = k_task(id)
  local t = redis.call('HMGET', tkey, unpack(START_FIELDS))
  if t[3] then
    local sk = k_qstat(t[3], t[4])
    dequeued[sk] = (dequeued[sk] or 0) + 1
  end
  if t[1] ~= 'QUEUED' or t[2] ~= eid then return end
  if free > 0 then start(id, tkey, t) else enqueue(id, tkey) end
end

-- Take the entries of one XREADGROUP reply of stream q.
local function take_all(q, entries)
  local eids, ids = {}, {}
  for _, e in ipairs(entries) do
    table.insert(eids, e[1])
    if e[2] then ids[#eids] = e[2][2] end  -- nil: the entry was deleted meanwhile
  end
  drop_entries(q, eids)
  for i, eid in ipairs(eids) do
    if ids[i] then take(eid, ids[i]) end
  end
end

-- Everything after write_later runs under pcall so that the collected index and timer
-- writes of the tasks already started are flushed even when a damaged record stops
-- the call: a started task always has its lease entry (expire_leases reaps it).
-- The pre-delivered entries are taken in their stream's turn (a blocking read answers with
-- the next entry of every non-empty stream): a lower tier's entry never starts before the
-- higher tier's queue is empty or the GPU is full.
local pre = {}  -- stream -> {{entryId, taskId}, ...}
local function take_pre(q)
  for _, e in ipairs(pre[q] or {}) do
    drop_entries(q, {e[1]})
    take(e[1], e[2])
  end
  pre[q] = nil
end

local waiting = 0
local function run()
  -- What was pushed to the inbox and not taken: still this GPU's attempt, it runs here.
  for _, taken in ipairs(take_inbox(gpu)) do
    local row, tkey = taken[1], taken[2]
    for i, v in ipairs(row) do row[i] = tostring(v) end
    table.insert(started, compact and row or redis.call('HGETALL', tkey))
  end
  for i = 0, npre - 1 do
    local q = ARGV[11 + 3 * i]
    pre[q] = pre[q] or {}
    table.insert(pre[q], {ARGV[12 + 3 * i], ARGV[13 + 3 * i]})
  end

  local first = 11 + 3 * npre
  if recover then
    for i = first, #ARGV do
      local r = redis.call('XREADGROUP', 'GROUP', GROUP, gpu, 'COUNT', 100, 'STREAMS', ARGV[i], '0')
      if r then take_all(ARGV[i], r[1][2]) end
    end
  end
  local empty = true  -- every stream read to its end
  for i = first, #ARGV do
    local q = ARGV[i]
    take_pre(q)
    local rounds, drained = 0, false
    while free > 0 and rounds < 50 do
      rounds = rounds + 1
      local r = redis.call('XREADGROUP', 'GROUP', GROUP, gpu, 'COUNT', free, 'STREAMS', q, '>')
      if not r or #r[1][2] == 0 then drained = true; break end
      take_all(q, r[1][2])
    end
    empty = empty and drained
  end
  for q in pairs(pre) do take_pre(q) end  -- of a stream the node no longer reads
  for sk, count in pairs(dequeued) do redis.call('HINCRBY', sk, 'deq', count) end
  if wait_ms > 0 and empty and free > 0 then
    redis.call('SET', k_waitflag(gpu), wait_ms, 'PX', wait_ms)
    -- An idle GPU already waiting keeps its place (its agent's blocking read only ended).
    local running = tonumber(g[2]) - free
    for i = first, #ARGV do
      local wk = k_waiters(ARGV[i])
      local was = running == 0 and tonumber(redis.call('ZSCORE', wk, gpu))
      if not (was and was < 0) then redis.call('ZADD', wk, waiter_score(running, now), gpu) end
    end
    waiting = 1
  end
end
local ok, err = pcall(run)
flush_later()
if not ok then
  return redis.error_reply(error_text(err))
end
table.insert(started, 1, waiting)
table.insert(started, 1, free)
return started
