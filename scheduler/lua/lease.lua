-- A lease: a key that one holder at a time owns for ttl_ms, renewed by that holder (the console's
-- pulse broadcasts from one process per console Redis this way). Python side: scheduler/lease.py.
-- These scripts take their key in KEYS[1] and need none of the topic helpers.

-- @script hold
-- Takes the lease when it is free, renews it when holder has it: one atomic step, so a handover
-- never leaves two holders. Returns 1 when holder has the lease now, else 0.
local function hold(lease_key, holder, ttl_ms)
  local current = redis.call('GET', lease_key)
  if current and current ~= holder then return 0 end
  redis.call('SET', lease_key, holder, 'PX', ttl_ms)
  return 1
end

-- @script release
-- Gives the lease up when holder has it. Returns 1 when it did.
local function release(lease_key, holder)
  if redis.call('GET', lease_key) ~= holder then return 0 end
  redis.call('DEL', lease_key)
  return 1
end
