-- Shared prelude of every gpuflow script (prepended by scripts.py).
-- ARGV[1] is the key prefix, ARGV[2] the events stream MAXLEN; script-specific
-- arguments start at ARGV[3]. Key names mirror gpuflow/store/keys.py exactly.
local P = ARGV[1]
local EVENTS_MAXLEN = ARGV[2]

local function k_task(id) return P .. 'task:' .. id end
local function k_queue(t, tier) return P .. 'q:' .. t .. ':' .. tier end
local function k_qstat(t, tier) return P .. 'qstat:' .. t .. ':' .. tier end
local function k_tstat(t) return P .. 'tstat:' .. t end
local function k_status(s) return P .. 'idx:status:' .. s end
local function k_status_type(s, t) return P .. 'idx:st:' .. s .. ':' .. t end
local function k_gpu(g) return P .. 'gpu:' .. g end
local function k_running(g) return P .. 'gpu:' .. g .. ':running' end
local K_LEASES = P .. 'leases'
local K_DELAYED = P .. 'delayed'
local K_EVENTS = P .. 'events'
local K_BEATS = P .. 'gpus:beats'
local K_TIMEOUTS = P .. 'timeouts'
local K_WARNINGS = P .. 'warnings'
local K_FINISHED = P .. 'finished'
local K_LOCKS = P .. 'gpulocks'
local function k_lock(g) return P .. 'gpulock:' .. g end
-- Push dispatch (see waiting_gpu below): the GPUs waiting for a queue's next task, a GPU's
-- waiting flag, and the list its agent blocks on for the tasks started for it.
local function k_waiters(q) return q .. ':waiters' end
local function k_waitflag(g) return P .. 'gpu:' .. g .. ':waiting' end
local function k_inbox(g) return P .. 'gpu:' .. g .. ':inbox' end
local TERMINAL = {COMPLETED = true, FAILED = true, TIMEOUT = true, CANCELED = true}
local K_QUEUES = P .. 'queues'
local GROUP = 'workers'

-- Sorted-set and running-set writes of the batch scripts (claim, finish_task): collected per
-- key and sent as one variadic ZADD / ZREM / SADD / SREM per key when the script ends
-- (flush_later), instead of one call per task: a Lua redis.call costs more than the command
-- it runs. Other scripts leave LATER nil and write at once. A batch script never adds and
-- removes the same member of one key (a task makes at most one transition per call), so the
-- order of the flushed calls changes nothing, and nothing reads these keys before the flush
-- (claim counts the tasks it started itself where it reads the running set). LATER.locks
-- caches each GPU's exclusive-lock holder for the call (one GET per GPU, not per task). A batch script flushes
-- even when a damaged record stops it (pcall), so that what it already did has its index
-- and timer entries, as it would have with the writes made at once.
-- LATER.events groups the call's task events by (event, status, extra fields): one entry of
-- the events stream per group, naming its tasks in ``taskIds`` (comma-separated; ``taskId``
-- when there is one), at most EVENT_GROUP of them: an XADD per task was a fifth of a drained
-- task's time in Redis. Their order in the stream within one call means nothing (the
-- call is atomic, and a task makes one transition per call).
local LATER = nil
local EVENT_GROUP = 100

local function write_later()
  LATER = {add = {}, rem = {}, sadd = {}, srem = {}, locks = {}, events = {}, groups = {}}
end

