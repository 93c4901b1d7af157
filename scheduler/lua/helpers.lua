-- Shared helpers of every topic script: key names, the server's clock, the topic's configuration,
-- load scores, the bell, results for the origin, and putting a request in a node's queue.
--
-- How a topic script is called (scheduler/scripts.py assembles and runs it):
--   KEYS[1] = the topic's config key: Redis Cluster routes the call to the topic's slot
--   ARGV[1] = the topic's key prefix, fd:{topic}:
--   ARGV[2] = seconds Redis keeps a finished request's hash and output stream
--   ARGV[3..] = the script's own arguments: the parameters of its function, in order
-- The UPPER_CASE names without a definition here (KEY_REQ, QUEUED, SUBMIT_OK, EMIT_GO_ON, UNBOUNDED...)
-- are constants Python defines (key suffixes, request statuses, reply codes): the assembly writes their
-- values in their place (scheduler/scripts.py), so that each is spelled once.
--
-- Invariants every script keeps:
-- * a queued request's uid is in exactly one node queue (the hash field queue_node names it) or, in
--   splitwise mode, in the pending list, and in the waiting set; a running one is in no queue and in
--   inflight under a lease (node#attempt); a final one is in neither;
-- * a node's load score (its entry in its shard's load table) equals the length of its queue: every
--   push, pop or removal changes both in the same script, so scores never drift;
-- * only the holder of the current lease may stream tokens or finish.

local K_CONFIG = KEYS[1]
local P = ARGV[1]
local RETENTION = tonumber(ARGV[2])

local function k_req(uid) return P .. KEY_REQ .. uid end
local function k_out(uid) return P .. KEY_OUT .. uid end
local function k_queue(node) return RQ_QUEUE_PREFIX .. P .. KEY_NODE .. node end
local function k_load(shard) return P .. KEY_LOAD .. shard end
local function k_bell(node) return P .. KEY_BELL .. node end
local function k_results(origin) return P .. KEY_RESULTS .. origin end
local K_WAITING = P .. KEY_WAITING
local K_INFLIGHT = P .. KEY_INFLIGHT
local K_ALIVE = P .. KEY_ALIVE
local K_IDS = P .. KEY_IDS
local K_CRC = P .. KEY_CRC
local K_SCHED = P .. KEY_SCHED
local K_ROLES = P .. KEY_ROLES
local K_PDLOAD = P .. KEY_PDLOAD
local K_PENDING = P .. KEY_PENDING
local K_SEEN = P .. KEY_SEEN
local K_CHARGES = P .. KEY_CHARGES
local K_EVENTS = P .. KEY_EVENTS
local K_STATS = P .. KEY_STATS
local K_METRICS = P .. KEY_METRICS

local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.6f', x) end

local function event(kind, ...)  -- the console's event feed: a capped stream, fields after the kind
  redis.call('XADD', K_EVENTS, 'MAXLEN', '~', EVENTS_KEPT, '*', 'kind', kind, 'at', fmt(now()), ...)
end
local function count(field, n) redis.call('HINCRBY', K_STATS, field, n or 1) end
-- What /metrics reads beside K_STATS (scheduler/keys.py: metrics): a counter, and one observation of
-- a histogram whose bucket bounds are the string buckets ('0.001:0.005:...'): its bucket (the first
-- bound at or above seconds, else +Inf; not cumulative, the console sums them) and its sum.
local function tally(field, n) redis.call('HINCRBY', K_METRICS, field, n or 1) end
local function observe(name, buckets, seconds)
  local le = '+Inf'
  for bound in string.gmatch(buckets, '[^:]+') do
    if seconds <= tonumber(bound) then
      le = bound
      break
    end
  end
  redis.call('HINCRBY', K_METRICS, name .. ':' .. le, 1)
  redis.call('HINCRBYFLOAT', K_METRICS, name .. ':sum', seconds)
end

-- The parameters the scripts read, as Python published them (scheduler.store.publish_config); nil
-- before the first publish. Nothing here restates a default: the parameter table is the one place.
local function config()
  local raw = redis.call('GET', K_SCHED)
  return raw and cjson.decode(raw)
end
local function need_config()
  return config() or error('topic ' .. P .. ' has no published scheduler configuration')
end

-- CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF), as scheduler.loadtable computes it in Python: a
-- node's load-table shard is its CRC modulo the shard count, as in FastDeploy's Global scheduler.
local function crc16(s)
  local crc = 0xFFFF
  for i = 1, #s do
    crc = bit.bxor(crc, bit.lshift(string.byte(s, i), 8))
    for _ = 1, 8 do
      if bit.band(crc, 0x8000) ~= 0 then
        crc = bit.band(bit.bxor(bit.lshift(crc, 1), 0x1021), 0xFFFF)
      else
        crc = bit.band(bit.lshift(crc, 1), 0xFFFF)
      end
    end
  end
  return crc
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

-- A result for the request's origin (the scheduler interface's get_results), when it has one.
local function push_result(req, result)
  local origin = redis.call('HGET', req, 'origin')
  if origin and origin ~= '' then
    result.request_id = redis.call('HGET', req, 'request_id')
    local shard_name = redis.call('HGET', req, 'result_shard')  -- splitwise: one list per origin reader
    local key = k_results((shard_name and shard_name ~= '') and (origin .. ':' .. shard_name) or origin)
    redis.call('RPUSH', key, cjson.encode(result))
    redis.call('EXPIRE', key, RETENTION)
  end
end

local function enqueue(uid, node, front, cfg, t)
  local length
  if front then length = redis.call('LPUSH', k_queue(node), uid) else
    length = redis.call('RPUSH', k_queue(node), uid) end
  add_load(node, 1, cfg)
  redis.call('HSET', k_req(uid), 'status', QUEUED, 'queue_node', node)
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

local function live_nodes(t, dead_after)
  return redis.call('ZRANGEBYSCORE', K_ALIVE, t - dead_after, '+inf')
end
local function least_loaded(nodes, cfg)
  local best, best_score = nil, nil
  for _, node in ipairs(nodes) do
    local score = tonumber(redis.call('ZSCORE', k_load(shard(node, cfg)), node) or 0)
    if best == nil or score < best_score then best, best_score = node, score end
  end
  return best
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
