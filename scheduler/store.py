"""The request lifecycle in Redis: publish a topic's configuration, queue, claim (and steal), stream,
finish, cancel, expire, heartbeats; and reading a request back.

Design note. Redis is the authority for a request while it is in flight; the console's database is a
copy brought up to date from here. Every change of state is one Lua script (``lua/lifecycle.lua``,
called through ``scheduler.scripts``), so a request moves ``queued -> running -> finished|failed|
cancelled`` or ``queued -> expired|cancelled`` exactly once, on the server's clock, and a node's load
score always equals its queue's length. The request hash is declared in ``scheduler.state``.

A node's queue is an rq queue (JSON serializer): the job hash is written beside the request, so
django-rq shows it, but a node claims through ``claim`` rather than rq's own pop, which keeps the
score, the lease and the TTL check in the same atomic step, and it never runs what that hash names
(``gpu_worker.node``). Work a node runs is held under a lease the node renews with its heartbeat; when
a lease runs out ``scheduler.failover`` puts the request back in a queue, and it resumes after the
tokens already streamed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import now as rq_now

from scheduler import keys, scripts
from scheduler.config import PARAMETERS_BY_NAME, UNBOUNDED, SchedulerConfig, parse_config
from scheduler.connection import ScriptRunner, client_options
from scheduler.errors import DuplicateRequest, FdError, NoNodeAvailable, QueueFull
from scheduler.loadtable import shard_of
from scheduler.messages import Request
from scheduler.scripts import ScriptCall
from scheduler.state import RequestState
from scheduler.status import CancelReply, EmitReply, RequestStatus, SubmitReply, status_or_reply

log = logging.getLogger(__name__)
RUN_REQUEST_JOB = "gpu_worker.jobs.run_request"  # what a request's rq job hash names (for django-rq)
JOB_TIMEOUT_S = 3600
JOB_FAILURE_TTL_S = 24 * 3600  # how long a failed job stays in django-rq's failed registry
LEASE_S = 5.0  # a running request whose node has not renewed it for this long goes to another node
UNBUDGETED = -1  # claim's available_blocks when the caller has no KV-block budget


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


@dataclass(frozen=True)
class Claim:
    """A request a node has claimed: run it under ``lease``, resuming after ``streamed`` tokens."""

    uid: str
    lease: str
    request: Request
    streamed: int
    home: str  # the node it was placed on; another node running it has stolen it
    phase: str = ""  # splitwise: "prefill" or "decode"; "" for a whole request


@dataclass(frozen=True)
class Budget:
    """The KV-block and token budgets of one claim (FastDeploy's ``get_requests`` arguments)."""

    available_blocks: int
    block_size: int
    reserved_output_blocks: int
    max_num_batched_tokens: int


NO_BUDGET = Budget(UNBUDGETED, 1, 0, 0)


def result_shard(request_id: str, shards: int) -> int:
    """Which of ``shards`` result lists (and writer) carries a request's results: always the same."""
    return zlib.crc32(request_id.encode()) % shards


def new_uid() -> str:
    """An internal id for keys and rq job ids (client ids may hold any printable character)."""
    return uuid.uuid4().hex


def emit_call(topic: str, uid: str, lease: str, index: int, token_id: int, text: str) -> ScriptCall:
    """Stream token ``index`` of request ``uid`` under ``lease`` (its reply: an ``EmitReply``)."""
    return scripts.EMIT.call(topic, uid=uid, lease=lease, index=index, token_id=token_id, text=text,
                             lease_s=LEASE_S)


def finish_call(topic: str, uid: str, lease: str, status: RequestStatus, finish_reason: str | None,
                output_token_ids: Iterable[int] = (), error: tuple[str, str] | None = None,
                last_token: tuple[int, int, str] | None = None) -> ScriptCall:
    """Record the end of request ``uid`` under ``lease`` (its reply: the status it ends with).
    ``last_token`` (index, token id, text) streams a final token in the same step (its reply: [an
    ``EmitReply``, the status])."""
    code, message = error or ("", "")
    output = json.dumps(list(output_token_ids)) if output_token_ids else "[]"
    if last_token is None:
        return scripts.FINISH.call(topic, uid=uid, lease=lease, status=status,
                                   finish_reason=finish_reason or "", output_token_ids=output,
                                   error_code=code, error_message=message)
    index, token_id, text = last_token
    return scripts.EMIT_FINISH.call(topic, uid=uid, lease=lease, index=index, token_id=token_id,
                                    text=text, lease_s=LEASE_S, status=status,
                                    finish_reason=finish_reason or "", output_token_ids=output,
                                    error_code=code, error_message=message)


class RequestStore:
    """The Redis side of the request lifecycle for every topic; safe to share between threads."""

    def __init__(self, redis: Redis) -> None:
        # rq needs a connection that returns bytes; this class decodes what it reads itself.
        self.redis = redis
        self.runner = ScriptRunner(redis)
        self._registered_queues: set[str] = set()

    def run(self, call: ScriptCall) -> Any:
        """One script call, in its own round trip; its reply."""
        return self.runner.run_scripts((call,))[0]

    # -- configuration -------------------------------------------------------------------------
    def publish_config(self, topic: str, config: SchedulerConfig) -> None:
        """Make ``config`` the one running nodes and the reaper use (no restart needed); a new shard
        count moves every node's load score to its new table in the same step."""
        self.run(scripts.PUBLISH_CONFIG.call(topic, config_json=json.dumps(config.as_dict()),
                                             script_json=json.dumps(config.for_scripts())))
        self.redis.sadd(keys.TOPICS, topic)

    def has_config(self, topic: str) -> bool:
        return self.redis.exists(keys.config(topic), keys.scheduling_config(topic)) == 2

    def config_of(self, topic: str) -> SchedulerConfig | None:
        """The configuration published for ``topic``; None before the first publish, or when what is
        there is not a configuration this version can read (a parameter it does not know, from a newer
        version or from anyone who wrote to this Redis, is left out)."""
        raw = self.published_config_json(topic)
        if raw is None:
            return None
        try:
            published = json.loads(raw)
            return parse_config({k: v for k, v in published.items() if k in PARAMETERS_BY_NAME})
        except (ValueError, AttributeError, FdError) as exc:
            log.warning("the configuration published for topic %s cannot be read: %s", topic, exc)
            return None

    def topics(self) -> list[str]:
        return sorted(t.decode() for t in self.redis.smembers(keys.TOPICS))

    def forget_topic(self, topic: str) -> None:
        """The topic now lives in another Redis: this one stops announcing it (no reaper walks it
        here, no node finds its configuration here)."""
        self.runner.run_commands([
            ("SREM", keys.TOPICS, topic),
            ("DEL", keys.config(topic), keys.scheduling_config(topic), keys.events(topic), keys.stats(topic),
             keys.series(topic), keys.metrics(topic)),
        ])

    def published_config_json(self, topic: str) -> bytes | None:
        """The configuration as published here, byte for byte (None when this Redis has none)."""
        return self.redis.get(keys.config(topic))

    # -- placement -----------------------------------------------------------------------------
    def next_home(self, topic: str, nodes: list[str]) -> str:
        """Round-robin over ``nodes`` (the topic's enabled nodes, in a stable order)."""
        if not nodes:
            raise NoNodeAvailable(f"topic '{topic}' has no enabled node")
        return nodes[(self.redis.incr(keys.round_robin(topic)) - 1) % len(nodes)]

    # -- queueing -------------------------------------------------------------------------------
    def submit(self, topic: str, uid: str, request: Request, home: str, config: SchedulerConfig,
               origin: str = "") -> list[str]:
        """Queue ``request`` on node ``home``; returns the uids that expired first (so an overdue
        request never holds a place). Raises QueueFull or DuplicateRequest."""
        expired, outcome = self.submit_many(topic, [(uid, request, home)], config, origin)
        if outcome[0] == SubmitReply.FULL:
            raise QueueFull(f"queue full: node '{home}' already holds scheduler_max_size="
                            f"{config.scheduler_max_size} waiting requests")
        if outcome[0] == SubmitReply.DUPLICATE and not self._queued_as(topic, uid, request.request_id):
            raise DuplicateRequest(f"request_id '{request.request_id}' is already in flight in topic "
                                   f"'{topic}'", field="request_id")
        return expired

    def submit_many(self, topic: str, items: list[tuple[str, Request, str]], config: SchedulerConfig,
                    origin: str = "", rq_jobs: bool = True,
                    result_shards: int = 0) -> tuple[list[str], list[SubmitReply]]:
        """Queue several requests in one round trip: (expired uids, a ``SubmitReply`` per item).

        ``rq_jobs`` writes each request's rq job hash too, for django-rq's views; the bare scheduler
        interface (an engine claiming through ``claim``) has no use for it. ``result_shards`` spreads
        the origin's results over that many lists, by request id (``result_shard``), so that as many
        readers can take them without reordering a request's.
        """
        if not items:
            return [], []
        max_size = config.scheduler_max_size if config.scheduler_name == "local" else UNBOUNDED
        calls: list[ScriptCall] = []
        if max_size != UNBOUNDED:  # evict overdue requests first, so that none holds a place in the queue
            calls.append(scripts.EXPIRE_DUE.call(topic, limit=500))
        for uid, request, home in items:
            shard = str(result_shard(request.request_id, result_shards)) if result_shards else ""
            calls.append(scripts.SUBMIT.call(
                topic, uid=uid, request_id=request.request_id, home=home,
                payload=json.dumps(request.to_dict()), prompt_tokens=request.prompt_len, max_size=max_size,
                origin=origin, rand=random.random(), result_shard=shard))
        jobs = [command for uid, request, home in items
                for command in self._job_commands(topic, uid, request, home, config)] if rq_jobs else []
        replies = self.runner.run_scripts(calls, jobs)
        outcome = [SubmitReply(reply[0].decode()) for reply in replies[-len(items):]]
        refused = [uid for (uid, _, _), reply in zip(items, outcome, strict=True) if reply != SubmitReply.OK]
        if refused and rq_jobs:
            self.redis.delete(*(Job.key_for(uid) for uid in refused))
        expired = [uid.decode() for uid in replies[0]] if max_size != UNBOUNDED else []
        return expired, outcome

    def _queued_as(self, topic: str, uid: str, request_id: str) -> bool:
        """Whether request ``uid`` is already here as ``request_id``: a duplicate of itself (the console's
        reconciler queued it again from its record while its first submission was on its way)."""
        return self.redis.hget(keys.request(topic, uid), "request_id") == request_id.encode()

    def resubmit(self, topic: str, uid: str, request: Request, home: str, config: SchedulerConfig, *,
                 waiting_since: float, output_token_ids: Sequence[int] = (), texts: Sequence[str] = (),
                 attempt: int = 0) -> bool:
        """Queue again, on node ``home``, a request this Redis lost (it restarted without its data), from
        the console's record: its TTL runs from ``waiting_since`` (epoch seconds), ``output_token_ids``
        (with their streamed ``texts``) are streamed again first so that a node resumes after them,
        and its leases are numbered from ``attempt`` on. False when it is known here after all."""
        if len(texts) != len(output_token_ids):
            raise ValueError("resubmit: one text per output token")
        call = scripts.RESUBMIT.call(
            topic, uid=uid, request_id=request.request_id, home=home, payload=json.dumps(request.to_dict()),
            prompt_tokens=request.prompt_len, waiting_since=f"{waiting_since:.6f}",
            output_ids=json.dumps(list(output_token_ids)), texts=json.dumps(list(texts)), attempt=attempt)
        reply = self.runner.run_scripts([call], self._job_commands(topic, uid, request, home, config))[0]
        return SubmitReply(reply[0].decode()) == SubmitReply.OK

    def recorded(self, topic: str, uids: Sequence[str]) -> None:
        """The console's database now holds the final state of ``uids``: Redis keeps them only
        ``keys.RETENTION_S`` more (until then, since they ended, up to a day: ``lifecycle.lua``)."""
        if uids:
            self.runner.run_commands([("EXPIRE", key, keys.RETENTION_S) for uid in uids
                                      for key in (keys.request(topic, uid), keys.output(topic, uid))])

    def _job_commands(self, topic: str, uid: str, request: Request, home: str,
                      config: SchedulerConfig) -> list[tuple[Any, ...]]:
        """The rq job hash of a request on its home queue (JSON serializer; its arguments are plain
        ids), so that django-rq's views show it. Nothing ever runs what it names."""
        queue = keys.node_queue_name(topic, home)
        job = Job.create(RUN_REQUEST_JOB, args=[topic, uid], id=uid, connection=self.redis,
                         serializer=JSONSerializer, timeout=JOB_TIMEOUT_S, result_ttl=keys.RETENTION_S,
                         failure_ttl=JOB_FAILURE_TTL_S, origin=queue,
                         description=f"request {request.request_id!r} of {topic}")
        job.enqueued_at = rq_now()
        job._status = JobStatus.QUEUED
        fields = [item for pair in job.to_dict().items() for item in pair]
        commands: list[tuple[Any, ...]] = [
            ("HSET", job.key, *fields),
            ("EXPIRE", job.key, config.scheduler_ttl + JOB_TIMEOUT_S + keys.RETENTION_S)]
        if queue not in self._registered_queues:  # rq's list of queues, for django-rq's views
            commands.append(("SADD", Queue.redis_queues_keys, keys.rq_queue(queue)))
            self._registered_queues.add(queue)
        return commands

    # -- running --------------------------------------------------------------------------------
    def claim(self, topic: str, node: str, n: int = 1, *, may_steal: bool = True,
              budget: Budget = NO_BUDGET) -> list[Claim]:
        """Claim up to ``n`` requests for ``node``: its own queue first (FIFO), else, in global mode,
        steal from the most loaded nodes. Overdue requests are expired instead of handed out."""
        call = self.claim_call(topic, node, n, may_steal=may_steal, budget=budget)
        return self.parse_claims(self.run(call))

    def claim_call(self, topic: str, node: str, n: int = 1, *, may_steal: bool = True,
                   budget: Budget = NO_BUDGET) -> ScriptCall:
        """``claim`` as a call to send with others (its reply goes to ``parse_claims``)."""
        return scripts.CLAIM.call(
            topic, node=node, n=n, may_steal="1" if may_steal else "0", rand=random.random(), lease_s=LEASE_S,
            available_blocks=budget.available_blocks, block_size=budget.block_size,
            reserved_output_blocks=budget.reserved_output_blocks,
            max_num_batched_tokens=budget.max_num_batched_tokens)

    @staticmethod
    def parse_claims(reply: list) -> list[Claim]:
        return [Claim(uid.decode(), lease.decode(), Request.from_dict(json.loads(payload)), int(streamed),
                      home.decode(), phase.decode()) for uid, lease, payload, streamed, home, phase in reply]

    def emit(self, topic: str, uid: str, lease: str, index: int, token_id: int, text: str) -> EmitReply:
        """Stream token ``index`` of request ``uid`` under ``lease``."""
        return EmitReply(self.run(emit_call(topic, uid, lease, index, token_id, text)))

    def finish(self, topic: str, uid: str, lease: str, *, status: RequestStatus, finish_reason: str | None,
               output_token_ids: Iterable[int] = (), error: tuple[str, str] | None = None
               ) -> RequestStatus | CancelReply:
        """Record the final status of request ``uid`` under ``lease``; returns the status it ends with
        (its current one, or ``CancelReply.MISSING``, when the lease is no longer current)."""
        call = finish_call(topic, uid, lease, status, finish_reason, output_token_ids, error)
        return status_or_reply(self.run(call).decode())

    def streamed_tokens(self, topic: str, uid: str) -> list[int]:
        """The token ids already streamed, in index order (what a resumed run continues after)."""
        return [e.token_id for e in self.read_output(topic, uid, count=100_000) if e.kind == "token"]

    # -- ending ---------------------------------------------------------------------------------
    def cancel(self, topic: str, uid: str) -> RequestStatus | CancelReply:
        """``RequestStatus.CANCELLED`` (was waiting), ``CancelReply.CANCELLING`` (running; stops at its
        next token), the final status it already had, or ``CancelReply.MISSING``."""
        return status_or_reply(self.run(scripts.CANCEL.call(topic, uid=uid)).decode())

    def expire_due(self, topic: str, limit: int = 500) -> list[str]:
        """Evict every request of ``topic`` that waited its TTL; returns their uids."""
        return [uid.decode() for uid in self.run(scripts.EXPIRE_DUE.call(topic, limit=limit))]

    # -- reading --------------------------------------------------------------------------------
    def state(self, topic: str, uid: str) -> RequestState | None:
        """The request's live state (None when Redis no longer has it)."""
        raw = self.redis.hgetall(keys.request(topic, uid))
        return RequestState.from_hash(raw) if raw else None

    def states(self, topic: str, uids: Sequence[str], fields: Sequence[str]) -> list[RequestState | None]:
        """Only ``fields`` of many requests' states, in one round trip (the rest keep their defaults)."""
        replies = self.runner.run_commands([("HMGET", keys.request(topic, uid), *fields) for uid in uids])
        return [RequestState.from_hash({f: v for f, v in zip(fields, values, strict=True) if v is not None})
                if any(v is not None for v in values) else None for values in replies]

    def read_output(self, topic: str, uid: str, after: str = "0-0", block_ms: int | None = None,
                    count: int = 1000) -> list[OutputEvent]:
        """Output entries after ``after``; waits up to ``block_ms`` for the first one when given."""
        reply = self.redis.xread({keys.output(topic, uid): after}, count=count, block=block_ms)
        return [OutputEvent.parse(eid, fields) for _, entries in reply or () for eid, fields in entries]

    def take_results(self, topic: str, origin: str, limit: int = 10_000) -> list[dict[str, Any]]:
        """Take the results delivered to ``origin`` (the scheduler interface's get_results)."""
        key = keys.results(topic, origin)
        with self.redis.pipeline() as pipe:
            pipe.lrange(key, 0, limit - 1)
            pipe.ltrim(key, limit, -1)
            raw, _ = pipe.execute()
        return [json.loads(item) for item in raw]

    def wait_for_results(self, topic: str, origin: str, limit: int, timeout_s: float) -> list[dict[str, Any]]:
        """Like ``take_results``, but blocks up to ``timeout_s`` for the first one (BLMPOP)."""
        reply = self.runner.run_command("BLMPOP", timeout_s, 1, keys.results(topic, origin), "LEFT", "COUNT",
                                        limit)
        return [json.loads(item) for item in reply[1]] if reply else []

    def queue_length(self, topic: str, node: str) -> int:
        return int(self.redis.llen(keys.rq_queue(keys.node_queue_name(topic, node))))

    def queue_lengths(self, topic: str, nodes: list[str]) -> dict[str, int]:
        with self.redis.pipeline(transaction=False) as pipe:
            for node in nodes:
                pipe.llen(keys.rq_queue(keys.node_queue_name(topic, node)))
            return dict(zip(nodes, (int(n) for n in pipe.execute()), strict=True))

    def load_scores(self, topic: str, nodes: list[str]) -> dict[str, float]:
        """Each node's score in its load table (equal to its queue length, by construction)."""
        config = self.config_of(topic) or SchedulerConfig(scheduler_topic=topic)
        with self.redis.pipeline(transaction=False) as pipe:
            for node in nodes:
                pipe.zscore(keys.load_table(topic, shard_of(node, config.scheduler_load_shards_num)), node)
            return {node: float(s or 0) for node, s in zip(nodes, pipe.execute(), strict=True)}

    def wait_for_work(self, topic: str, node: str, timeout_s: float) -> bool:
        """Block until work lands in ``node``'s queue (its bell rings) or ``timeout_s`` passes."""
        return self.redis.blpop([keys.bell(topic, node)], timeout=timeout_s) is not None

    # -- metrics --------------------------------------------------------------------------------
    def count_rejection(self, topic: str, reason: str) -> None:
        """A submission the console refused (``reason``: ``queue_full``, ``no_node``), for /metrics."""
        self.redis.hincrby(keys.metrics(topic), f"rejections:{reason}", 1)

    def metrics_fields(self, topic: str) -> dict[str, str]:
        """The topic's ``keys.metrics`` hash: counters and histogram buckets, as text."""
        return _decoded(self.redis.hgetall(keys.metrics(topic)))

    # -- heartbeats -----------------------------------------------------------------------------
    def renew(self, topic: str, node: str, held: dict[str, str], accepts_work: bool = True,
              role: str = "mixed") -> int:
        """Heartbeat: extend the leases ``node`` holds (uid -> lease), record its role, and mark it
        alive for failover and placement while it ``accepts_work``; returns how many it renewed."""
        return int(self.run(_renew_call(topic, node, held, accepts_work, role)))

    def write_heartbeat(self, topic: str, node: str, fields: dict[str, Any],
                        held: dict[str, str] | None = None, ttl_s: int = 3600,
                        accepts_work: bool = True) -> None:
        """The node's heartbeat hash (for the console) plus liveness and lease renewal (for failover):
        ``held`` maps the uid of each request it runs to its lease."""
        key = keys.heartbeat(topic, node)
        beat = {**{k: str(v) for k, v in fields.items()}, "ts": f"{time.time():.6f}"}
        commands = [("HSET", key, *(item for pair in beat.items() for item in pair)), ("EXPIRE", key, ttl_s)]
        if fields.get("state") == "stopped":
            self.runner.run_commands([*commands, ("ZREM", keys.alive(topic), node)])
            return
        renew = _renew_call(topic, node, held or {}, accepts_work, str(fields.get("role", "mixed")))
        self.runner.run_scripts((renew,), commands)

    def read_heartbeats(self, topic: str, nodes: list[str]) -> dict[str, dict[str, str]]:
        with self.redis.pipeline(transaction=False) as pipe:
            for node in nodes:
                pipe.hgetall(keys.heartbeat(topic, node))
            return {node: _decoded(raw) for node, raw in zip(nodes, pipe.execute(), strict=True)}


def _renew_call(topic: str, node: str, held: dict[str, str], accepts_work: bool, role: str) -> ScriptCall:
    pairs = [item for uid_lease in held.items() for item in uid_lease]
    return scripts.RENEW.call(topic, *pairs, lease_s=LEASE_S, node=node, role=role,
                              accepts_work="1" if accepts_work else "0")


def _decoded(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


class AsyncOutputReader:
    """Reads request output streams from an asyncio event loop (the SSE endpoint).

    Readers of one URL on one event loop share a client and its connection pool: each read borrows a
    connection for as long as its XREAD blocks, so a stream no longer connects (and authenticates,
    and checks the connection's health) anew. A client belongs to the loop it was made on; the clients
    of loops that have closed (a test's, a WSGI server's ``async_to_sync``) are let go. A pooled
    connection the server closed meanwhile fails its next command: the reads here change nothing, so
    such a read is tried once more on a new connection."""

    _clients: dict[asyncio.AbstractEventLoop, dict[str, Any]] = {}
    _lock = threading.Lock()  # loops run in several threads (each test's, each async_to_sync's)

    def __init__(self, url: str) -> None:
        from redis import asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        loop = asyncio.get_running_loop()
        with self._lock:
            for closed in [other for other in self._clients if other.is_closed()]:
                del self._clients[closed]
            clients = self._clients.setdefault(loop, {})
            if url not in clients:
                clients[url] = aioredis.Redis.from_url(  # its XREAD blocks for less than its read timeout
                    url, retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError],
                    **client_options(url))
            self.redis = clients[url]

    async def read(self, topic: str, uid: str, after: str, block_ms: int) -> list[OutputEvent]:
        reply = await self.redis.xread({keys.output(topic, uid): after}, count=1000, block=block_ms)
        return [OutputEvent.parse(eid, fields) for _, entries in reply or () for eid, fields in entries]

    async def has_entry(self, topic: str, uid: str, entry_id: str) -> bool:
        """Whether entry ``entry_id`` is still in the request's output stream (streams are never
        trimmed: gone means the stream vanished, or was made again after Redis lost it)."""
        return bool(await self.redis.xrange(keys.output(topic, uid), entry_id, entry_id, count=1))

    async def exists(self, topic: str, uid: str) -> bool:
        return bool(await self.redis.exists(keys.output(topic, uid)))
