-- Failover: work held by a node that stopped renewing its leases goes back to the front of a queue
-- and resumes there after the tokens already streamed. Python side: scheduler/failover.py.

-- Back to the front of target's queue; ended as cancelled instead when the client cancelled while
-- its node was dying. why names the event: 'failover' or 'reclaimed'. Returns whether it was requeued.
local function requeue(uid, target, cfg, t, why)
  local req = k_req(uid)
  redis.call('ZREM', K_INFLIGHT, uid)
  if redis.call('HGET', req, 'cancel_requested') == '1' then
    close(uid, CANCELLED, 'cancelled', 'cancelled', 'cancelled by the client', {})
    return false
  end
  event(why, 'request_id', redis.call('HGET', req, 'request_id'),
        'from', redis.call('HGET', req, 'executed_by') or '', 'to', target)
  tally(why == 'failover' and 'failovers:lease_expired' or 'failovers:' .. why)
  redis.call('HSET', req, 'executed_by', '', 'lease', '')
  redis.call('HINCRBY', req, 'requeues', 1)
  enqueue(uid, target, true, cfg, t)
  return true
end

-- @script recover
-- Running requests whose lease ran out (their node died) go back to the front of a queue: their home
-- node's when it is alive (always, in local mode), else in global mode the least loaded live node (no
-- heartbeat within dead_after seconds is dead), in splitwise mode a live node of the phase's role.
-- Returns {uid, node} pairs.
local function recover(limit, dead_after, rand)
  local cfg = config()
  if not cfg then return {} end
  local t = now()
  local due = oldest_first(redis.call('ZRANGEBYSCORE', K_INFLIGHT, '-inf', t, 'LIMIT', 0, tonumber(limit)))
  local live = live_nodes(t, tonumber(dead_after))
  local is_live = {}
  for _, node in ipairs(live) do is_live[node] = true end
  local moved = {}
  for i = #due, 1, -1 do  -- backwards: each goes to the front, so the oldest ends up first
    local uid = due[i]
    local req = k_req(uid)
    if redis.call('HGET', req, 'status') == RUNNING then
      local target = redis.call('HGET', req, 'home_node')
      if cfg.scheduler_name == 'global' and not is_live[target] and #live > 0 then
        target = least_loaded(live, cfg)
      elseif cfg.scheduler_name == 'splitwise' then
        target = relocate(req, cfg, t, tonumber(rand))
      end
      if requeue(uid, target, cfg, t, 'failover') then table.insert(moved, {uid, target}) end
    else
      redis.call('ZREM', K_INFLIGHT, uid)
    end
  end
  return moved
end

-- @script reclaim
-- A node starting under a name that still holds running requests (it died and came back before its
-- leases ran out) takes them back at the front of its own queue. Returns their uids.
local function reclaim(node)
  local cfg = config()
  if not cfg then return {} end
  local t, taken = now(), {}
  local held = oldest_first(redis.call('ZRANGE', K_INFLIGHT, 0, -1))
  for i = #held, 1, -1 do  -- backwards: each goes to the front, so the oldest ends up first
    local uid = held[i]
    local req = k_req(uid)
    if redis.call('HGET', req, 'status') == RUNNING and redis.call('HGET', req, 'executed_by') == node then
      if requeue(uid, node, cfg, t, 'reclaimed') then table.insert(taken, uid) end
    end
  end
  return taken
end
