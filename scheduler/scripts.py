"""The Lua scripts of the request lifecycle. Each one is a single atomic step on the server's clock.

Invariants every script keeps:

* a queued request's uid is in exactly one node queue (the hash field ``queue_node`` names it) and in
  the ``waiting`` set; a running one is in no queue and in ``inflight`` under a lease
  (``node#attempt``); a final one is in neither;
* a node's load score (its entry in its shard's load table) equals the length of its queue: every
  push, pop or removal changes both in the same script, so scores never drift;
* only the holder of the current lease may stream tokens or finish; a node that lost its lease (it
  was presumed dead and the request went to another node) gets -1 and stops.

Every script takes ``KEYS[1]`` = the topic's config key (so Redis Cluster routes it to the topic's
slot), ``ARGV[1]`` = the topic's key prefix and ``ARGV[2]`` = the retention of finished keys.
"""

from __future__ import annotations

from scheduler.keys import LUA_KEYS
from scheduler.loadtable import LUA_CRC16

PRELUDE = LUA_KEYS + LUA_CRC16 + """
local RETENTION = tonumber(ARGV[2])
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.6f', x) end
local function event(kind, ...)  -- the console's event feed: a capped stream, fields after the kind
  redis.call('XADD', K_EVENTS, 'MAXLEN', '~', EVENTS_KEPT, '*', 'kind', kind, 'at', fmt(now()), ...)
end
local function count(field, n) redis.call('HINCRBY', K_STATS, field, n or 1) end
local function config()  -- the small copy first: every script reads it, and decoding costs
  local raw = redis.call('GET', K_SCHED) or redis.call('GET', K_CONFIG)
  local cfg = raw and cjson.decode(raw) or {}
  cfg.scheduler_name = cfg.scheduler_name or 'local'
  cfg.scheduler_ttl = tonumber(cfg.scheduler_ttl or 900)
  cfg.scheduler_load_shards_num = tonumber(cfg.scheduler_load_shards_num or 1)
  cfg.scheduler_min_load_score = tonumber(cfg.scheduler_min_load_score or 3)
  cfg.scheduler_sync_period = tonumber(cfg.scheduler_sync_period or 5)
  cfg.scheduler_expire_period = tonumber(cfg.scheduler_expire_period or 3000)
  cfg.scheduler_release_load_expire_period = tonumber(cfg.scheduler_release_load_expire_period or 600)
  return cfg
end
local crc_of = {}  -- a node's CRC: the CRC loop in Lua costs ~10 us, so it is kept in K_CRC
local function shard(node, cfg)
  local crc = crc_of[node]
  if not crc then
    crc = tonumber(redis.call('HGET', K_CRC, node))
    if not crc then
      crc = crc16(node)
      redis.call('HSET', K_CRC, node, crc)
    end
    crc_of[node] = crc
  end
  return crc % cfg.scheduler_load_shards_num
end
local function add_load(node, delta, cfg)
  if delta ~= 0 then redis.call('ZINCRBY', k_load(shard(node, cfg)), delta, node) end
end
local function ring(node)  -- a list of at most one element: trimmed, so it needs no TTL
  local bell = k_bell(node)
  redis.call('LPUSH', bell, '1')
  redis.call('LTRIM', bell, 0, 0)
end
local function push_result(req, result)
  local origin = redis.call('HGET', req, 'origin')
  if origin and origin ~= '' then
    result.request_id = redis.call('HGET', req, 'request_id')
    local shard = redis.call('HGET', req, 'result_shard')  -- splitwise: one list per origin reader
    local key = k_results((shard and shard ~= '') and (origin .. ':' .. shard) or origin)
    redis.call('RPUSH', key, cjson.encode(result))
    redis.call('EXPIRE', key, RETENTION)
  end
end
local function enqueue(uid, node, front, cfg, t)
  local length
  if front then length = redis.call('LPUSH', k_queue(node), uid) else
    length = redis.call('RPUSH', k_queue(node), uid) end
  add_load(node, 1, cfg)
  redis.call('HSET', k_req(uid), 'status', 'queued', 'queue_node', node)
  redis.call('ZADD', K_WAITING, t, uid)
  if length == 1 then ring(node) end  -- a node with work queued claims again without being woken
end
local function dequeue(uid, req, cfg)
  local holder = redis.call('HGET', req, 'queue_node')
  if holder and holder ~= '' then
    add_load(holder, -redis.call('LREM', k_queue(holder), 0, uid), cfg)
    redis.call('HSET', req, 'queue_node', '')
  else
    redis.call('LREM', K_PENDING, 0, uid)  -- splitwise: it was waiting for an eligible node
  end
end
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
local function expiry_message(req, ttl)
  local missing = redis.call('HGET', req, 'waiting_for')
  if missing and missing ~= '' then
    return 'no ' .. missing .. ' was available within scheduler_ttl=' .. ttl .. 's'
  end
  return 'waited longer than scheduler_ttl=' .. ttl .. 's'
end
local function close(uid, status, reason, code, message, extra)
  local req, out = k_req(uid), k_out(uid)
  release_charges(uid)
  redis.call('HSET', req, 'status', status, 'finish_reason', reason, 'error_code', code,
             'error_message', message, 'finished_at', fmt(now()), 'lease', '', unpack(extra))
  redis.call('ZREM', K_WAITING, uid)
  redis.call('ZREM', K_INFLIGHT, uid)
  redis.call('HDEL', K_IDS, redis.call('HGET', req, 'request_id'))
  redis.call('XADD', out, '*', 'type', 'done', 'status', status)
  count(status)
  if status == 'expired' then
    event('expired', 'request_id', redis.call('HGET', req, 'request_id'),
          'node', redis.call('HGET', req, 'home_node') or '', 'message', message)
  end
  local result = {finished = true, finish_reason = reason}
  if code ~= '' then result.error = {code = code, message = message} end
  push_result(req, result)
  redis.call('EXPIRE', req, RETENTION)
  redis.call('EXPIRE', out, RETENTION)
end
local function close_waiting(uid, status, message, cfg)
  dequeue(uid, k_req(uid), cfg)
  close(uid, status, status, status, message, {})
end
local function live_nodes(t, dead_after)
  return redis.call('ZRANGEBYSCORE', K_ALIVE, t - dead_after, '+inf')
end
local function least_loaded(nodes, cfg)
  local best, best_score = nil, nil
  for _, node in ipairs(nodes) do
    local table_key = k_load(shard(node, cfg))
    local score = tonumber(redis.call('ZSCORE', table_key, node) or 0)
    if best == nil or score < best_score then best, best_score = node, score end
  end
  return best
end
local function live_roles(t, cfg)
  -- splitwise: live (not stale: heard from within three sync periods) nodes by role
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
local function pick(nodes, rand)
  -- least loaded, at random among the best two so that placements do not herd
  local ranked = {}
  for _, node in ipairs(nodes) do
    table.insert(ranked, {node, tonumber(redis.call('HGET', K_PDLOAD, node) or 0)})
  end
  table.sort(ranked, function(a, b) return a[2] < b[2] end)
  return ranked[1 + math.floor(rand * math.min(#ranked, 2))][1]
end
local function place(uid, cfg, t, rand)
  -- splitwise placement: a prefill (or mixed) node and a decode node by load; only mixed nodes
  -- alive: one mixed node does it all. Returns the node it is queued on, or nil: it must wait.
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
    local capable = {}
    for _, node in ipairs(by_role.prefill) do table.insert(capable, node) end
    for _, node in ipairs(by_role.mixed) do table.insert(capable, node) end
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
  redis.call('HSET', req, 'status', 'queued', 'queue_node', '', 'home_node', '', 'waiting_for', missing)
  return nil
end
local function oldest_first(uids)  -- by first enqueue time, the order they were put in
  local entries = {}
  for _, uid in ipairs(uids) do
    table.insert(entries, {uid, tonumber(redis.call('HGET', k_req(uid), 'enqueued_at') or 0)})
  end
  table.sort(entries, function(a, b) return a[2] < b[2] end)
  local sorted = {}
  for i, entry in ipairs(entries) do sorted[i] = entry[1] end
  return sorted
end
local function requeue(uid, target, cfg, t, why)
  local req = k_req(uid)
  redis.call('ZREM', K_INFLIGHT, uid)
  if redis.call('HGET', req, 'cancel_requested') == '1' then  -- cancelled while its node was dying
    close(uid, 'cancelled', 'cancelled', 'cancelled', 'cancelled by the client', {})
    return false
  end
  event(why, 'request_id', redis.call('HGET', req, 'request_id'),
        'from', redis.call('HGET', req, 'executed_by') or '', 'to', target)
  redis.call('HSET', req, 'executed_by', '', 'lease', '')
  redis.call('HINCRBY', req, 'requeues', 1)
  enqueue(uid, target, true, cfg, t)
  return true
end
"""

