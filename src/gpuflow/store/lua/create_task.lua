-- Create a task and queue it.
-- ARGV[3] task id, ARGV[4..] field/value pairs of the task hash (taskType and tier included).
-- Returns {displayId, queueSeq, deq} (deq = entries already taken from that queue).
local id = ARGV[3]
local tkey = k_task(id)
if redis.call('EXISTS', tkey) == 1 then return redis.error_reply('EXISTS task id taken') end
local display = redis.call('INCR', P .. 'seq:display')
local now = now_ms()
local fields = {'HSET', tkey, 'taskId', id, 'displayId', display, 'status', 'QUEUED',
                'createdAt', now, 'updatedAt', now, 'attempt', 0, 'retryCount', 0, 'progress', 0}
for i = 4, #ARGV do table.insert(fields, ARGV[i]) end
redis.call(unpack(fields))
local t = redis.call('HMGET', tkey, 'taskType', 'tier', 'userId')
redis.call('ZADD', P .. 'idx:all', display, id)
redis.call('ZADD', k_status('QUEUED'), display, id)
redis.call('ZADD', P .. 'idx:type:' .. t[1], display, id)
if t[3] and t[3] ~= '' then redis.call('ZADD', P .. 'idx:user:' .. t[3], display, id) end
enqueue(id, tkey)
emit('created', id, 'QUEUED', {'taskType', t[1]})
local seq = redis.call('HGET', tkey, 'queueSeq')
local deq = redis.call('HGET', k_qstat(t[1], t[2]), 'deq') or '0'
return {display, tonumber(seq), tonumber(deq)}
