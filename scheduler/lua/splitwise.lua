-- Splitwise (PD-separated) mode: placement on a prefill (or mixed) node and a decode node by load,
-- the load charges that placement takes, the handoff from prefill to decode, and the upkeep of the
-- node registry. Python side: scheduler/splitwise.py.
--
-- Load (K_PDLOAD, node -> amount): prefill and mixed nodes count prompt tokens in flight, decode nodes
-- count requests in flight. A request records what it charged (charge_p on its prefill node, charge_d
-- on its decode node) so that its end, its handoff or a move releases exactly that; K_CHARGES
-- remembers when each charge was last confirmed, so a request gone silent cannot hold load forever.

local function release_charge(req, field, node_field)
  local charge = tonumber(redis.call('HGET', req, field) or 0)
  if charge ~= 0 then
    redis.call('HINCRBY', K_PDLOAD, redis.call('HGET', req, node_field), -charge)
    redis.call('HSET', req, field, 0)
  end
end
local function release_charges(uid)
  local req = k_req(uid)
  release_charge(req, 'charge_p', 'prefill_node')
  release_charge(req, 'charge_d', 'decode_node')
  redis.call('ZREM', K_CHARGES, uid)
end
local function move_charge(req, charge, from, to)
  local amount = tonumber(redis.call('HGET', req, charge) or 0)
  redis.call('HINCRBY', K_PDLOAD, from, -amount)
  redis.call('HINCRBY', K_PDLOAD, to, amount)
end

local function live_roles(t, cfg)
  -- live (not stale: heard from within three sync periods) nodes by role
  local by_role = {prefill = {}, decode = {}, mixed = {}}
  local live = redis.call('ZRANGEBYSCORE', K_ALIVE, t - 3 * cfg.scheduler_sync_period, '+inf')
  if #live == 0 then return by_role end
  local roles = redis.call('HMGET', K_ROLES, unpack(live))
  for i, node in ipairs(live) do
    local role = roles[i] or 'mixed'
    if by_role[role] then table.insert(by_role[role], node) end
  end
  return by_role
end
local function prefill_capable(by_role)
  local capable = {}
  for _, node in ipairs(by_role.prefill) do table.insert(capable, node) end
  for _, node in ipairs(by_role.mixed) do table.insert(capable, node) end
  return capable