# ARGV: prefix, retention, uid, request_id, home, payload, prompt_tokens, max_size, origin, rand,
# result shard ('' for one result list per origin).
# Returns {'ok', enqueue time} or {'full'} or {'duplicate'}. In splitwise mode the home is chosen here,
# from the live nodes' roles and loads; with no eligible node the request waits in K_PENDING.
SUBMIT = PRELUDE + """
local cfg = config()
local uid, home, max_size = ARGV[3], ARGV[5], tonumber(ARGV[8])
if max_size ~= -1 and redis.call('LLEN', k_queue(home)) >= max_size then return {'full'} end
local req = k_req(uid)
if redis.call('EXISTS', req) == 1 or redis.call('HSETNX', K_IDS, ARGV[4], uid) == 0 then
  return {'duplicate'}
end
local t = now()
redis.call('HSET', req, 'request_id', ARGV[4], 'home_node', home, 'enqueued_at', fmt(t),
           'ttl', cfg.scheduler_ttl, 'prompt_tokens', ARGV[7], 'payload', ARGV[6], 'origin', ARGV[9],
           'attempt', 0, 'num_output_tokens', 0, 'result_shard', ARGV[11])
count('submitted')
-- no EXPIRE while it waits: TTL eviction ends it (a raised TTL too)
if cfg.scheduler_name ~= 'splitwise' then
  enqueue(uid, home, false, cfg, t)
elseif not place(uid, cfg, t, tonumber(ARGV[10])) then
  redis.call('RPUSH', K_PENDING, uid)
  redis.call('ZADD', K_WAITING, t, uid)
end
return {'ok', fmt(t)}
"""

