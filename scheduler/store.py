"""The cluster's request lifecycle in Redis: queue, claim, stream, finish, cancel, expire.

Design note. Redis is the authority for a request while it is in flight; the console's database is a
copy that is brought up to date from here. Every change of status is one Lua script, so a request moves
``queued -> running -> finished|failed|cancelled`` or ``queued -> expired|cancelled`` exactly once, on
the server's clock, whatever the processes around it do:

* ``submit`` checks the node queue's length under WATCH and, in one MULTI, writes the request hash,
  adds it to the topic's waiting set and enqueues its rq job (JSON serializer) on the home node's queue.
* ``start`` is the node's claim: queued -> running, or expired when its wait already exceeds the TTL
  (so an overdue request never runs, even before the reaper sees it).
* ``expire_due`` evicts every request that waited ``scheduler_ttl`` seconds, whether or not any worker
  runs; it reads the TTL from the topic's published config, so a changed TTL applies to waiting requests.
* ``emit`` appends a token to the output stream and answers whether a cancel was asked for.
* Every final status appends one ``done`` entry to the output stream and gives both keys a TTL.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import WatchError
from rq import Queue
from rq.serializers import JSONSerializer

from scheduler import keys
from scheduler.config import SchedulerConfig
from scheduler.errors import NoNodeAvailable, QueueFull
from scheduler.messages import Request

RUN_REQUEST_JOB = "gpu_worker.jobs.run_request"
RETENTION_S = 3600  # how long Redis keeps a finished request's hash and stream (the database keeps it all)
JOB_TIMEOUT_S = 3600
FINAL_STATUSES = ("finished", "failed", "expired", "cancelled")

# Shared Lua: the server's clock, the topic's current TTL, and closing a request that never ran.
_LUA_PRELUDE = """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.6f', x) end
local function current_ttl(config_key, req)
  local raw = redis.call('GET', config_key)
  if raw then return tonumber(cjson.decode(raw)['scheduler_ttl']) end
  return tonumber(redis.call('HGET', req, 'ttl'))
end
local function close_waiting(req, out, waiting, uid, status, message, retention)
  local q = redis.call('HGET', req, 'queue')
  local job = redis.call('HGET', req, 'job_id')
  if q and job then redis.call('LREM', q, 0, job) end
  redis.call('HSET', req, 'status', status, 'finished_at', fmt(now()), 'finish_reason', status,
             'error_code', status, 'error_message', message)
  redis.call('ZREM', waiting, uid)
  redis.call('XADD', out, '*', 'type', 'done', 'status', status)
  redis.call('EXPIRE', req, retention)
  redis.call('EXPIRE', out, retention)
end
"""

# KEYS: req, out, waiting, config. ARGV: uid, node, retention.
_START = _LUA_PRELUDE + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing'} end
if status ~= 'queued' then return {status} end
local ttl = current_ttl(KEYS[4], KEYS[1])
local t = now()
if t - tonumber(redis.call('HGET', KEYS[1], 'enqueued_at')) >= ttl then
  close_waiting(KEYS[1], KEYS[2], KEYS[3], ARGV[1], 'expired',
                'waited longer than scheduler_ttl=' .. ttl .. 's', tonumber(ARGV[3]))
  return {'expired'}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'executed_by', ARGV[2], 'started_at', fmt(t))
redis.call('ZREM', KEYS[3], ARGV[1])
return {'claimed', redis.call('HGET', KEYS[1], 'payload')}
"""

# KEYS: waiting, config. ARGV: request key prefix, output key prefix, limit, retention.
_EXPIRE_DUE = _LUA_PRELUDE + """
local raw = redis.call('GET', KEYS[2])
if not raw then return {} end
local ttl = tonumber(cjson.decode(raw)['scheduler_ttl'])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now() - ttl, 'LIMIT', 0, tonumber(ARGV[3]))
local expired = {}
for _, uid in ipairs(due) do
  local req = ARGV[1] .. uid
  if redis.call('HGET', req, 'status') == 'queued' then
    close_waiting(req, ARGV[2] .. uid, KEYS[1], uid, 'expired',
                  'waited longer than scheduler_ttl=' .. ttl .. 's', tonumber(ARGV[4]))
    table.insert(expired, uid)
  else
    redis.call('ZREM', KEYS[1], uid)
  end
end
return expired
"""

