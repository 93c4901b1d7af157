"""A node process: one rq worker (no fork per job) with the model resident on its device.

``NodeWorker`` is rq's ``SimpleWorker`` with the JSON serializer, bound to the node's own queue. It
does not pop rq's list itself: its engine's step loop (``gpu_worker.serving``) claims through the
store what the engine can admit (own queue first, stealing in global mode), which moves the load
score and takes a lease in the same atomic step, then hands rq each claim as a job; running the job
admits the request into the batch, and the job stays started until the request ends. That job is
built here from the claim (topic, uid) and names ``run_request`` by reference: nothing read from
Redis is imported or called. A job hash in Redis that names another
function or any callback was written by someone else; it is logged, overwritten, and never run. rq's
registry maintenance, which runs the failure callbacks that abandoned jobs' hashes name, is replaced
by one that only drops the abandoned entries (failover moves their requests on), and its queue
enqueues no dependents that a set in Redis may list.

Beside the job loop run three daemon threads: the heartbeat (liveness for the console, lease renewal
for failover), the reaper (TTL eviction, failover of dead nodes' work) and the admin-state poller.
SIGTERM is a warm shutdown: the node claims nothing more, finishes the requests it holds, then exits 0.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
import zlib
from collections import deque
from typing import Any

import redis
from rq import Queue, worker_registration
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import current_timestamp
from rq.utils import now as rq_now
from rq.worker import SimpleWorker, WorkerStatus

from gpu_worker.jobs import run_request
from gpu_worker.runtime import UNKNOWN, NodeRuntime, install_runtime
from gpu_worker.serving import StepLoop
from scheduler import failover, keys, splitwise
from scheduler.liveness import HEARTBEAT_INTERVAL_S, HEARTBEAT_KEY_TTL_S
from scheduler.reaper import Reaper
from scheduler.store import JOB_FAILURE_TTL_S, JOB_TIMEOUT_S, RUN_REQUEST_JOB, Claim

log = logging.getLogger(__name__)
# How long an idle node waits for its bell before it looks again for work to steal. Only its own
# queue rings it, so this bounds how late a thief notices a skewed node (an empty claim costs ~15 us).
# Its BLPOP is the node's only blocking command: far within the client's read timeout (MAX_BLOCK_S).
IDLE_WAIT_S = 0.05
# What a Redis that does not answer raises: refused or reset (ConnectionError), or no reply within
# the client's timeouts (TimeoutError, which is not a ConnectionError in redis-py).
NOT_ANSWERING = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class Heartbeat(threading.Thread):
    def __init__(self, runtime: NodeRuntime) -> None:
        super().__init__(name="fd-heartbeat", daemon=True)
        self.runtime = runtime
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(HEARTBEAT_INTERVAL_S):
            try:
                self.beat("busy" if self.runtime.held else "idle")
            except Exception:  # top-level loop: a Redis hiccup must not kill the heartbeat
                log.exception("heartbeat failed")

    def beat(self, state: str) -> None:
        rt = self.runtime
        figures = rt.loop.figures() if rt.loop is not None else {}
        rt.store.write_heartbeat(rt.topic, rt.name, {
            "state": state, "role": rt.role, "host": socket.gethostname(), "pid": os.getpid(),
            "device": str(rt.engine.device), "running": ",".join(list(rt.held)),
            "admin_state": rt.admin_state,
            "transfer": "redis", "load": splitwise.pd_load(rt.store, rt.topic, rt.name), **figures,
        }, rt.leases, ttl_s=HEARTBEAT_KEY_TTL_S, accepts_work=rt.admin_state == "enabled")

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)
        try:
            self.beat("stopped")
        except Exception:
            log.warning("could not write the final heartbeat")


class AdminStatePoller(threading.Thread):
    """Follows the node's admin state (enable, drain, disable) from the console. Apart from the
    heartbeat, so that a slow database can never delay a lease renewal and lose running work.

    It fails closed: a read that fails keeps the last state read (a disabled node stays disabled
    through a database outage), and a node that has not read its state since it started is UNKNOWN,
    which claims nothing, until a read succeeds. An outage is logged when it begins and when it ends,
    not at every poll."""

    def __init__(self, runtime: NodeRuntime) -> None:
        super().__init__(name="fd-admin-state", daemon=True)
        self.runtime = runtime
        self.stopped = threading.Event()
        self.failing_since: float | None = None  # monotonic time of the first failed read of an outage

    def run(self) -> None:
        while not self.stopped.wait(HEARTBEAT_INTERVAL_S):
            self.poll()

    def poll(self) -> None:
        rt = self.runtime
        try:
            state = rt.hooks.admin_state(rt.name)
        except Exception as exc:  # top-level loop: whatever the database raised, keep the last known state
            if self.failing_since is None:
                self.failing_since = time.monotonic()
                log.warning("node %s cannot read its admin state (%s: %s); it keeps %r until it can%s",
                            rt.name, type(exc).__name__, exc, rt.admin_state,
                            "" if rt.may_claim else ", claiming nothing")
            return
        if self.failing_since is not None:
            log.warning("node %s reads its admin state again after %.0f s: %s", rt.name,
                        time.monotonic() - self.failing_since, state)
            self.failing_since = None
        rt.admin_state = state


class NodeQueue(Queue):
    """A node's rq queue as its worker sees it. A request's job has no dependents, so what a
    dependents set in Redis lists is never enqueued: it would land in the scheduler's queues behind
    the scripts' back (a node queue's length is its load score)."""

    def enqueue_dependents(self, job: Job, pipeline: Any = None, exclude_job_id: str | None = None) -> None:
        return None


class NodeWorker(SimpleWorker):
    """rq's in-process worker bound to one node's queue, running its engine's step loop."""

    def __init__(self, runtime: NodeRuntime, **kwargs: Any) -> None:
        self.node_queue = NodeQueue(keys.node_queue_name(runtime.topic, runtime.name),
                                    connection=runtime.store.redis, serializer=JSONSerializer)
        super().__init__(
            [self.node_queue], connection=runtime.store.redis, serializer=JSONSerializer,
            name=f"fdnode.{runtime.name}.{uuid.uuid4().hex[:8]}", **kwargs,
        )
        self.runtime = runtime
        self.loop = runtime.loop = StepLoop(runtime, self.name, self.connection)
        self.claimed: deque[Claim] = deque()  # claimed, handed to rq one job at a time
        self.rq_beat_at = 0.0

    def _set_connection(self, connection: redis.Redis) -> redis.Redis:
        """Keeps the client's read timeout (``scheduler.connection.READ_TIMEOUT_S``). rq would raise it
        on the shared pool to its dequeue timeout plus 10 s (minutes) for a BLPOP this worker never
        makes: its only blocking command is ``wait_for_work``'s, for IDLE_WAIT_S. With rq's timeout a
        Redis that stops answering would hang the node, its heartbeat and reaper for minutes."""
        return connection

    def work(self, burst: bool = False, **kwargs: Any) -> bool:
        rt = self.runtime
        # SIGTERM and Ctrl-C stop the node gracefully from its first heartbeat on, not only once rq's
        # loop starts (it installs the same handlers): a node told to stop as soon as it shows itself
        # alive ends its loop at once and says so in a last heartbeat, instead of dying of the signal.
        self._install_signal_handlers()
        install_runtime(rt)
        rt.admin_state = UNKNOWN  # until read: an admin may have disabled this node while it was down
        poller = AdminStatePoller(rt)
        poller.poll()
        taken = failover.reclaim(rt.store, rt.topic, rt.name)
        if taken:
            log.info("node %s took back %d request(s) it held before it stopped", rt.name, len(taken))
        heartbeat = Heartbeat(rt)
        heartbeat.beat("idle")  # alive before the first claim, so failover never picks a dead node over it
        reaper = Reaper(rt.store, rt.hooks.on_expired)
        for thread in (heartbeat, reaper, poller, self.loop.hooks):
            thread.start()
        try:
            worked = super().work(burst=burst, **kwargs)
            self._finish_held()
            return worked
        finally:
            poller.stopped.set()
            reaper.stop()
            heartbeat.stop()
            self.loop.hooks.stop()

    def _finish_held(self) -> None:
        """Before exiting, every request the node holds finishes here, those claimed but not yet
        started included. The heartbeat keeps their leases alive meanwhile."""
        while self.claimed:
            self.execute_job(self._job_for(self.claimed[0]), self.node_queue)
            self.claimed.popleft()
        while self.runtime.engine.has_work:
            self.loop.step(claim=False)
        self.loop.flush()

    def _shutdown(self) -> None:
        """SIGTERM or Ctrl-C: stop claiming; rq's loop ends once this request is handed to the engine."""
        self._stop_requested = True

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Admits the claimed request into the running batch (``run_request``); returns at once."""
        run_request(self.runtime.topic, job.id, job=job)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None):
        """Steps the engine until a claim comes in (rq's loop calls this, then ``execute_job``);
        None ends a burst, an idle limit, or the worker on request."""
        rt = self.runtime
        idle_since = time.monotonic()
        backoff = 1.0
        while True:
            if self._stop_requested and not self.claimed:
                return None
            busy = rt.engine.has_work
            try:
                if self.claimed:
                    job = self._job_for(self.claimed[0])
                    self.claimed.popleft()
                    return job, self.node_queue
                self._maintain(busy)
                if busy:
                    self._hold(self.loop.step(claim=not self._stop_requested))
                    idle_since = time.monotonic()
                    continue
                self.loop.flush()
                call = self.loop.claim_call()
                self._hold(rt.store.parse_claims(rt.store.run(call)) if call is not None else [])
            except NOT_ANSWERING as exc:
                log.error("Redis did not answer (%s); letting go of what runs, trying again in %.0f s",
                          exc, backoff)
                self.loop.drop_all()
                self.claimed.clear()  # claimed but not started: failover carries them on too
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            if self.claimed:
                continue
            if timeout is None:  # burst mode: nothing left
                return None
            if max_idle_time is not None and time.monotonic() - idle_since > max_idle_time:
                return None
            try:
                rt.store.wait_for_work(rt.topic, rt.name, IDLE_WAIT_S)
            except NOT_ANSWERING:
                continue  # handled with a backoff on the next claim

    def _hold(self, claims: list[Claim]) -> None:
        for claim in claims:
            self.runtime.held[claim.uid] = claim  # the heartbeat renews its lease from now on
            self.claimed.append(claim)

    def _maintain(self, busy: bool) -> None:
        """rq's worker heartbeat and state (for django-rq's worker views), at most once a second."""
        if time.monotonic() - self.rq_beat_at < 1.0:
            return
        self.rq_beat_at = time.monotonic()
        self.heartbeat()
        state = WorkerStatus.BUSY if busy else WorkerStatus.IDLE
        if self.get_state() != state:
            self.set_state(state)
            self.procline(f"{'Running a batch' if busy else 'Listening'} on {self.node_queue.name}")

    def _job_for(self, claim: Claim) -> Job:
        """The job that runs ``claim``: built here, never read back from Redis. What the request's job
        hash names is only looked at, to warn when someone else wrote it; then it is overwritten with
        this job, so that django-rq shows what actually runs."""
        key = Job.key_for(claim.uid)
        planted = _foreign_code(dict(zip(JOB_CODE_FIELDS, self.connection.hmget(key, JOB_CODE_FIELDS),
                                         strict=True)))
        topic = self.runtime.topic
        job = Job.create(run_request, args=[topic, claim.uid], id=claim.uid, connection=self.connection,
                         serializer=JSONSerializer, timeout=JOB_TIMEOUT_S, result_ttl=keys.RETENTION_S,
                         failure_ttl=JOB_FAILURE_TTL_S, origin=self.node_queue.name,
                         description=f"request {claim.request.request_id!r} of {topic}")
        if planted:
            log.warning("request %s: its rq job hash names %s; ignored: the node runs the request it "
                        "claimed and nothing else", claim.uid, ", ".join(planted))
            with self.connection.pipeline() as pipe:
                pipe.delete(key)  # whatever else its writer left in it goes too
                job.save(pipeline=pipe)
                pipe.expire(key, JOB_TIMEOUT_S + keys.RETENTION_S)
                pipe.execute()
        return job

    def clean_registries(self) -> None:
        """rq's maintenance, without what runs code: rq fetches each abandoned job of the started
        registry and calls the failure callback its hash names. Here abandoned entries (a node that
        died mid-request; failover has moved the request on) are dropped, and nothing is fetched."""
        for queue in self.queues:
            if queue.acquire_maintenance_lock():
                options = {"connection": self.connection, "serializer": JSONSerializer}
                started = StartedJobRegistry(queue.name, **options)
                self.connection.zremrangebyscore(started.key, 0, current_timestamp())
                FinishedJobRegistry(queue.name, **options).cleanup()
                FailedJobRegistry(queue.name, **options).cleanup()
                worker_registration.clean_worker_registry(queue)
                queue.release_maintenance_lock()
        self.last_cleaned_at = rq_now()


CALLBACK_FIELDS = ("success_callback_name", "failure_callback_name", "stopped_callback_name")
JOB_CODE_FIELDS = ("data", *CALLBACK_FIELDS, "webhooks")  # where a job hash names code to run
MAX_JOB_DATA = 1 << 16  # a request job's data is its function name and two ids


def _foreign_code(job_hash: dict[str, bytes | None]) -> list[str]:
    """What a request's job hash names besides ``run_request``: another function, callbacks, webhooks.
    Read as data only (zlib, JSON); nothing in it is imported."""
    found = []
    raw = job_hash.get("data")
    if raw:
        try:  # at most MAX_JOB_DATA bytes inflated: a bomb ends as unreadable, not as memory
            func_name = json.loads(zlib.decompressobj().decompress(raw, MAX_JOB_DATA))[0]
        except (zlib.error, ValueError, TypeError, IndexError, KeyError):
            func_name = "unreadable job data"
        if func_name != RUN_REQUEST_JOB:
            found.append(f"function {func_name!r}")
    for name in CALLBACK_FIELDS:
        if job_hash.get(name):
            found.append(f"{name.removesuffix('_name')} {job_hash[name].decode(errors='replace')!r}")
    if job_hash.get("webhooks"):
        found.append("webhooks")
    return found