# Steal for ``node``: pick a victim among the most loaded nodes at or above scheduler_min_load_score
# (randomly among the top three, so thieves do not herd) and move up to half its queue, at most half
# the thief's batch (at least one), from the head of its queue to the thief's. Returns how many moved.
_STEAL = """
local function steal(node, cfg, rand, batch)
  local candidates = {}
  for shard = 0, cfg.scheduler_load_shards_num - 1 do
    local top = redis.call('ZREVRANGEBYSCORE', k_load(shard), '+inf', cfg.scheduler_min_load_score,
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
  if moved > 0 then event('steal', 'node', node, 'from', victim[1], 'count', moved) end
  return moved
end
"""

# ARGV: prefix, retention, node, n, may_steal ('1'/'0'), rand in [0,1), lease seconds,
#       available_blocks (-1: no budget), block_size, reserved_output_blocks, max_num_batched_tokens.
# Claims up to n requests from the node's own queue (stealing once when it is empty, in global mode),
# FIFO, within the KV-block and token budgets. Overdue ones are expired instead of handed out.
# Returns a list of {uid, lease, payload, tokens already streamed, home node, splitwise phase}.
CLAIM = PRELUDE + _STEAL + """
local cfg = config()
local node, n, lease_s = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[7])
local blocks_left, block_size = tonumber(ARGV[8]), tonumber(ARGV[9])
local reserved, tokens_left = tonumber(ARGV[10]), tonumber(ARGV[11])
local budgeted = blocks_left >= 0
if n < 1 or (budgeted and blocks_left <= reserved) then return {} end
local own, t, stole, claimed, popped = k_queue(node), now(), false, {}, 0
while #claimed < n do
  local uid = redis.call('LINDEX', own, 0)
  if not uid then
    if stole or ARGV[5] ~= '1' or cfg.scheduler_name ~= 'global' then break end
    stole = true
    if steal(node, cfg, tonumber(ARGV[6]), n) == 0 then break end
  else
    local req = k_req(uid)
    local f = redis.call('HMGET', req, 'status', 'prompt_tokens', 'attempt', 'started_at', 'payload',
                        'num_output_tokens', 'home_node', 'phase')
    local waited = tonumber(redis.call('ZSCORE', K_WAITING, uid) or t)
    if f[1] ~= 'queued' then
      redis.call('LPOP', own)  -- a stale id whose request ended elsewhere
      popped = popped + 1
    elseif t - waited >= cfg.scheduler_ttl then
      add_load(node, -popped, cfg)
      popped = 0
      close_waiting(uid, 'expired', expiry_message(req, cfg.scheduler_ttl), cfg)
    else
      if budgeted then
        local prompt = tonumber(f[2])
        local need = math.ceil(prompt / block_size) + reserved
        if need > blocks_left or (#claimed > 0 and prompt > tokens_left) then break end
        blocks_left, tokens_left = blocks_left - need, tokens_left - prompt
      end
      redis.call('LPOP', own)
      popped = popped + 1
      local lease = node .. '#' .. (tonumber(f[3]) + 1)
      redis.call('HSET', req, 'status', 'running', 'executed_by', node, 'lease', lease, 'queue_node', '',
                 'attempt', tonumber(f[3]) + 1, 'started_at', f[4] or fmt(t))
      redis.call('EXPIRE', req, 86400 + RETENTION)
      redis.call('ZREM', K_WAITING, uid)
      redis.call('ZADD', K_INFLIGHT, t + lease_s, uid)
      table.insert(claimed, {uid, lease, f[5], f[6], f[7], f[8] or ''})
    end
  end
end
add_load(node, -popped, cfg)
return claimed
"""