end
local function pick(nodes, rand)
  -- least loaded, at random among the best two so that placements do not herd
  local ranked = {}
  for _, node in ipairs(nodes) do
    table.insert(ranked, {node, tonumber(redis.call('HGET', K_PDLOAD, node) or 0)})
  end
  table.sort(ranked, function(a, b) return a[2] < b[2] end)
  return ranked[1 + math.floor(rand * math.min(#ranked, 2))][1]
end

-- Placement: a prefill (or mixed) node and a decode node by load; with only mixed nodes alive, one
-- mixed node does it all. Returns the node the request is queued on, or nil: it must wait (the
-- caller keeps it in K_PENDING, and waiting_for says for what).
local function place(uid, cfg, t, rand)
  local req = k_req(uid)
  local prompt = tonumber(redis.call('HGET', req, 'prompt_tokens'))
  local by_role = live_roles(t, cfg)
  local missing
  if #by_role.prefill == 0 and #by_role.decode == 0 then
    if #by_role.mixed == 0 then
      missing = 'live node'
    else
      local node = pick(by_role.mixed, rand)
      redis.call('HSET', req, 'phase', '', 'home_node', node, 'prefill_node', node, 'decode_node', node,
                 'charge_p', prompt, 'waiting_for', '')
      redis.call('HINCRBY', K_PDLOAD, node, prompt)
      redis.call('ZADD', K_CHARGES, now(), uid)
      enqueue(uid, node, false, cfg, t)
      return node
    end
  else
    local capable = prefill_capable(by_role)
    if #capable == 0 then
      missing = 'prefill node'
    elseif #by_role.decode == 0 then
      missing = 'decode node'
    else
      local p, d = pick(capable, rand), pick(by_role.decode, rand)
      redis.call('HSET', req, 'phase', 'prefill', 'home_node', p, 'prefill_node', p, 'decode_node', d,
                 'charge_p', prompt, 'charge_d', 1, 'waiting_for', '')
      redis.call('HINCRBY', K_PDLOAD, p, prompt)
      redis.call('HINCRBY', K_PDLOAD, d, 1)
      redis.call('ZADD', K_CHARGES, now(), uid)
      enqueue(uid, p, false, cfg, t)
      return p
    end
  end
  redis.call('HSET', req, 'status', QUEUED, 'queue_node', '', 'home_node', '', 'waiting_for', missing)
  return nil
end

-- Failover of a splitwise request whose lease ran out: the node of the phase it is in when still
-- live, else a live node of the right role (its load charge moves along), else the same node: the
-- request waits for it (and for its TTL).
local function relocate(req, cfg, t, rand)
  local decode = redis.call('HGET', req, 'phase') == 'decode'
  local field, charge = decode and 'decode_node' or 'prefill_node', decode and 'charge_d' or 'charge_p'
  local current = redis.call('HGET', req, field)
  local by_role = live_roles(t, cfg)
  local candidates = decode and by_role.decode or prefill_capable(by_role)
  for _, node in ipairs(candidates) do
    if node == current then return current end
  end
  if #candidates == 0 then return current end
  local target = pick(candidates, rand)
  move_charge(req, charge, current, target)
  redis.call('HSET', req, field, target)
  return target
end

-- @script hand_off
-- The prefill node wrote the KV cache and streamed the first token: the request goes to its decode
-- node's queue and the prefill load is released. Returns 1, or 0 when the lease is no longer the
-- caller's.
local function hand_off(uid, lease, num_bytes, ms)
  local req = k_req(uid)
  if redis.call('HGET', req, 'status') ~= RUNNING or redis.call('HGET', req, 'lease') ~= lease then
    return 0
  end
  local cfg, t = need_config(), now()
  release_charge(req, 'charge_p', 'prefill_node')
  redis.call('ZREM', K_INFLIGHT, uid)
  redis.call('HSET', req, 'lease', '', 'executed_by', '', 'phase', 'decode', 'handoff_bytes', num_bytes,
             'handoff_ms', ms)
  observe('handoff', BUCKETS_HANDOFF, math.max(0, tonumber(ms) / 1000))  -- its count: the handoffs
  tally('handoff_bytes', tonumber(num_bytes))
  enqueue(uid, redis.call('HGET', req, 'decode_node'), false, cfg, t)
  return 1
end

-- @script place_pending
-- Places waiting requests once eligible nodes are live (their TTL clock keeps running from when they
-- were put). Returns how many were placed.
local function place_pending(rand, limit)
  local cfg = config()
  if not cfg or cfg.scheduler_name ~= 'splitwise' then return 0 end
  local t, placed = now(), 0
  for _, uid in ipairs(redis.call('LRANGE', K_PENDING, 0, tonumber(limit) - 1)) do
    local req = k_req(uid)
    if redis.call('HGET', req, 'status') ~= QUEUED or redis.call('HGET', req, 'queue_node') ~= '' then
      redis.call('LREM', K_PENDING, 0, uid)
    else
      local since = tonumber(redis.call('ZSCORE', K_WAITING, uid) or t)
      if not place(uid, cfg, since, tonumber(rand)) then break end
      redis.call('LREM', K_PENDING, 0, uid)
      placed = placed + 1
    end
  end
  return placed
end

-- @script splitwise_upkeep
-- A node silent for scheduler_expire_period is removed from the registry and its queue goes back to
-- placement (a decode-phase request to another decode node); load charged to a request silent for
-- scheduler_release_load_expire_period is released (a leak guard). Returns how many requests moved.
local function splitwise_upkeep(rand, limit)
  local cfg = config()
  if not cfg or cfg.scheduler_name ~= 'splitwise' then return 0 end
  local t, moved = now(), 0
  rand, limit = tonumber(rand), tonumber(limit)
  for _, node in ipairs(redis.call('ZRANGEBYSCORE', K_SEEN, '-inf', t - cfg.scheduler_expire_period)) do
    local before = moved
    redis.call('HDEL', K_ROLES, node)
    redis.call('ZREM', K_SEEN, node)
    redis.call('ZREM', K_ALIVE, node)
    while moved < limit do
      local uid = redis.call('LPOP', k_queue(node))
      if not uid then break end
      add_load(node, -1, cfg)
      local req = k_req(uid)
      redis.call('HSET', req, 'queue_node', '')
      local decoders = live_roles(t, cfg).decode
      local decoding = redis.call('HGET', req, 'phase') == 'decode'
      if decoding and #decoders > 0 then
        local target = pick(decoders, rand)
        move_charge(req, 'charge_d', node, target)
        redis.call('HSET', req, 'decode_node', target)
        enqueue(uid, target, false, cfg, tonumber(redis.call('ZSCORE', K_WAITING, uid) or t))
      elseif not decoding then
        release_charges(uid)
        if not place(uid, cfg, tonumber(redis.call('ZSCORE', K_WAITING, uid) or t), rand) then
          redis.call('RPUSH', K_PENDING, uid)
        end
      else
        redis.call('HSET', req, 'waiting_for', 'decode node')
        redis.call('RPUSH', K_PENDING, uid)  -- placed again (prefill included) once nodes are back
        release_charges(uid)
        redis.call('HSET', req, 'phase', '')
      end
      moved = moved + 1
    end
    redis.call('HDEL', K_PDLOAD, node)
    event('node_expired', 'node', node, 'moved', moved - before)
  end
  local stale_before = t - cfg.scheduler_release_load_expire_period
  for _, uid in ipairs(redis.call('ZRANGEBYSCORE', K_CHARGES, '-inf', stale_before, 'LIMIT', 0, 500)) do
    release_charges(uid)
  end
  return moved
end
