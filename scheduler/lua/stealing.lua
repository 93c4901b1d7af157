-- Global mode: work stealing (an idle node takes from the most loaded ones, inside claim) and the
-- re-homing of dead nodes' queues. Python side: scheduler/global_.py.
--
-- A node's load score is the length of its queue (see helpers.lua): only nodes at or above
-- scheduler_min_load_score are victims, and every move changes the queues and the scores together.

-- Steal for node: pick a victim among the most loaded nodes (randomly among the top three, so that
-- thieves do not herd) and move up to half its queue, at most half the thief's batch (at least one),
-- from the head of its queue to the thief's. Returns how many moved.
local function steal(node, cfg, rand, batch)
  local candidates = {}
  for shard_index = 0, cfg.scheduler_load_shards_num - 1 do
    local top = redis.call('ZREVRANGEBYSCORE', k_load(shard_index), '+inf', cfg.scheduler_min_load_score,
                           'WITHSCORES', 'LIMIT', 0, 3)
    for i = 1, #top, 2 do
      if top[i] ~= node then table.insert(candidates, {top[i], tonumber(top[i + 1])}) end
    end
  end
  if #candidates == 0 then return 0 end
  table.sort(candidates, function(a, b) return a[2] > b[2] end)
  local victim = candidates[1 + math.floor(rand * math.min(#candidates, 3))]
  local want = math.max(1, math.min(math.floor(victim[2] / 2), math.floor(batch / 2)))
  local moved = 0
  for _ = 1, want do
    local uid = redis.call('LPOP', k_queue(victim[1]))
    if not uid then break end
    redis.call('RPUSH', k_queue(node), uid)
    redis.call('HSET', k_req(uid), 'queue_node', node)
    moved = moved + 1
  end
  add_load(victim[1], -moved, cfg)
  add_load(node, moved, cfg)
  if moved > 0 then
    event('steal', 'node', node, 'from', victim[1], 'count', moved)
    tally('steals', moved)
  end
  return moved
end

-- @script rehome
-- The queues of nodes that are not alive (no heartbeat within dead_after seconds) are spread over
-- the live nodes, least loaded first. Returns how many requests moved.
local function rehome(dead_after, limit)
  local cfg = config()
  if not cfg or cfg.scheduler_name ~= 'global' then return 0 end
  local live = live_nodes(now(), tonumber(dead_after))
  if #live == 0 then return 0 end
  local is_live = {}
  for _, node in ipairs(live) do is_live[node] = true end
  local moved = 0
  limit = tonumber(limit)
  for shard_index = 0, cfg.scheduler_load_shards_num - 1 do
    for _, node in ipairs(redis.call('ZRANGEBYSCORE', k_load(shard_index), 1, '+inf')) do
      local before = moved
      while not is_live[node] and moved < limit do
        local uid = redis.call('LPOP', k_queue(node))
        if not uid then break end
        add_load(node, -1, cfg)
        local target = least_loaded(live, cfg)
        redis.call('RPUSH', k_queue(target), uid)
        add_load(target, 1, cfg)
        redis.call('HSET', k_req(uid), 'queue_node', target)
        ring(target)
        moved = moved + 1
      end
      if moved > before then
        event('rehomed', 'from', node, 'count', moved - before)
        tally('failovers:rehomed', moved - before)
      end
    end
  end
  return moved
end