# Streaming a token and finishing, for EMIT, FINISH and EMIT_FINISH (a final result carrying the last
# token: one script instead of two).
_STREAM = """
local function holds(req, lease)  -- the caller's lease is the current one of a running request
  return redis.call('HGET', req, 'status') == 'running' and redis.call('HGET', req, 'lease') == lease
end
local function emit(uid, req, index, token_id, text, lease_s)
  -- 1 when a cancel was asked, 0 to go on, -2 when index is not the next one
  if tonumber(redis.call('HGET', req, 'num_output_tokens')) ~= index then return -2 end
  local t = now()
  redis.call('XADD', k_out(uid), '*', 'type', 'token', 'index', index, 'token_id', token_id, 'text', text)
  redis.call('EXPIRE', k_out(uid), 86400 + RETENTION)
  if index == 0 then redis.call('HSET', req, 'first_token_at', fmt(t)) end
  redis.call('HSET', req, 'num_output_tokens', index + 1)
  count('tokens')
  redis.call('ZADD', K_INFLIGHT, 'XX', t + lease_s, uid)
  redis.call('ZADD', K_CHARGES, 'XX', t, uid)
  push_result(req, {index = index, token_id = tonumber(token_id), text = text})
  if redis.call('HGET', req, 'cancel_requested') == '1' then return 1 end
  return 0
end
local function finish(uid, req, final, reason, output_ids, code, message)
  if final == 'finished' and redis.call('HGET', req, 'cancel_requested') == '1' then
    final, reason = 'cancelled', 'cancelled'  -- the client cancelled; the runner did not notice in time
  end
  close(uid, final, reason, code, message, {'output_token_ids', output_ids})
  return final
end
"""

# ARGV: prefix, retention, uid, lease, index, token_id, text, lease seconds.
# Returns 1 when a cancel was asked, 0 to go on, -1 when the lease is no longer the caller's,
# -2 when the index is not the next one (each index is streamed exactly once, in order).
EMIT = PRELUDE + _STREAM + """
local uid, lease = ARGV[3], ARGV[4]
local req = k_req(uid)
if not holds(req, lease) then return -1 end
return emit(uid, req, tonumber(ARGV[5]), ARGV[6], ARGV[7], tonumber(ARGV[8]))
"""

# ARGV: prefix, retention, uid, lease, status, finish_reason, output ids JSON, error code, message.
# Returns the status the request ends with, or its current one when the lease is not the caller's.
FINISH = PRELUDE + _STREAM + """
local uid, lease = ARGV[3], ARGV[4]
local req = k_req(uid)
if not holds(req, lease) then return redis.call('HGET', req, 'status') or 'missing' end
return finish(uid, req, ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9])
"""