# KEYS: req, out. ARGV: node, index, token_id, text, keep seconds. Returns 1 when a cancel was asked,
# 0 to go on, -1 when the request is no longer this node's to run.
_EMIT = _LUA_PRELUDE + """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' or redis.call('HGET', KEYS[1], 'executed_by') ~= ARGV[1] then
  return -1
end
redis.call('XADD', KEYS[2], '*', 'type', 'token', 'index', ARGV[2], 'token_id', ARGV[3], 'text', ARGV[4])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
if ARGV[2] == '0' then redis.call('HSET', KEYS[1], 'first_token_at', fmt(now())) end
redis.call('HSET', KEYS[1], 'num_output_tokens', tonumber(ARGV[2]) + 1)
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return 1 end
return 0
"""

# KEYS: req, out. ARGV: node, status, finish_reason, output ids JSON, error code, error message,
# retention. Returns the status the request ends with (or its current one when not this node's).
_FINISH = _LUA_PRELUDE + """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' or redis.call('HGET', KEYS[1], 'executed_by') ~= ARGV[1] then
  return status or 'missing'
end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finish_reason', ARGV[3], 'output_token_ids', ARGV[4],
           'error_code', ARGV[5], 'error_message', ARGV[6],
           'finished_at', fmt(now()))
redis.call('XADD', KEYS[2], '*', 'type', 'done', 'status', ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[7]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[7]))
return ARGV[2]
"""

# KEYS: req, out, waiting. ARGV: uid, retention. Returns the new (or unchanged) status.
_CANCEL = _LUA_PRELUDE + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'queued' then
  close_waiting(KEYS[1], KEYS[2], KEYS[3], ARGV[1], 'cancelled', 'cancelled by the client', tonumber(ARGV[2]))
  return 'cancelled'
end
if status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 'cancelling'
end
return status
"""


@dataclass(frozen=True)
class OutputEvent:
    """One entry of a request's output stream."""

    entry_id: str
    kind: str  # "token" or "done"
    index: int = -1
    token_id: int = -1
    text: str = ""
    status: str = ""

    @classmethod
    def parse(cls, entry_id: bytes | str, fields: dict[bytes, bytes]) -> OutputEvent:
        f = {k.decode(): v.decode() for k, v in fields.items()}
        eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        if f.get("type") == "token":
            return cls(eid, "token", int(f["index"]), int(f["token_id"]), f.get("text", ""))
        return cls(eid, "done", status=f.get("status", ""))


def new_uid() -> str:
    """An internal id for keys and rq job ids (client ids may hold any printable character)."""
    return uuid.uuid4().hex


