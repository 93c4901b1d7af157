"""The cluster's request lifecycle in Redis: queue, claim (and steal), stream, finish, cancel, expire,
and the failover of work held by dead nodes.

Design note. Redis is the authority for a request while it is in flight; the console's database is a
copy brought up to date from here. Every change of state is one Lua script (``scheduler.scripts``), so
a request moves ``queued -> running -> finished|failed|cancelled`` or ``queued -> expired|cancelled``
exactly once, on the server's clock, and a node's load score always equals its queue's length.

A node's queue is an rq queue (JSON serializer): the job hash is written beside the request, so
django-rq shows it, but the node claims through ``claim`` rather than rq's own pop, which keeps the
score, the lease and the TTL check in the same atomic step. Work a node runs is held under a lease the
node renews with its heartbeat; when a lease runs out the request goes back to the front of a live
node's queue and resumes there after the tokens already streamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import NoScriptError, ResponseError
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import now as rq_now

from scheduler import keys, scripts
from scheduler.config import SchedulerConfig
from scheduler.errors import DuplicateRequest, NoNodeAvailable, QueueFull
from scheduler.liveness import DEAD_AFTER_S
from scheduler.loadtable import shard_of
from scheduler.messages import Request

RUN_REQUEST_JOB = "gpu_worker.jobs.run_request"
RETENTION_S = 3600  # how long Redis keeps a finished request's hash and stream (the database keeps it all)
JOB_TIMEOUT_S = 3600
SERIES_KEPT = 900  # chart points, one a second: the last 15 minutes
LANE_CHECK_AFTER_S = 0.05  # a thread's connection unused this long is checked before its next call
LEASE_S = 5.0  # a running request whose node has not renewed it for this long goes to another node
SCRIPTS = ("SUBMIT", "CLAIM", "EMIT", "FINISH", "EMIT_FINISH", "CANCEL", "EXPIRE_DUE", "RECOVER", "RECLAIM",
           "REHOME", "RENEW", "PUBLISH_CONFIG", "HANDOFF", "PLACE_PENDING", "SPLITWISE_UPKEEP")


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


@dataclass(frozen=True)
class Upkeep:
    """What one reaper pass did to a topic."""

    recovered: list[tuple[str, str]]  # (uid, node it went to) of work whose lease ran out
    off_expired: int  # splitwise: requests moved off expired nodes
    placed: int  # splitwise: waiting requests placed
    rehomed: int  # global: requests moved from dead nodes' queues
    expired: list[str]  # uids evicted by their TTL


def result_shard(request_id: str, shards: int) -> int:
    """Which of ``shards`` result lists (and writer) carries a request's results: always the same."""
    return zlib.crc32(request_id.encode()) % shards


def new_uid() -> str:
    """An internal id for keys and rq job ids (client ids may hold any printable character)."""
    return uuid.uuid4().hex


def decode_hash(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


ScriptCall = tuple[str, str, Sequence[Any]]  # script name, topic, its arguments after prefix and retention


def emit_args(uid: str, lease: str, index: int, token_id: int, text: str) -> tuple[Any, ...]:
    """EMIT's arguments (and the first half of EMIT_FINISH's)."""
    return uid, lease, index, token_id, text, LEASE_S


def finish_args(status: str, finish_reason: str | None, output_token_ids: Iterable[int] = (),
                error: tuple[str, str] | None = None) -> tuple[Any, ...]:
    """FINISH's arguments after the uid and lease (and the second half of EMIT_FINISH's)."""
    code, message = error or ("", "")
    return status, finish_reason or "", json.dumps(list(output_token_ids)), code, message


def _raise_error_replies(replies: list[Any]) -> list[Any]:
    """``replies`` when none is an error reply; else the first one, raised."""
    for reply in replies:
        if isinstance(reply, ResponseError):
            raise reply
    return replies


_fork_generation = 0  # bumped in a forked child, so that no lane's connection is shared across a fork


def _after_fork() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork)