# ARGV: prefix, retention, uid, lease, index, token_id, text, lease seconds, then FINISH's status,
# finish_reason, output ids JSON, error code, message. EMIT then FINISH in one step; returns
# {EMIT's reply, FINISH's reply}. A token out of order is not streamed, and the request still ends.
EMIT_FINISH = PRELUDE + _STREAM + """
local uid, lease = ARGV[3], ARGV[4]
local req = k_req(uid)
if not holds(req, lease) then return {-1, redis.call('HGET', req, 'status') or 'missing'} end
local emitted = emit(uid, req, tonumber(ARGV[5]), ARGV[6], ARGV[7], tonumber(ARGV[8]))
return {emitted, finish(uid, req, ARGV[9], ARGV[10], ARGV[11], ARGV[12], ARGV[13])}
"""

# ARGV: prefix, retention, uid. Returns 'cancelled' (was waiting), 'cancelling' (running: the node
# stops at its next token) or the unchanged final status.
CANCEL = PRELUDE + """
local cfg, uid = config(), ARGV[3]
local status = redis.call('HGET', k_req(uid), 'status')
if not status then return 'missing' end
if status == 'queued' then
  close_waiting(uid, 'cancelled', 'cancelled by the client', cfg)
  return 'cancelled'
end
if status == 'running' then
  redis.call('HSET', k_req(uid), 'cancel_requested', '1')
  return 'cancelling'
end
return status
"""

# ARGV: prefix, retention, limit. Evicts every request that waited scheduler_ttl seconds.
EXPIRE_DUE = PRELUDE + """
local cfg = config()
local ttl = cfg.scheduler_ttl
local due = redis.call('ZRANGEBYSCORE', K_WAITING, '-inf', now() - ttl, 'LIMIT', 0, tonumber(ARGV[3]))
local expired = {}
for _, uid in ipairs(due) do
  if redis.call('HGET', k_req(uid), 'status') == 'queued' then
    close_waiting(uid, 'expired', expiry_message(k_req(uid), ttl), cfg)
    table.insert(expired, uid)
  else
    redis.call('ZREM', K_WAITING, uid)
  end
end
return expired
"""

# ARGV: prefix, retention, limit, dead_after seconds, rand. Running requests whose lease ran out (their
# node died) go back to the front of a queue: their home node's when it is alive (always, in local
# mode), else the least loaded live node. Returns {uid, node} pairs.
RECOVER = PRELUDE + """
local function splitwise_target(req, cfg, t, rand)
  -- the node of the phase it is in when still live, else a live node of the right role (its load
  -- charge moves along), else the same node: the request waits for it (and for its TTL)
  local decode = redis.call('HGET', req, 'phase') == 'decode'
  local field, charge = decode and 'decode_node' or 'prefill_node', decode and 'charge_d' or 'charge_p'
  local current = redis.call('HGET', req, field)
  local by_role = live_roles(t, cfg)
  local candidates = decode and by_role.decode or {}
  if not decode then
    for _, node in ipairs(by_role.prefill) do table.insert(candidates, node) end
    for _, node in ipairs(by_role.mixed) do table.insert(candidates, node) end
  end
  for _, node in ipairs(candidates) do
    if node == current then return current end
  end
  if #candidates == 0 then return current end
  local target = pick(candidates, rand)
  local amount = tonumber(redis.call('HGET', req, charge) or 0)
  redis.call('HINCRBY', K_PDLOAD, current, -amount)
  redis.call('HINCRBY', K_PDLOAD, target, amount)
  redis.call('HSET', req, field, target)
  return target
end
local cfg, t = config(), now()
local due = oldest_first(redis.call('ZRANGEBYSCORE', K_INFLIGHT, '-inf', t, 'LIMIT', 0, tonumber(ARGV[3])))
local live = live_nodes(t, tonumber(ARGV[4]))
local is_live = {}
for _, node in ipairs(live) do is_live[node] = true end
local moved = {}
for i = #due, 1, -1 do  -- backwards: each goes to the front, so the oldest ends up first
  local uid = due[i]
  local req = k_req(uid)
  if redis.call('HGET', req, 'status') == 'running' then
    local target = redis.call('HGET', req, 'home_node')
    if cfg.scheduler_name == 'global' and not is_live[target] and #live > 0 then
      target = least_loaded(live, cfg)
    elseif cfg.scheduler_name == 'splitwise' then
      target = splitwise_target(req, cfg, t, tonumber(ARGV[5]))
    end
    if requeue(uid, target, cfg, t, 'failover') then table.insert(moved, {uid, target}) end
  else
    redis.call('ZREM', K_INFLIGHT, uid)
  end
end
return moved
"""

