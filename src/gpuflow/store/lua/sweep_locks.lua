-- Leader loop: release stale GPU locks, whose owner no longer runs on that GPU (a lock whose
-- owner crashed simply expires: its TTL is renewed only by the GPU's heartbeats).
-- Returns the GPU ids whose lock was released here.
local released = {}
for _, gpu in ipairs(redis.call('ZRANGE', K_LOCKS, 0, -1)) do
  local owner = redis.call('GET', k_lock(gpu))
  if not owner then
    redis.call('ZREM', K_LOCKS, gpu)
  else
    local t = redis.call('HMGET', k_task(owner), 'status', 'gpuId')
    if t[1] ~= 'PROCESSING' or t[2] ~= gpu then
      redis.call('DEL', k_lock(gpu))
      redis.call('ZREM', K_LOCKS, gpu)
      raise_alert('WARNING', 'Stale GPU lock', 'released the lock of GPU ' .. gpu ..
                  ' held by ' .. owner .. ' (' .. (t[1] or 'gone') .. ')', 'gpu_lock_monitor')
      table.insert(released, gpu)
    end
  end
end
return released