class _Lane(threading.local):
    """One thread's own connection for the scripts (see ``RequestStore.run_scripts``)."""

    connection: Any = None
    generation = -1
    used = float("-inf")  # time.monotonic() of its last call


class RequestStore:
    """The Redis side of the request lifecycle for every topic; safe to share between threads."""

    def __init__(self, redis: Redis) -> None:
        # rq needs a connection that returns bytes; this class decodes what it reads itself.
        self.redis = redis
        self._registered_queues: set[str] = set()
        # EVALSHA by digest, loading the scripts only when Redis says it lacks them: redis-py's Script
        # objects would ask SCRIPT EXISTS before every pipeline, doubling its round trips.
        self._shas = {name: hashlib.sha1(getattr(scripts, name).encode()).hexdigest() for name in SCRIPTS}
        self._lane = _Lane()

    def _load_scripts(self) -> None:
        for name in SCRIPTS:
            self.redis.script_load(getattr(scripts, name))

    def _run(self, name: str, topic: str, *args: Any, client=None) -> Any:
        """Run script ``name`` now, or queue it on pipeline ``client`` (see ``execute``)."""
        if client is not None:
            return client.evalsha(*self._evalsha(name, topic, args)[1:])
        return self.run_scripts([(name, topic, args)])[0]

    def _evalsha(self, name: str, topic: str, args: Sequence[Any]) -> tuple[Any, ...]:
        return ("EVALSHA", self._shas[name], 1, keys.config(topic), keys.topic_prefix(topic), RETENTION_S,
                *args)

    def run_scripts(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Run scripts in one round trip on this thread's own connection; their replies in order.

        The scheduler's hot paths are a script or a few per call: going through redis-py's pool and
        pipeline objects costs a lock, two getpid calls and a readiness poll per round trip, about a
        third of the client's CPU time per call. A script Redis lost (a restart, SCRIPT FLUSH) is
        loaded and only the calls it refused run again. An error reply raises, after every reply
        was read. Connection errors are retried as the client's own retry policy says.
        """
        replies = self._round_trip([self._evalsha(*call) for call in calls])
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            self._load_scripts()
            for i, reply in zip(missing, self._round_trip([self._evalsha(*calls[i]) for i in missing]),
                                strict=True):
                replies[i] = reply
        return _raise_error_replies(replies)

    def run_command(self, *args: Any) -> Any:
        """One plain command on this thread's own connection (a blocking pop, say)."""
        return _raise_error_replies(self._round_trip([args]))[0]

    def _round_trip(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        lane = self._lane
        if lane.connection is None or lane.generation != _fork_generation:
            pool = self.redis.connection_pool
            lane.connection = pool.connection_class(**pool.connection_kwargs)
            lane.generation = _fork_generation
        conn = lane.connection
        # As redis-py's pool does before every command, but only after a pause: a connection the
        # server closed meanwhile (a restart, its idle timeout, a proxy reset) is replaced before
        # anything is sent on it, not found dead by the call. A socket with nothing sent on it has
        # nothing to read unless it was closed. On a busy thread the poll, a call that gives up the
        # GIL, cost 7% of the splitwise benchmark; a close within its pause fails one call, as one
        # in flight would. (redis-py keeps the socket in ``_sock``; one not connected yet connects
        # when the call sends.)
        now = time.monotonic()
        sock = conn._sock if now - lane.used > LANE_CHECK_AFTER_S else None
        lane.used = now
        if sock is not None:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            if poller.poll(0):
                conn.disconnect()  # closed, or bytes nobody asked for: either way not fit to use
        packed = conn.pack_commands(commands)

        def send_and_read() -> list[Any]:
            try:
                conn.send_packed_command(packed)
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(conn.read_response())
                    except ResponseError as exc:  # an error reply: the connection is still in step
                        replies.append(exc)
                return replies
            except BaseException:  # anything else (a signal's exception between two replies, say)
                conn.disconnect()  # leaves replies unread: never read them as the next call's
                raise

        return conn.retry.call_with_retry(send_and_read, lambda _: conn.disconnect())

    def execute(self, build: Callable[[Any], None]) -> list[Any]:
        """Run the commands ``build`` puts on a pipeline in one round trip (again, once the scripts are
        loaded, if Redis had lost them: every command such a build queues may run twice)."""
        for attempt in (1, 2):
            with self.redis.pipeline(transaction=False) as pipe:
                build(pipe)
                try:
                    return pipe.execute()
                except NoScriptError:
                    if attempt == 2:
                        raise
                    self._load_scripts()
        raise AssertionError("unreachable")

    # -- configuration -------------------------------------------------------------------------
    def publish_config(self, topic: str, config: SchedulerConfig) -> None:
        """Make ``config`` the one running nodes and the reaper use (no restart needed); a new shard
        count moves every node's load score to its new table in the same step."""
        self._run("PUBLISH_CONFIG", topic, json.dumps(config.as_dict()))
        self.redis.sadd(keys.TOPICS, topic)

    def has_config(self, topic: str) -> bool:
        return self.redis.exists(keys.config(topic), keys.scheduling_config(topic)) == 2

    def config_of(self, topic: str) -> dict[str, Any]:
        raw = self.redis.get(keys.config(topic))
        return json.loads(raw) if raw else {}

    def topics(self) -> list[str]:
        return sorted(t.decode() for t in self.redis.smembers(keys.TOPICS))

    def forget_topic(self, topic: str) -> None:
        """The topic now lives in another Redis: this one stops announcing it (no reaper walks it
        here, no node finds its configuration here)."""
        with self.redis.pipeline() as pipe:
            pipe.srem(keys.TOPICS, topic)
            pipe.delete(keys.config(topic), keys.scheduling_config(topic), keys.events(topic),
                        keys.stats(topic), keys.series(topic))
            pipe.execute()

    def published_config_json(self, topic: str) -> bytes | None:
        """The configuration as published here, byte for byte (None when this Redis has none)."""
        return self.redis.get(keys.config(topic))

    def node_queue(self, topic: str, node: str) -> Queue:
        return Queue(keys.node_queue_name(topic, node), connection=self.redis, serializer=JSONSerializer)

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
        if outcome[0] == "full":
            raise QueueFull(f"queue full: node '{home}' already holds scheduler_max_size="
                            f"{config.scheduler_max_size} waiting requests")
        if outcome[0] == "duplicate":
            raise DuplicateRequest(f"request_id '{request.request_id}' is already in flight in topic "
                                   f"'{topic}'", field="request_id")
        return expired

    def submit_many(self, topic: str, items: list[tuple[str, Request, str]], config: SchedulerConfig,
                    origin: str = "", rq_jobs: bool = True,
                    result_shards: int = 0) -> tuple[list[str], list[str]]:
        """Queue several requests in one round trip: (expired uids, "ok"|"full"|"duplicate" per item).

        ``rq_jobs`` writes each request's rq job hash too, for node workers and django-rq's views; the
        bare scheduler interface (an engine claiming through ``claim``) has no use for it.
        ``result_shards`` spreads the origin's results over that many lists, by request id
        (``result_shard``), so that as many readers can take them without reordering a request's.
        """
        if not items:
            return [], []
        max_size = config.scheduler_max_size if config.scheduler_name == "local" else -1
        calls: list[ScriptCall] = []
        if max_size != -1:  # evict overdue requests first, so that none holds a place in the queue
            calls.append(("EXPIRE_DUE", topic, (500,)))
        for uid, request, home in items:
            shard = str(result_shard(request.request_id, result_shards)) if result_shards else ""
            calls.append(("SUBMIT", topic, (uid, request.request_id, home, json.dumps(request.to_dict()),
                                            request.prompt_len, max_size, origin, random.random(), shard)))
        if rq_jobs:
            def build(pipe) -> None:
                for uid, request, home in items:
                    self._save_job(pipe, topic, uid, request, home, config)
                for name, call_topic, args in calls:
                    self._run(name, call_topic, *args, client=pipe)

            replies = self.execute(build)[-len(calls):]
        else:
            replies = self.run_scripts(calls)
        outcome = [reply[0].decode() for reply in replies[-len(items):]]
        refused = [uid for (uid, _, _), status in zip(items, outcome, strict=True) if status != "ok"]
        if refused and rq_jobs:
            self.redis.delete(*(Job.key_for(uid) for uid in refused))
        expired = [uid.decode() for uid in replies[0]] if max_size != -1 else []
        return expired, outcome

    def _save_job(self, pipe, topic: str, uid: str, request: Request, home: str,
                  config: SchedulerConfig) -> None:
        """The rq job of a request (JSON serializer; its arguments are plain ids) on its home queue."""
        queue = keys.node_queue_name(topic, home)
        job = Job.create(RUN_REQUEST_JOB, args=[topic, uid], id=uid, connection=self.redis,
                         serializer=JSONSerializer, timeout=JOB_TIMEOUT_S, result_ttl=RETENTION_S,
                         failure_ttl=24 * 3600, origin=queue,
                         description=f"request {request.request_id!r} of {topic}")
        job.enqueued_at = rq_now()
        job._status = JobStatus.QUEUED
        job.save(pipeline=pipe)
        pipe.expire(job.key, config.scheduler_ttl + JOB_TIMEOUT_S + RETENTION_S)
        if queue not in self._registered_queues:  # rq's list of queues, for django-rq's views
            pipe.sadd(Queue.redis_queues_keys, keys.rq_queue(queue))
            self._registered_queues.add(queue)

    # -- running --------------------------------------------------------------------------------
    def claim(self, topic: str, node: str, n: int = 1, *, may_steal: bool = True,
              budget: Budget | None = None) -> list[Claim]:
        """Claim up to ``n`` requests for ``node``: its own queue first (FIFO), else, in global mode,
        steal from the most loaded nodes. Overdue requests are expired instead of handed out."""
        b = budget or Budget(-1, 1, 0, 0)
        reply = self._run("CLAIM", topic, node, n, "1" if may_steal else "0", random.random(), LEASE_S,
                          b.available_blocks, b.block_size, b.reserved_output_blocks,
                          b.max_num_batched_tokens)
        return [Claim(uid.decode(), lease.decode(), Request.from_dict(json.loads(payload)), int(streamed),
                      home.decode(), phase.decode()) for uid, lease, payload, streamed, home, phase in reply]

    def emit(self, topic: str, uid: str, lease: str, index: int, token_id: int, text: str) -> int:
        """Stream token ``index``: 1 = cancel asked, 0 = go on, -1 = lease lost, -2 = out of order."""
        return int(self._run("EMIT", topic, *emit_args(uid, lease, index, token_id, text)))

    def finish(self, topic: str, uid: str, lease: str, *, status: str, finish_reason: str | None,
               output_token_ids: Iterable[int] = (), error: tuple[str, str] | None = None) -> str:
        """Record the final status of a running request; returns the status it ends with."""
        final = finish_args(status, finish_reason, output_token_ids, error)
        return self._run("FINISH", topic, uid, lease, *final).decode()

    def streamed_tokens(self, topic: str, uid: str) -> list[int]:
        """The token ids already streamed, in index order (what a resumed run continues after)."""
        return [e.token_id for e in self.read_output(topic, uid, count=100_000) if e.kind == "token"]

    def renew(self, topic: str, node: str, held: dict[str, str], accepts_work: bool = True,
              role: str = "mixed") -> int:
        """Heartbeat: extend the leases ``node`` holds (uid -> lease), record its role, and mark it
        alive for failover and placement while it ``accepts_work``."""
        pairs = [item for uid_lease in held.items() for item in uid_lease]
        return int(self._run("RENEW", topic, LEASE_S, node, "1" if accepts_work else "0", role, *pairs))

    def reclaim(self, topic: str, node: str) -> list[str]:
        """A node starting under its old name takes back the requests it held when it died."""
        return [uid.decode() for uid in self._run("RECLAIM", topic, node)]

    # -- ending ---------------------------------------------------------------------------------
    def cancel(self, topic: str, uid: str) -> str:
        """'cancelled' (was waiting), 'cancelling' (running; stops at its next token), or the final status."""
        return self._run("CANCEL", topic, uid).decode()

    def expire_due(self, topic: str, limit: int = 500) -> list[str]:
        """Evict every request of ``topic`` that waited its TTL; returns their uids."""
        return [uid.decode() for uid in self._run("EXPIRE_DUE", topic, limit)]

    def recover(self, topic: str, limit: int = 500) -> list[tuple[str, str]]:
        """Requeue running requests whose lease ran out; returns (uid, node it went to) pairs."""
        reply = self._run("RECOVER", topic, limit, DEAD_AFTER_S, random.random())
        return [(u.decode(), n.decode()) for u, n in reply]

    def hand_off(self, topic: str, uid: str, lease: str, num_bytes: int, ms: float) -> bool:
        """Splitwise: the prefill node is done (KV cache written, first token streamed); the request
        moves to its decode node's queue. False when the lease is no longer the caller's."""
        return bool(self._run("HANDOFF", topic, uid, lease, num_bytes, f"{ms:.3f}"))

    def place_pending(self, topic: str, limit: int = 500) -> int:
        """Splitwise: place requests that waited for an eligible node; returns how many were placed."""
        return int(self._run("PLACE_PENDING", topic, random.random(), limit))

    def upkeep(self, topic: str) -> Upkeep:
        """One reaper pass over ``topic`` in one round trip: failover of expired leases, splitwise
        upkeep and pending placement, global re-homing, then TTL eviction (in that order)."""
        recovered, off_expired, placed, rehomed, expired = self.run_scripts([
            ("RECOVER", topic, (500, DEAD_AFTER_S, random.random())),
            ("SPLITWISE_UPKEEP", topic, (random.random(), 1000)),
            ("PLACE_PENDING", topic, (random.random(), 500)),
            ("REHOME", topic, (DEAD_AFTER_S, 1000)),
            ("EXPIRE_DUE", topic, (500,)),
        ])
        return Upkeep([(u.decode(), n.decode()) for u, n in recovered], int(off_expired), int(placed),
                      int(rehomed), [uid.decode() for uid in expired])

    def splitwise_upkeep(self, topic: str, limit: int = 1000) -> int:
        """Splitwise: drop expired nodes (their queues back to placement), release leaked load."""
        return int(self._run("SPLITWISE_UPKEEP", topic, random.random(), limit))

    def rehome(self, topic: str, limit: int = 1000) -> int:
        """Global mode: move the queues of dead nodes to live ones; returns how many moved."""
        return int(self._run("REHOME", topic, DEAD_AFTER_S, limit))

    # -- reading --------------------------------------------------------------------------------
    def state(self, topic: str, uid: str) -> dict[str, str]:
        """The request hash (empty when Redis no longer has it)."""
        return decode_hash(self.redis.hgetall(keys.request(topic, uid)))

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
        reply = self.run_command("BLMPOP", timeout_s, 1, keys.results(topic, origin), "LEFT", "COUNT", limit)
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
        shards = int(self.config_of(topic).get("scheduler_load_shards_num", 1))
        with self.redis.pipeline(transaction=False) as pipe:
            for node in nodes:
                pipe.zscore(keys.load_table(topic, shard_of(node, shards)), node)
            return {node: float(s or 0) for node, s in zip(nodes, pipe.execute(), strict=True)}

    def pd_load(self, topic: str, node: str) -> int:
        """A node's splitwise load: prompt tokens in flight (prefill, mixed) or requests (decode)."""
        return int(self.redis.hget(keys.pd_load(topic), node) or 0)

    def wait_for_work(self, topic: str, node: str, timeout_s: float) -> bool:
        """Block until work lands in ``node``'s queue (its bell rings) or ``timeout_s`` passes."""
        return self.redis.blpop([keys.bell(topic, node)], timeout=timeout_s) is not None

    # -- what the console watches ----------------------------------------------------------------
    def add_event(self, topic: str, kind: str, **fields: Any) -> None:
        """An event the console noticed itself (a node joined, went stale, died), beside the scripts'."""
        entry = {"kind": kind, "at": f"{time.time():.6f}", **{k: str(v) for k, v in fields.items()}}
        self.redis.xadd(keys.events(topic), entry, maxlen=keys.EVENTS_KEPT, approximate=True)

    def events(self, topic: str, after: str | None = None, count: int = 50) -> list[dict[str, str]]:
        """Events after the id ``after``, oldest first; without it the latest ``count``."""
        if after is None:
            raw = list(reversed(self.redis.xrevrange(keys.events(topic), count=count)))
        else:
            raw = self.redis.xrange(keys.events(topic), min=f"({after}", count=count)
        return [{"id": eid.decode(), **decode_hash(fields)} for eid, fields in raw]

    def last_event_id(self, topic: str) -> str:
        raw = self.redis.xrevrange(keys.events(topic), count=1)
        return raw[0][0].decode() if raw else "0-0"

    def counters(self, topic: str) -> dict[str, int]:
        """Running totals the scripts keep: submitted, tokens, and one per final status."""
        return {k: int(v) for k, v in decode_hash(self.redis.hgetall(keys.stats(topic))).items()}

    def record_point(self, topic: str, point: dict[str, Any], keep: int = SERIES_KEPT) -> None:
        """Append one chart point (newest first in Redis), keeping the last ``keep``."""
        key = keys.series(topic)
        with self.redis.pipeline() as pipe:
            pipe.lpush(key, json.dumps(point, separators=(",", ":")))
            pipe.ltrim(key, 0, keep - 1)
            pipe.execute()

    def series(self, topic: str, count: int = SERIES_KEPT) -> list[dict[str, Any]]:
        """The last ``count`` chart points, oldest first."""
        return [json.loads(item) for item in reversed(self.redis.lrange(keys.series(topic), 0, count - 1))]

    def waiting_count(self, topic: str) -> int:
        """Requests waiting anywhere in the topic: node queues and the splitwise pending list."""
        return int(self.redis.zcard(keys.waiting(topic)))

    # -- heartbeats -----------------------------------------------------------------------------
    def write_heartbeat(self, topic: str, node: str, fields: dict[str, Any],
                        held: dict[str, str] | None = None, ttl_s: int = 3600,
                        accepts_work: bool = True) -> None:
        """The node's heartbeat hash (for the console) plus liveness and lease renewal (for failover)."""
        key = keys.heartbeat(topic, node)

        def build(pipe) -> None:
            pipe.hset(key, mapping={**{k: str(v) for k, v in fields.items()}, "ts": f"{time.time():.6f}"})
            pipe.expire(key, ttl_s)
            if fields.get("state") != "stopped":
                pairs = [item for uid_lease in (held or {}).items() for item in uid_lease]
                role = str(fields.get("role", "mixed"))
                self._run("RENEW", topic, LEASE_S, node, "1" if accepts_work else "0", role, *pairs,
                          client=pipe)
            else:
                pipe.zrem(keys.alive(topic), node)

        self.execute(build)

    def read_heartbeats(self, topic: str, nodes: list[str]) -> dict[str, dict[str, str]]:
        with self.redis.pipeline(transaction=False) as pipe:
            for node in nodes:
                pipe.hgetall(keys.heartbeat(topic, node))
            return {node: decode_hash(raw) for node, raw in zip(nodes, pipe.execute(), strict=True)}


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
