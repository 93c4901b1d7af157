-- The request lifecycle, every mode: submit, claim, stream each token, finish, cancel, expire by TTL,
-- and the node's heartbeat that renews its leases. Python side: scheduler/store.py.
--
-- A request moves queued -> running -> finished | failed | cancelled, or queued -> expired |
-- cancelled, each step one script on the server's clock, so it happens exactly once. Running, it is
-- held under a lease (node#attempt) that its node renews; only the current lease may stream or end it.

local function expiry_message(req, ttl)
  local missing = redis.call('HGET', req, 'waiting_for')
  if missing and missing ~= '' then
    return 'no ' .. missing .. ' was available within scheduler_ttl=' .. ttl .. 's'
  end
  return 'waited longer than scheduler_ttl=' .. ttl .. 's'
end

-- A finished request's latencies for /metrics, from its hash's times (all on the server's clock):
-- end to end and time to first token from its first enqueue, time queued until its first claim.
local function observe_latencies(req, t)
  local f = redis.call('HMGET', req, 'enqueued_at', 'started_at', 'first_token_at')
  local enqueued, started, first_token = tonumber(f[1]), tonumber(f[2]), tonumber(f[3])
  if not enqueued then return end
  observe('e2e', BUCKETS_E2E, math.max(0, t - enqueued))
  if started then observe('queue', BUCKETS_QUEUE, math.max(0, started - enqueued)) end
  if first_token then observe('ttft', BUCKETS_TTFT, math.max(0, first_token - enqueued)) end
end

-- The one way a request ends: its final state, one done entry in its output stream, one counter (and
-- a finished one's latencies), its final result for the origin, and a TTL on what Redis keeps of it.
local function close(uid, status, reason, code, message, extra)
  local req, out, t = k_req(uid), k_out(uid), now()
  release_charges(uid)
  redis.call('HSET', req, 'status', status, 'finish_reason', reason, 'error_code', code,
             'error_message', message, 'finished_at', fmt(t), 'lease', '', unpack(extra))
  redis.call('ZREM', K_WAITING, uid)
  redis.call('ZREM', K_INFLIGHT, uid)
  redis.call('HDEL', K_IDS, redis.call('HGET', req, 'request_id'))
  redis.call('XADD', out, '*', 'type', 'done', 'status', status)
  count(status)
  if status == FINISHED then observe_latencies(req, t) end
  if status == EXPIRED then
    event('expired', 'request_id', redis.call('HGET', req, 'request_id'),
          'node', redis.call('HGET', req, 'home_node') or '', 'message', message)
  end
  local result = {finished = true, finish_reason = reason}
  if code ~= '' then result.error = {code = code, message = message} end
  push_result(req, result)
  -- kept until the console's database has it (``RequestStore.recorded`` shortens it to RETENTION then),
  -- a day at most: an outage of the database must not lose the end of a request
  redis.call('EXPIRE', req, 86400 + RETENTION)
  redis.call('EXPIRE', out, 86400 + RETENTION)
end
local function close_waiting(uid, status, message, cfg)
  dequeue(uid, k_req(uid), cfg)
  close(uid, status, status, status, message, {})
end

local function holds(req, lease)  -- the caller's lease is the current one of a running request
  return redis.call('HGET', req, 'status') == RUNNING and redis.call('HGET', req, 'lease') == lease
end
local function stream_token(uid, req, index, token_id, text, lease_s)
  if tonumber(redis.call('HGET', req, 'num_output_tokens')) ~= index then return EMIT_OUT_OF_ORDER end
  local t = now()
  redis.call('XADD', k_out(uid), '*', 'type', 'token', 'index', index, 'token_id', token_id, 'text', text)
  redis.call('EXPIRE', k_out(uid), 86400 + RETENTION)
  if index == 0 then redis.call('HSET', req, 'first_token_at', fmt(t)) end
  redis.call('HSET', req, 'num_output_tokens', index + 1)
  count('tokens')
  redis.call('ZADD', K_INFLIGHT, 'XX', t + lease_s, uid)
  redis.call('ZADD', K_CHARGES, 'XX', t, uid)
  push_result(req, {index = index, token_id = tonumber(token_id), text = text})
  if redis.call('HGET', req, 'cancel_requested') == '1' then return EMIT_CANCEL_ASKED end
  return EMIT_GO_ON
end
local function end_request(uid, req, status, reason, output_ids, code, message)
  if status == FINISHED and redis.call('HGET', req, 'cancel_requested') == '1' then
    status, reason = CANCELLED, 'cancelled'  -- the client cancelled; the runner did not notice in time
  end
  close(uid, status, reason, code, message, {'output_token_ids', output_ids})
  return status
end

-- A new request hash, queued on node home (splitwise: placed, or pending with no eligible node), waiting
-- since t. Returns {SUBMIT_OK, t} or {SUBMIT_DUPLICATE}.
local function queue_new(uid, request_id, home, payload, prompt_tokens, origin, rand, result_shard, t, cfg)
  local req = k_req(uid)
  if redis.call('EXISTS', req) == 1 or redis.call('HSETNX', K_IDS, request_id, uid) == 0 then
    return {SUBMIT_DUPLICATE}
  end
  redis.call('HSET', req, 'request_id', request_id, 'home_node', home, 'enqueued_at', fmt(t),
             'ttl', cfg.scheduler_ttl, 'prompt_tokens', prompt_tokens, 'payload', payload, 'origin', origin,
             'attempt', 0, 'num_output_tokens', 0, 'result_shard', result_shard)
  count('submitted')
  -- no EXPIRE while it waits: TTL eviction ends it (a raised TTL too)
  if cfg.scheduler_name ~= 'splitwise' then
    enqueue(uid, home, false, cfg, t)
  elseif not place(uid, cfg, t, tonumber(rand)) then
    redis.call('RPUSH', K_PENDING, uid)
    redis.call('ZADD', K_WAITING, t, uid)
  end
  return {SUBMIT_OK, fmt(t)}
end

-- @script submit
-- Queues one request on node home, or, in splitwise mode, on the nodes placement chooses from the
-- live nodes' roles and loads (with no eligible node it waits in the pending list). max_size is
-- UNBOUNDED except in local mode. Returns {SUBMIT_OK, enqueue time} or {SUBMIT_FULL} or {SUBMIT_DUPLICATE}.
local function submit(uid, request_id, home, payload, prompt_tokens, max_size, origin, rand, result_shard)
  local cfg = need_config()
  max_size = tonumber(max_size)
  if max_size ~= UNBOUNDED and redis.call('LLEN', k_queue(home)) >= max_size then return {SUBMIT_FULL} end
  return queue_new(uid, request_id, home, payload, prompt_tokens, origin, rand, result_shard, now(), cfg)
end

-- @script resubmit
-- Queues again a request this Redis no longer knows (it restarted without its data), from the console's
-- record: as submit, but waiting since waiting_since (server seconds: its TTL runs from then), with
-- the tokens the record holds (output_ids and their texts, JSON lists) streamed again first, so that a
-- node resumes after them as after a failover, and with leases numbered from attempt on, so that no
-- run from before the loss can hold one. Never refused for a full queue: it was accepted long ago.
-- Returns {SUBMIT_OK, t} or {SUBMIT_DUPLICATE} (it is known here after all).
local function resubmit(uid, request_id, home, payload, prompt_tokens, waiting_since, output_ids, texts, attempt)
  local cfg = need_config()
  local reply = queue_new(uid, request_id, home, payload, prompt_tokens, '', 0, '', tonumber(waiting_since),
                          cfg)
  if reply[1] ~= SUBMIT_OK then return reply end
  local req, out, ids, pieces = k_req(uid), k_out(uid), cjson.decode(output_ids), cjson.decode(texts)
  for i, token_id in ipairs(ids) do
    redis.call('XADD', out, '*', 'type', 'token', 'index', i - 1, 'token_id', token_id, 'text', pieces[i])
  end
  if #ids > 0 then redis.call('EXPIRE', out, 86400 + RETENTION) end
  redis.call('HSET', req, 'num_output_tokens', #ids, 'attempt', tonumber(attempt), 'requeues', 1)
  event('resubmitted', 'request_id', request_id, 'to', home, 'tokens', #ids)
  return reply
end

-- @script claim
-- Claims up to n requests from node's own queue (stealing once when it is empty, in global mode, if
-- may_steal is '1'), FIFO, within the KV-block and token budgets (available_blocks -1: no budget;
-- FastDeploy's get_requests rules). Overdue ones are expired instead of handed out. Returns a list
-- of {uid, lease, payload, tokens already streamed, home node, splitwise phase}.
local function claim(node, n, may_steal, rand, lease_s, available_blocks, block_size, reserved_output_blocks,
                     max_num_batched_tokens)
  n, lease_s = tonumber(n), tonumber(lease_s)
  local blocks_left, tokens_left = tonumber(available_blocks), tonumber(max_num_batched_tokens)
  local reserved = tonumber(reserved_output_blocks)
  block_size = tonumber(block_size)
  local budgeted = blocks_left >= 0
  if n < 1 or (budgeted and blocks_left <= reserved) then return {} end
  local cfg = config()
  if not cfg then return {} end  -- nothing is queued before a configuration is published
  local own, t, stole, claimed, popped = k_queue(node), now(), false, {}, 0
  while #claimed < n do
    local uid = redis.call('LINDEX', own, 0)
    if not uid then
      if stole or may_steal ~= '1' or cfg.scheduler_name ~= 'global' then break end
      stole = true
      if steal(node, cfg, tonumber(rand), n) == 0 then break end
    else
      local req = k_req(uid)
      local f = redis.call('HMGET', req, 'status', 'prompt_tokens', 'attempt', 'started_at', 'payload',
                          'num_output_tokens', 'home_node', 'phase')
      local waited = tonumber(redis.call('ZSCORE', K_WAITING, uid) or t)
      if f[1] ~= QUEUED then
        redis.call('LPOP', own)  -- a stale id whose request ended elsewhere
        popped = popped + 1
      elseif t - waited >= cfg.scheduler_ttl then
        add_load(node, -popped, cfg)
        popped = 0
        close_waiting(uid, EXPIRED, expiry_message(req, cfg.scheduler_ttl), cfg)
      else
        if budgeted then
          local prompt = tonumber(f[2])
          local need = math.ceil(prompt / block_size) + reserved
          if need > blocks_left or (#claimed > 0 and prompt > tokens_left) then break end
          blocks_left, tokens_left = blocks_left - need, tokens_left - prompt
        end
        redis.call('LPOP', own)
        popped = popped + 1
        if not f[4] then tally('prompt_tokens', tonumber(f[2])) end  -- its first claim: its prompt starts
        local lease = node .. '#' .. (tonumber(f[3]) + 1)
        redis.call('HSET', req, 'status', RUNNING, 'executed_by', node, 'lease', lease, 'queue_node', '',
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
end

-- @script emit
-- Streams token index under lease. Returns EMIT_GO_ON, EMIT_CANCEL_ASKED (the client cancelled: stop
-- and finish), EMIT_LEASE_LOST (the lease is no longer the caller's), or EMIT_OUT_OF_ORDER (index is
-- not the next one: each index is streamed exactly once, in order).
local function emit(uid, lease, index, token_id, text, lease_s)
  local req = k_req(uid)
  if not holds(req, lease) then return EMIT_LEASE_LOST end
  return stream_token(uid, req, tonumber(index), token_id, text, tonumber(lease_s))
end

-- @script finish
-- Records the final status of a running request (output_token_ids as JSON). Returns the status it
-- ends with, or its current one (MISSING when Redis does not know it) when the lease is not the
-- caller's.
local function finish(uid, lease, status, finish_reason, output_token_ids, error_code, error_message)
  local req = k_req(uid)
  if not holds(req, lease) then return redis.call('HGET', req, 'status') or MISSING end
  return end_request(uid, req, status, finish_reason, output_token_ids, error_code, error_message)
end

-- @script emit_finish
-- emit then finish in one step, for a final result that carries the last token. Returns {emit's
-- reply, finish's reply}. A token out of order is not streamed, and the request still ends.
local function emit_finish(uid, lease, index, token_id, text, lease_s, status, finish_reason,
                           output_token_ids, error_code, error_message)
  local req = k_req(uid)
  if not holds(req, lease) then return {EMIT_LEASE_LOST, redis.call('HGET', req, 'status') or MISSING} end
  local emitted = stream_token(uid, req, tonumber(index), token_id, text, tonumber(lease_s))
  return {emitted, end_request(uid, req, status, finish_reason, output_token_ids, error_code, error_message)}
end

-- @script cancel
-- Returns CANCELLED (it was waiting: it ended now), CANCELLING (running: its node stops at its next
-- token), the unchanged final status, or MISSING.
local function cancel(uid)
  local req = k_req(uid)
  local status = redis.call('HGET', req, 'status')
  if not status then return MISSING end
  if status == QUEUED then
    close_waiting(uid, CANCELLED, 'cancelled by the client', need_config())
    return CANCELLED
  end
  if status == RUNNING then
    redis.call('HSET', req, 'cancel_requested', '1')
    return CANCELLING
  end
  return status
end

-- @script expire_due
-- Evicts up to limit requests that waited scheduler_ttl seconds. Returns their uids.
local function expire_due(limit)
  local cfg = config()
  if not cfg then return {} end
  local ttl = cfg.scheduler_ttl
  local due = redis.call('ZRANGEBYSCORE', K_WAITING, '-inf', now() - ttl, 'LIMIT', 0, tonumber(limit))
  local expired = {}
  for _, uid in ipairs(due) do
    if redis.call('HGET', k_req(uid), 'status') == QUEUED then
      close_waiting(uid, EXPIRED, expiry_message(k_req(uid), ttl), cfg)
      table.insert(expired, uid)
    else
      redis.call('ZREM', K_WAITING, uid)
    end
  end
  return expired
end

-- @script renew
-- The node's heartbeat: renews the leases it still holds (uid, lease pairs after role), records its
-- role, and marks it alive for failover and re-homing only while it takes new work (accepts_work
-- '1': a draining or disabled node is not a target). Returns how many leases it renewed.
local function renew(lease_s, node, accepts_work, role, ...)
  local t, held = now(), {...}
  if accepts_work == '1' then redis.call('ZADD', K_ALIVE, t, node) else redis.call('ZREM', K_ALIVE, node) end
  redis.call('HSET', K_ROLES, node, role)
  redis.call('ZADD', K_SEEN, t, node)
  local renewed = 0
  for i = 1, #held, 2 do
    if redis.call('HGET', k_req(held[i]), 'lease') == held[i + 1] then
      redis.call('ZADD', K_INFLIGHT, 'XX', t + tonumber(lease_s), held[i])
      renewed = renewed + 1
    end
  end
  return renewed
end

-- @script publish_config
-- Publishes a configuration: the whole of it (config_json, what the console and the nodes read) and
-- the parameters the scripts read on every call (script_json). When the shard count changes, every
-- node's score moves to its new table in the same step. Returns how many scores moved.
local function publish_config(config_json, script_json)
  local old = config()
  local new_n = cjson.decode(script_json).scheduler_load_shards_num
  redis.call('SET', K_CONFIG, config_json)
  redis.call('SET', K_SCHED, script_json)
  if not old or new_n == old.scheduler_load_shards_num then return 0 end
  local scores = {}
  for shard_index = 0, old.scheduler_load_shards_num - 1 do
    local members = redis.call('ZRANGE', k_load(shard_index), 0, -1, 'WITHSCORES')
    for i = 1, #members, 2 do table.insert(scores, {members[i], members[i + 1]}) end
    redis.call('DEL', k_load(shard_index))
  end
  for _, entry in ipairs(scores) do
    redis.call('ZINCRBY', k_load(crc16(entry[1]) % new_n), entry[2], entry[1])
  end
  return #scores
end