local function later_member(map, key, member)
  local t = map[key]
  if not t then t = {}; map[key] = t end
  t[#t + 1] = member
end

local function sadd(key, member)
  if not LATER then return redis.call('SADD', key, member) end
  later_member(LATER.sadd, key, member)
end

local function srem(key, member)
  if not LATER then return redis.call('SREM', key, member) end
  later_member(LATER.srem, key, member)
end

local function zadd(key, score, member)
  if not LATER then return redis.call('ZADD', key, score, member) end
  -- Refuse a bad score here, where ZADD itself would have failed: at the flush it would
  -- fail every task of the call (a missing field reads as false).
  if not tonumber(score) then
    error('bad score ' .. tostring(score) .. ' for ' .. tostring(member) .. ' in ' .. key)
  end
  later_member(LATER.add, key, score)
  later_member(LATER.add, key, member)
end

local function zrem(key, member)
  if not LATER then return redis.call('ZREM', key, member) end
  later_member(LATER.rem, key, member)
end

-- One variadic ``cmd`` per key of ``map`` and per ``per_call`` arguments (even for ZADD's
-- score, member pairs), so that no call unpacks more than Lua's stack allows.
local function send_later(cmd, map, per_call)
  for key, t in pairs(map) do
    for i = 1, #t, per_call do
      redis.call(cmd, key, unpack(t, i, math.min(i + per_call - 1, #t)))
    end
  end
end

-- One entry of the events stream: ``id_field`` 'taskId' (one task) or 'taskIds' (several,
-- comma-separated), then the event's own fields.
local function add_event(kind, id_field, ids, status, extra)
  local args = {'XADD', K_EVENTS, 'MAXLEN', '~', EVENTS_MAXLEN, '*',
                'event', kind, id_field, ids, 'status', status}
  for _, v in ipairs(extra) do args[#args + 1] = v end
  redis.call(unpack(args))
end

local function flush_later()
  if not LATER then return end
  local later = LATER
  LATER = nil
  send_later('ZREM', later.rem, 1000)
  send_later('ZADD', later.add, 2000)
  send_later('SREM', later.srem, 1000)
  send_later('SADD', later.sadd, 1000)
  for _, g in ipairs(later.groups) do
    for i = 1, #g.ids, EVENT_GROUP do
      local last = math.min(i + EVENT_GROUP - 1, #g.ids)
      add_event(g.kind, last == i and 'taskId' or 'taskIds', table.concat(g.ids, ',', i, last),
                g.status, g.extra)
    end
  end
end

-- The message of what pcall caught: a Lua error (a string) or a failed redis.call (a table
-- with err).
local function error_text(err)
  if type(err) == 'table' then err = err.err end
  return tostring(err)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Append a task's event to the events stream (grouped in a batch script: see LATER) and
-- notify whoever awaits the task.
local function emit(kind, id, status, extra, view_of)
  extra = extra or {}
  if LATER and id ~= '' then
    local key = kind .. ' ' .. status  -- then each extra value, length-prefixed
    for _, v in ipairs(extra) do key = key .. ' ' .. #v .. ':' .. v end
    local g = LATER.events[key]
    if not g then
      g = {kind = kind, status = status, extra = extra, ids = {}}
      LATER.events[key] = g
      LATER.groups[#LATER.groups + 1] = g
    end
    g.ids[#g.ids + 1] = id
  else
    add_event(kind, 'taskId', id, status, extra)
  end
  -- ``view_of`` 'new': the task is being created, so nobody can know its id yet (ids are
  -- made by the api): the event only, no note.
  if view_of == 'new' then return end
  -- Wake whoever awaits this task (long-poll, SSE): costs next to nothing when nobody
  -- listens. The channel names mirror gpuflow/core/notify.py (TaskNotifier.channel).
  -- A final status also goes to ``evf:<id>``, the channel of requests that await only the
  -- end (create-and-wait): they are not woken by every step on the way. ``view_of``: the
  -- task's key when it was created ``awaited`` (by such a request): the final note also
  -- carries the task's fields, "<status>\n<JSON array of field, value, ...>", so that
  -- request answers without reading the task again; not past 64 KB (a big result would
  -- fill the subscribers' output buffers: they read it instead). false: the caller knows
  -- nobody awaits the end that way (no ``evf`` note); nil: not known, the note goes out.
  if id ~= '' then
    redis.call('PUBLISH', P .. 'ev:' .. id, status)
    if TERMINAL[status] and view_of ~= false then
      local note = status
      if view_of then
        local fields = cjson.encode(redis.call('HGETALL', view_of))
        if #fields <= 65536 then note = status .. '\n' .. fields end
      end
      redis.call('PUBLISH', P .. 'evf:' .. id, note)
    end
  end
end

-- Move a task between status indexes (idx:status:{s} and idx:st:{s}:{type}); the caller
-- writes the status field (with the other fields of the transition, in one HSET).
local function move_index(id, old, new, display, ttype, now)
  if old and old ~= new then
    zrem(k_status(old), id)
    zrem(k_status_type(old, ttype), id)
  end
  zadd(k_status(new), display, id)
  zadd(k_status_type(new, ttype), display, id)
  if TERMINAL[new] then zadd(K_FINISHED, now, id) end
end

-- move_index plus the status field, for transitions that read nothing else.
local function set_status(tkey, id, old, new)
  local h = redis.call('HMGET', tkey, 'displayId', 'taskType')
  move_index(id, old, new, h[1], h[2], now_ms())
  redis.call('HSET', tkey, 'status', new)
end

-- Every GPU a task ran on (its ranOn field lists them, for retention to clean up its
-- idx:gpu entries): the new value after a run on ``gpu``, or nil when already listed.
local function ran_on(ran, gpu)
  ran = ran or ''
  if string.find(',' .. ran .. ',', ',' .. gpu .. ',', 1, true) then return nil end
  if ran == '' then return gpu end
  return ran .. ',' .. gpu
end

local function note_gpu(tkey, gpu)
  local ran = ran_on(redis.call('HGET', tkey, 'ranOn'), gpu)
  if ran then redis.call('HSET', tkey, 'ranOn', ran) end
end

-- The timers of a running attempt: lease, timeout warning, hard timeout; and the GPU's
-- exclusive lock when this task holds it. Called on every way out of PROCESSING (``gpu``:
-- the task's gpuId when the caller has read it already).
local function clear_timers(id, gpu)
  zrem(K_LEASES, id)
  zrem(K_TIMEOUTS, id)
  zrem(K_WARNINGS, id)
  if gpu == nil then gpu = redis.call('HGET', k_task(id), 'gpuId') end
  if not gpu or gpu == '' then return end
  local holder
  if LATER then
    holder = LATER.locks[gpu]
    if holder == nil then
      holder = redis.call('GET', k_lock(gpu))
      LATER.locks[gpu] = holder
    end
  else
    holder = redis.call('GET', k_lock(gpu))
  end
  if holder == id then
    redis.call('DEL', k_lock(gpu))
    redis.call('ZREM', K_LOCKS, gpu)
    if LATER then LATER.locks[gpu] = false end
  end
end

-- Arm them at start: lease at now + lease, warning at now + timeout * fraction (when
-- 0 < fraction < 1), hard timeout at now + timeout + grace (when timeout > 0). The lease
-- deadline lives only here (the task hash does not repeat it: a heartbeat renews a task
-- with one ZADD).
local function arm_timer_sets(id, now, lease, timeout, grace, fraction)
  zadd(K_LEASES, now + lease, id)
  if timeout > 0 then
    zadd(K_TIMEOUTS, now + timeout + grace, id)
    if fraction > 0 and fraction < 1 then
      zadd(K_WARNINGS, now + math.floor(timeout * fraction), id)
    end
  end
end

local function arm_timers(id, tkey, now, lease, grace, fraction)
  local timeout = tonumber(redis.call('HGET', tkey, 'timeout') or 0)
  arm_timer_sets(id, now, lease, timeout, grace, fraction)
end

-- An alert record (the seed's AlertInfo) plus an event.
local function raise_alert(level, title, message, source)
  local aid = 'alert_' .. redis.call('INCR', P .. 'alerts:seq')
  local now = now_ms()
  redis.call('HSET', P .. 'alert:' .. aid, 'id', aid, 'title', title, 'message', message,
             'level', level, 'status', 'ACTIVE', 'source', source, 'timestamp', now)
  redis.call('ZADD', P .. 'alerts', now, aid)
  emit('alert', '', level, {'alertId', aid, 'title', title})
  return aid
end

local function ensure_group(q)
  if redis.call('EXISTS', q) == 0 then
    redis.call('XGROUP', 'CREATE', q, GROUP, '0', 'MKSTREAM')
    redis.call('SADD', K_QUEUES, q)
  end
end

-- Push dispatch. An agent whose claim found its queues empty, with room left, registers as
-- waiting (claim.lua): a flag with a TTL a little past its blocking read, and its id in the
-- waiters zset of each queue it reads. It then blocks on BLPOP of its inbox. A new task whose
-- queue has a waiting GPU is started for it by create_task.lua and its compact row pushed to
-- that inbox: the agent wakes with the task already started, one hop instead of a wake-up
-- and a claim. Entries of GPUs no longer waiting (flag gone: it took a task, timed out,
-- stopped) are dropped when met.
-- Which waiting GPU goes first (the lowest score): an idle one (nothing running) before one
-- that runs tasks and has room, so that tasks spread over the GPUs; among idle GPUs the one
-- that became idle last (score -ms), whose agent process is warm (the same awaited task ran
-- ~20 % faster when one agent took them all than when two took turns); among busy ones the
-- longest waiting (score ms since it registered or took its last pushed task). A GPU's
-- score turns idle when its last running task ends (finish_task.lua).
local function waiter_score(running, now)
  if running == 0 then return -now end
  return now
end

-- How many more tasks ``gpu`` can start now if it waits (0 when it does not wait, is not
-- ACTIVE, or is locked), and its flag's value: how long (ms) its agent's blocking reads last,
-- the flag's TTL when it stays waiting.
local function room_of(gpu)
  local ttl = redis.call('GET', k_waitflag(gpu))
  if not ttl then return 0 end
  local g = redis.call('HMGET', k_gpu(gpu), 'status', 'maxConcurrentTasks')
  if g[1] ~= 'ACTIVE' or redis.call('EXISTS', k_lock(gpu)) == 1 then return 0 end
  return tonumber(g[2]) - redis.call('SCARD', k_running(gpu)), ttl
end

-- The first waiting GPU of queue ``q`` (see waiter_score) that can take a task, its room and
-- flag value; or nil (looks at no more than 8 entries per call, removing those that cannot).
local function waiting_gpu(q)
  local wk = k_waiters(q)
  for _ = 1, 8 do
    local first = redis.call('ZRANGE', wk, 0, 0)
    local gpu = first[1]
    if not gpu then return nil end
    local room, ttl = room_of(gpu)
    if room > 0 then return gpu, room, ttl end
    redis.call('ZREM', wk, gpu)
  end
  return nil
end

-- Append a QUEUED task to the stream of its (type, tier); returns the entry id. A GPU
-- waiting on that queue is woken (an empty row in its inbox: it claims from the stream).
local function enqueue(id, tkey)
  local t = redis.call('HMGET', tkey, 'taskType', 'tier')
  local q = k_queue(t[1], t[2])
  ensure_group(q)
  local eid = redis.call('XADD', q, '*', 'id', id)
  local seq = redis.call('HINCRBY', k_qstat(t[1], t[2]), 'enq', 1)
  redis.call('HSET', tkey, 'streamId', eid, 'queueSeq', seq)
  local gpu = waiting_gpu(q)
  if gpu then
    redis.call('DEL', k_waitflag(gpu))
    redis.call('RPUSH', k_inbox(gpu), '')
  end
  return eid
end

-- Empty ``gpu``'s inbox: {compact row, task key} of each task pushed there and not taken
-- that still runs there with that attempt (the stay-waiting flag taken off the row); rows
-- of tasks that moved on meanwhile, and wake rows, are dropped.
local function take_inbox(gpu)
  local rows = redis.call('LRANGE', k_inbox(gpu), 0, -1)
  if #rows == 0 then return {} end
  redis.call('DEL', k_inbox(gpu))
  local live = {}
  for _, raw in ipairs(rows) do
    if raw ~= '' then
      local row = cjson.decode(raw)
      table.remove(row, 1)
      local tkey = k_task(row[1])
      local t = redis.call('HMGET', tkey, 'status', 'gpuId', 'attempt')
      if t[1] == 'PROCESSING' and t[2] == gpu and tonumber(t[3]) == tonumber(row[3]) then
        table.insert(live, {row, tkey})
      end
    end
  end
  return live
end

-- The fields start_on reads (one HMGET of the task, in this order).
local START_FIELDS = {'status', 'streamId', 'taskType', 'tier', 'displayId', 'ranOn', 'timeout',
                      'attempt', 'payload', 'priority', 'userId', 'app', 'retryCount',
                      'maxRetries'}

-- Start QUEUED task ``id`` (``t``: its START_FIELDS) on ``gpu``: PROCESSING, next attempt,
-- timers armed, in the GPU's running set. Returns the compact row an agent runs it with:
-- taskId, taskType, attempt, gpuId, payload, priority, displayId, userId, app, timeout,
-- retryCount, maxRetries ('' for a missing one; core/dispatch.py: COMPACT_FIELDS).
-- ``created``: the field/value list (an HSET's arguments from the key on) of a task being
-- created and started at once, not yet in any index: written with the start's fields in
-- one HSET, and its events go without notes (emit's 'new').
local function start_on(gpu, id, tkey, t, now, lease, grace, fraction, created)
  local ttype = t[3]
  move_index(id, not created and 'QUEUED' or nil, 'PROCESSING', t[5], ttype, now)
  local attempt = tonumber(t[8] or 0) + 1
  -- progress is 0 and progressMessage empty already: create sets one, and every way back
  -- to QUEUED (requeue, retry_or_end) resets both.
  local fields
  if created then
    fields = created
    local n = #fields
    fields[n + 1], fields[n + 2], fields[n + 3], fields[n + 4] = 'status', 'PROCESSING', 'attempt', attempt
    fields[n + 5], fields[n + 6], fields[n + 7], fields[n + 8] = 'gpuId', gpu, 'startedAt', now
    fields[n + 9], fields[n + 10] = 'updatedAt', now
  else
    fields = {'HSET', tkey, 'status', 'PROCESSING', 'attempt', attempt, 'gpuId', gpu,
              'startedAt', now, 'updatedAt', now}
  end
  local ran = ran_on(t[6], gpu)
  if ran then fields[#fields + 1] = 'ranOn'; fields[#fields + 1] = ran end
  redis.call(unpack(fields))
  zadd(P .. 'idx:gpu:' .. gpu, t[5], id)
  arm_timer_sets(id, now, lease, tonumber(t[7] or 0), grace, fraction)
  sadd(k_running(gpu), id)
  emit('started', id, 'PROCESSING', {'gpuId', gpu}, created and 'new' or nil)
  return {id, ttype, attempt, gpu, t[9] or '', t[10] or '', t[5], t[11] or '', t[12] or '',
          t[7] or '', t[13] or '', t[14] or ''}
end

-- Put a PROCESSING task back into its queue (lost GPU, released claim, ...).
local function requeue(id, tkey, now, count_retry)
  local gpu = redis.call('HGET', tkey, 'gpuId')
  if gpu and gpu ~= '' then redis.call('SREM', k_running(gpu), id) end
  clear_timers(id)
  if count_retry then redis.call('HINCRBY', tkey, 'retryCount', 1) end
  set_status(tkey, id, redis.call('HGET', tkey, 'status'), 'QUEUED')
  redis.call('HSET', tkey, 'updatedAt', now, 'progress', 0, 'progressMessage', '')
  enqueue(id, tkey)
  emit('requeued', id, 'QUEUED')
end

-- End a PROCESSING attempt that did not complete (already out of leases / running set):
-- back to QUEUED after a backoff while retries last (retryable only), else the final
-- outcome. The backoff of retry n is min(cap, base * 2^n) * jitter. Returns the new status.
local function retry_or_end(id, tkey, outcome, text, retryable, base, cap, jitter, now)
  local r = redis.call('HMGET', tkey, 'retryCount', 'maxRetries')
  clear_timers(id)
  redis.call('HSET', tkey, 'errorMessage', text, 'updatedAt', now)
  if retryable and tonumber(r[1]) < tonumber(r[2]) then
    local delay = math.floor(math.min(cap, base * 2 ^ tonumber(r[1])) * jitter)
    redis.call('HINCRBY', tkey, 'retryCount', 1)
    set_status(tkey, id, 'PROCESSING', 'QUEUED')
    redis.call('HSET', tkey, 'progress', 0, 'progressMessage', '')
    if delay > 0 then
      zadd(K_DELAYED, now + delay, id)
      redis.call('HSET', tkey, 'streamId', '')
    else
      enqueue(id, tkey)
    end
    emit('retry', id, 'QUEUED', {'error', text})
    return 'QUEUED'
  end
  set_status(tkey, id, 'PROCESSING', outcome)
  redis.call('HSET', tkey, 'completedAt', now)
  emit(string.lower(outcome), id, outcome, {'error', text})
  return outcome
end