# ARGV: prefix, retention, node. A node starting under a name that still holds running requests
# (it died and came back before its leases ran out) takes them back at the front of its own queue.
RECLAIM = PRELUDE + """
local cfg, t, node = config(), now(), ARGV[3]
local taken = {}
local held = oldest_first(redis.call('ZRANGE', K_INFLIGHT, 0, -1))
for i = #held, 1, -1 do  -- backwards: each goes to the front, so the oldest ends up first
  local uid = held[i]
  local req = k_req(uid)
  if redis.call('HGET', req, 'status') == 'running' and redis.call('HGET', req, 'executed_by') == node then
    if requeue(uid, node, cfg, t, 'reclaimed') then table.insert(taken, uid) end
  end
end
return taken
"""

# ARGV: prefix, retention, dead_after seconds, limit. Global mode: the queues of nodes that are not
# alive are spread over the live nodes (least loaded first). Returns how many requests moved.
REHOME = PRELUDE + """
local cfg, t = config(), now()
if cfg.scheduler_name ~= 'global' then return 0 end
local live = live_nodes(t, tonumber(ARGV[3]))
if #live == 0 then return 0 end
local is_live = {}
for _, node in ipairs(live) do is_live[node] = true end
local moved, limit = 0, tonumber(ARGV[4])
for shard = 0, cfg.scheduler_load_shards_num - 1 do
  for _, node in ipairs(redis.call('ZRANGEBYSCORE', k_load(shard), 1, '+inf')) do
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
    if moved > before then event('rehomed', 'from', node, 'count', moved - before) end
  end
end
return moved
"""

# ARGV: prefix, retention, lease seconds, node, accepts work ('1'/'0'), role, then uid, lease pairs. The
# node's heartbeat: renews the leases it still holds, and marks it alive for failover and re-homing
# only while it takes new work (a draining or disabled node is not a target).
RENEW = PRELUDE + """
local t, lease_s, node = now(), tonumber(ARGV[3]), ARGV[4]
if ARGV[5] == '1' then redis.call('ZADD', K_ALIVE, t, node) else redis.call('ZREM', K_ALIVE, node) end
redis.call('HSET', K_ROLES, node, ARGV[6])
redis.call('ZADD', K_SEEN, t, node)
local renewed = 0
for i = 7, #ARGV, 2 do
  if redis.call('HGET', k_req(ARGV[i]), 'lease') == ARGV[i + 1] then
    redis.call('ZADD', K_INFLIGHT, 'XX', t + lease_s, ARGV[i])
    renewed = renewed + 1
  end
end
return renewed
"""

# ARGV: prefix, retention, config JSON. Publishes a configuration; when the shard count changes,
# every node's score moves to its new table in the same step.
PUBLISH_CONFIG = PRELUDE + """
local old = config()
local new = cjson.decode(ARGV[3])
redis.call('SET', K_CONFIG, ARGV[3])
redis.call('SET', K_SCHED, cjson.encode({
  scheduler_name = new.scheduler_name, scheduler_ttl = new.scheduler_ttl,
  scheduler_load_shards_num = new.scheduler_load_shards_num,
  scheduler_min_load_score = new.scheduler_min_load_score,
  scheduler_sync_period = new.scheduler_sync_period,
  scheduler_expire_period = new.scheduler_expire_period,
  scheduler_release_load_expire_period = new.scheduler_release_load_expire_period}))
local new_n = tonumber(new.scheduler_load_shards_num or 1)
if new_n == old.scheduler_load_shards_num then return 0 end
local scores = {}
for shard = 0, old.scheduler_load_shards_num - 1 do
  local members = redis.call('ZRANGE', k_load(shard), 0, -1, 'WITHSCORES')
  for i = 1, #members, 2 do table.insert(scores, {members[i], members[i + 1]}) end
  redis.call('DEL', k_load(shard))
end
for _, entry in ipairs(scores) do
  redis.call('ZINCRBY', k_load(crc16(entry[1]) % new_n), entry[2], entry[1])
end
return #scores
"""