def decode_hash(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


class RequestStore:
    """The Redis side of the request lifecycle for every topic; safe to share between threads."""

    def __init__(self, redis: Redis) -> None:
        # rq needs a connection that returns bytes; this class decodes what it reads itself.
        self.redis = redis
        self._start = redis.register_script(_START)
        self._expire_due = redis.register_script(_EXPIRE_DUE)
        self._emit = redis.register_script(_EMIT)
        self._finish = redis.register_script(_FINISH)
        self._cancel = redis.register_script(_CANCEL)

    # -- configuration -------------------------------------------------------------------------
    def publish_config(self, topic: str, config: SchedulerConfig) -> None:
        """Make ``config`` the one running nodes and the reaper use (no restart needed)."""
        with self.redis.pipeline() as pipe:
            pipe.set(keys.config(topic), json.dumps(config.as_dict()))
            pipe.sadd(keys.TOPICS, topic)
            pipe.execute()

    def topics(self) -> list[str]:
        return sorted(t.decode() for t in self.redis.smembers(keys.TOPICS))

    def node_queue(self, topic: str, node: str) -> Queue:
        return Queue(keys.node_queue_name(topic, node), connection=self.redis, serializer=JSONSerializer)

    # -- placement -----------------------------------------------------------------------------
    def next_home(self, topic: str, nodes: list[str]) -> str:
        """Round-robin over ``nodes`` (the topic's enabled nodes, in a stable order)."""
        if not nodes:
            raise NoNodeAvailable(f"topic '{topic}' has no enabled node")
        return nodes[(self.redis.incr(keys.round_robin(topic)) - 1) % len(nodes)]

    # -- lifecycle ------------------------------------------------------------------------------
    def submit(self, topic: str, uid: str, request: Request, home: str, config: SchedulerConfig) -> list[str]:
        """Queue ``request`` on node ``home``; returns the uids that expired to make the check fair.

        Overdue requests are evicted first, so an expired request never takes a place in the queue.
        Raises ``QueueFull`` when the node's queue still holds ``scheduler_max_size`` requests.
        """
        expired = self.expire_due(topic)
        queue = self.node_queue(topic, home)
        job = queue.create_job(
            RUN_REQUEST_JOB, args=[topic, uid], job_id=uid, timeout=JOB_TIMEOUT_S,
            ttl=config.scheduler_ttl + 60, result_ttl=RETENTION_S, failure_ttl=24 * 3600,
            description=f"request {request.request_id!r} on {topic}/{home}",
        )
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(queue.key)
                    if config.scheduler_max_size != -1 and pipe.llen(queue.key) >= config.scheduler_max_size:
                        raise QueueFull(
                            f"queue full: node '{home}' already holds scheduler_max_size="
                            f"{config.scheduler_max_size} waiting requests"
                        )
                    seconds, micros = pipe.time()
                    enqueued_at = seconds + micros / 1e6
                    pipe.multi()
                    self._write_request(pipe, topic, uid, request, home, queue.key, enqueued_at, config)
                    queue.enqueue_job(job, pipeline=pipe)
                    pipe.execute()
                    return expired
                except WatchError:
                    continue

    def _write_request(self, pipe, topic: str, uid: str, request: Request, home: str, queue_key: str,
                       enqueued_at: float, config: SchedulerConfig) -> None:
        req_key = keys.request(topic, uid)
        pipe.hset(req_key, mapping={
            "request_id": request.request_id, "topic": topic, "status": "queued", "home_node": home,
            "queue": queue_key, "job_id": uid, "enqueued_at": f"{enqueued_at:.6f}",
            "ttl": config.scheduler_ttl, "prompt_tokens": request.prompt_len,
            "payload": json.dumps(request.to_dict()),
        })
        pipe.expire(req_key, config.scheduler_ttl + RETENTION_S)
        pipe.zadd(keys.waiting(topic), {uid: enqueued_at})
        pipe.sadd(keys.TOPICS, topic)

    def start(self, topic: str, uid: str, node: str) -> tuple[str, Request | None]:
        """Claim a queued request for ``node``: ("running", request), or (its status, None)."""
        reply = self._start(
            keys=[keys.request(topic, uid), keys.output(topic, uid), keys.waiting(topic), keys.config(topic)],
            args=[uid, node, RETENTION_S],
        )
        status = reply[0].decode()
        if status != "claimed":
            return status, None  # someone else's, already final, or just expired
        return "running", Request.from_dict(json.loads(reply[1]))

    def emit(self, topic: str, uid: str, node: str, index: int, token_id: int, text: str) -> int:
        """Append one token; 1 = cancel asked, 0 = go on, -1 = no longer this node's request."""
        return int(self._emit(
            keys=[keys.request(topic, uid), keys.output(topic, uid)],
            args=[node, index, token_id, text, JOB_TIMEOUT_S + RETENTION_S],
        ))

    def finish(self, topic: str, uid: str, node: str, *, status: str, finish_reason: str | None,
               output_token_ids: Iterable[int] = (), error: tuple[str, str] | None = None) -> str:
        """Record the final status of a running request; returns the status it ends with."""
        code, message = error or ("", "")
        reply = self._finish(
            keys=[keys.request(topic, uid), keys.output(topic, uid)],
            args=[node, status, finish_reason or "", json.dumps(list(output_token_ids)), code, message,
                  RETENTION_S],
        )
        return reply.decode()

    def cancel(self, topic: str, uid: str) -> str:
        """Cancel: 'cancelled' (was waiting), 'cancelling' (running; the node stops at its next token),
        or the unchanged final status."""
        reply = self._cancel(
            keys=[keys.request(topic, uid), keys.output(topic, uid), keys.waiting(topic)],
            args=[uid, RETENTION_S],
        )
        return reply.decode()

    def expire_due(self, topic: str, limit: int = 500) -> list[str]:
        """Evict every request of ``topic`` that has waited its TTL; returns their uids."""
        reply = self._expire_due(
            keys=[keys.waiting(topic), keys.config(topic)],
            args=[keys.request(topic, ""), keys.output(topic, ""), limit, RETENTION_S],
        )
        return [uid.decode() for uid in reply]

    # -- reading --------------------------------------------------------------------------------
    def state(self, topic: str, uid: str) -> dict[str, str]:
        """The request hash (empty when Redis no longer has it)."""
        return decode_hash(self.redis.hgetall(keys.request(topic, uid)))

    def read_output(self, topic: str, uid: str, after: str = "0-0", block_ms: int | None = None,
                    count: int = 1000) -> list[OutputEvent]:
        """Output entries after ``after``; waits up to ``block_ms`` for the first one when given."""
        reply = self.redis.xread({keys.output(topic, uid): after}, count=count, block=block_ms)
        return [OutputEvent.parse(eid, fields) for _, entries in reply or () for eid, fields in entries]

    def queue_length(self, topic: str, node: str) -> int:
        return int(self.redis.llen(keys.rq_queue(keys.node_queue_name(topic, node))))

    def queue_lengths(self, topic: str, nodes: list[str]) -> dict[str, int]:
        with self.redis.pipeline(transaction=False) as pipe:
            for node in nodes:
                pipe.llen(keys.rq_queue(keys.node_queue_name(topic, node)))
            return dict(zip(nodes, (int(n) for n in pipe.execute()), strict=True))

    # -- heartbeats -----------------------------------------------------------------------------
    def write_heartbeat(self, topic: str, node: str, fields: dict[str, Any], ttl_s: int = 120) -> None:
        key = keys.heartbeat(topic, node)
        with self.redis.pipeline() as pipe:
            pipe.hset(key, mapping={**{k: str(v) for k, v in fields.items()}, "ts": f"{time.time():.6f}"})
            pipe.expire(key, ttl_s)
            pipe.execute()

    def read_heartbeats(self, topic: str, nodes: list[str]) -> dict[str, dict[str, str]]:
        with self.redis.pipeline(transaction=False) as pipe:
            for node in nodes:
                pipe.hgetall(keys.heartbeat(topic, node))
            return {node: decode_hash(raw) for node, raw in zip(nodes, pipe.execute(), strict=True)}

    def clear_heartbeat(self, topic: str, node: str) -> None:
        self.redis.delete(keys.heartbeat(topic, node))


class AsyncOutputReader:
    """Reads request output streams from an asyncio event loop (the SSE endpoint)."""

    def __init__(self, url: str) -> None:
        from redis import asyncio as aioredis

        self.redis = aioredis.Redis.from_url(url, socket_connect_timeout=3)

    async def read(self, topic: str, uid: str, after: str, block_ms: int) -> list[OutputEvent]:
        reply = await self.redis.xread({keys.output(topic, uid): after}, count=1000, block=block_ms)
        return [OutputEvent.parse(eid, fields) for _, entries in reply or () for eid, fields in entries]

    async def exists(self, topic: str, uid: str) -> bool:
        return bool(await self.redis.exists(keys.output(topic, uid)))

    async def close(self) -> None:
        await self.redis.aclose()