# ARGV: prefix, retention, uid, lease, bytes, milliseconds. The prefill node wrote the KV cache and
# streamed the first token: the request goes to its decode node's queue, the prefill load is released.
HANDOFF = PRELUDE + """
local uid, lease = ARGV[3], ARGV[4]
local req = k_req(uid)
if redis.call('HGET', req, 'status') ~= 'running' or redis.call('HGET', req, 'lease') ~= lease then
  return 0
end
local cfg, t = config(), now()
release_charge(req, 'charge_p', 'prefill_node')
redis.call('ZREM', K_INFLIGHT, uid)
redis.call('HSET', req, 'lease', '', 'executed_by', '', 'phase', 'decode', 'handoff_bytes', ARGV[5],
           'handoff_ms', ARGV[6])
enqueue(uid, redis.call('HGET', req, 'decode_node'), false, cfg, t)
return 1
"""

# ARGV: prefix, retention, rand, limit. Splitwise: places waiting requests once eligible nodes are
# live (their TTL clock keeps running from when they were put). Returns how many were placed.
PLACE_PENDING = PRELUDE + """
local cfg = config()
if cfg.scheduler_name ~= 'splitwise' then return 0 end
local t, placed = now(), 0
for _, uid in ipairs(redis.call('LRANGE', K_PENDING, 0, tonumber(ARGV[4]) - 1)) do
  local req = k_req(uid)
  if redis.call('HGET', req, 'status') ~= 'queued' or redis.call('HGET', req, 'queue_node') ~= '' then
    redis.call('LREM', K_PENDING, 0, uid)
  else
    local since = tonumber(redis.call('ZSCORE', K_WAITING, uid) or t)
    if not place(uid, cfg, since, tonumber(ARGV[3])) then break end
    redis.call('LREM', K_PENDING, 0, uid)
    placed = placed + 1
  end
end
return placed
"""

# ARGV: prefix, retention, rand, limit. Splitwise upkeep: a node silent for scheduler_expire_period is
# removed from the registry and its queue goes back to placement (a decode-phase request to another
# decode node); load charged to a request silent for scheduler_release_load_expire_period is released
# (a leak guard). Returns how many requests moved.
SPLITWISE_UPKEEP = PRELUDE + """
local cfg = config()
if cfg.scheduler_name ~= 'splitwise' then return 0 end
local t, rand, moved = now(), tonumber(ARGV[3]), 0
for _, node in ipairs(redis.call('ZRANGEBYSCORE', K_SEEN, '-inf', t - cfg.scheduler_expire_period)) do
  local before = moved
  redis.call('HDEL', K_ROLES, node)
  redis.call('ZREM', K_SEEN, node)
  redis.call('ZREM', K_ALIVE, node)
  while moved < tonumber(ARGV[4]) do
    local uid = redis.call('LPOP', k_queue(node))
    if not uid then break end
    add_load(node, -1, cfg)
    local req = k_req(uid)
    redis.call('HSET', req, 'queue_node', '')
    local decoders = live_roles(t, cfg).decode
    if redis.call('HGET', req, 'phase') == 'decode' and #decoders > 0 then
      local target = pick(decoders, rand)
      local amount = tonumber(redis.call('HGET', req, 'charge_d') or 0)
      redis.call('HINCRBY', K_PDLOAD, node, -amount)
      redis.call('HINCRBY', K_PDLOAD, target, amount)
      redis.call('HSET', req, 'decode_node', target)
      enqueue(uid, target, false, cfg, tonumber(redis.call('ZSCORE', K_WAITING, uid) or t))
    elseif redis.call('HGET', req, 'phase') ~= 'decode' then
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
"""
