"""A node process: one rq worker (no fork per job) with the model resident on its device.

``NodeWorker`` is rq's ``SimpleWorker`` with the JSON serializer, bound to the node's own queue. It
does not pop rq's list itself: it claims through the store (own queue first, stealing when idle in
global mode), which moves the load score and takes a lease in the same atomic step, then hands the job
to rq to perform. Beside the job loop run two daemon threads: the heartbeat (liveness for the console,
lease renewal for failover) and the reaper (TTL eviction, failover of dead nodes' work). SIGTERM is rq's
warm shutdown: the current request finishes, then the process exits 0.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker, WorkerStatus

from scheduler.liveness import HEARTBEAT_INTERVAL_S, HEARTBEAT_KEY_TTL_S
from scheduler.reaper import Reaper
from scheduler.store import JOB_TIMEOUT_S, RUN_REQUEST_JOB, Claim, RequestStore

log = logging.getLogger(__name__)
# How long an idle node waits for its bell before it looks again for work to steal. Only its own
# queue rings it, so this bounds how late a thief notices a skewed node (an empty claim costs ~15 us).
IDLE_WAIT_S = 0.05


@dataclass
class NodeHooks:
    """What the node tells its host application (the console's database) about its work."""

    on_change: Callable[[str, str], None] = lambda topic, uid: None  # a request's state moved
    on_finished: Callable[[str, bool], None] = lambda node, stolen: None  # ran one (stolen or not)
    on_expired: Callable[[str, list[str]], None] = lambda topic, uids: None  # the reaper ended these
    admin_state: Callable[[str], str] = lambda node: "enabled"  # enabled, draining or disabled


@dataclass
class NodeRuntime:
    topic: str
    name: str
    role: str
    store: RequestStore
    engine: Any  # gpu_worker.engine.Engine, loaded once
    hooks: NodeHooks = field(default_factory=NodeHooks)
    held: dict[str, Claim] = field(default_factory=dict)  # uid -> claim of the requests it runs
    admin_state: str = "enabled"  # draining: finishes its own queue, steals nothing; disabled: claims nothing
    token_delay_s: float = 0.0  # a pause after each streamed token (demos, failover tests)

    @property
    def may_claim(self) -> bool:
        return self.admin_state != "disabled"

    @property
    def may_steal(self) -> bool:
        return self.admin_state == "enabled"

    @property
    def leases(self) -> dict[str, str]:
        return {uid: claim.lease for uid, claim in list(self.held.items())}


_runtime: NodeRuntime | None = None


def install_runtime(runtime: NodeRuntime) -> None:
    global _runtime
    _runtime = runtime


def current_runtime() -> NodeRuntime:
    if _runtime is None:
        raise RuntimeError("no node runtime installed: jobs run only inside `manage.py fdnode`")
    return _runtime


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
        rt.store.write_heartbeat(rt.topic, rt.name, {
            "state": state, "role": rt.role, "host": socket.gethostname(), "pid": os.getpid(),
            "device": str(rt.engine.device), "running": ",".join(rt.held), "admin_state": rt.admin_state,
            "transfer": "redis", "load": rt.store.pd_load(rt.topic, rt.name),
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
    heartbeat, so that a slow database can never delay a lease renewal and lose running work."""

    def __init__(self, runtime: NodeRuntime) -> None:
        super().__init__(name="fd-admin-state", daemon=True)
        self.runtime = runtime
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(HEARTBEAT_INTERVAL_S):
            try:
                self.runtime.admin_state = self.runtime.hooks.admin_state(self.runtime.name)
            except Exception:  # top-level loop: keep the last known state
                log.exception("could not read the admin state")


class NodeWorker(SimpleWorker):
    """rq's in-process worker bound to one node's queue, claiming through the scheduler."""

    def __init__(self, runtime: NodeRuntime, **kwargs: Any) -> None:
        self.node_queue = runtime.store.node_queue(runtime.topic, runtime.name)
        super().__init__(
            [self.node_queue], connection=runtime.store.redis, serializer=JSONSerializer,
            name=f"fdnode.{runtime.name}.{uuid.uuid4().hex[:8]}", **kwargs,
        )
        self.runtime = runtime

    def work(self, burst: bool = False, **kwargs: Any) -> bool:
        rt = self.runtime
        install_runtime(rt)
        rt.admin_state = rt.hooks.admin_state(rt.name)
        taken = rt.store.reclaim(rt.topic, rt.name)
        if taken:
            log.info("node %s took back %d request(s) it held before it stopped", rt.name, len(taken))
        heartbeat = Heartbeat(rt)
        heartbeat.beat("idle")  # alive before the first claim, so failover never picks a dead node over it
        reaper = Reaper(rt.store, rt.hooks.on_expired)
        poller = AdminStatePoller(rt)
        for thread in (heartbeat, reaper, poller):
            thread.start()
        try:
            return super().work(burst=burst, **kwargs)
        finally:
            poller.stopped.set()
            reaper.stop()
            heartbeat.stop()

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None):
        """Claim the next request (rq's loop calls this); None ends a burst or an idle limit."""
        rt = self.runtime
        self.set_state(WorkerStatus.IDLE)
        self.procline(f"Listening on {self.node_queue.name}")
        idle_since = time.monotonic()
        backoff = 1.0
        while True:
            try:
                self.heartbeat()
                claims = rt.store.claim(rt.topic, rt.name, 1, may_steal=rt.may_steal) if rt.may_claim else []
            except redis.exceptions.ConnectionError as exc:
                log.error("Redis did not answer (%s); trying again in %.0f s", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            if claims:
                claim = claims[0]
                rt.held[claim.uid] = claim
                return self._job_for(claim), self.node_queue
            if timeout is None:  # burst mode: nothing left
                return None
            if max_idle_time is not None and time.monotonic() - idle_since > max_idle_time:
                return None
            try:
                rt.store.wait_for_work(rt.topic, rt.name, IDLE_WAIT_S)
            except redis.exceptions.ConnectionError:
                continue  # handled with a backoff on the next claim

    def _job_for(self, claim: Claim) -> Job:
        try:
            return Job.fetch(claim.uid, connection=self.connection, serializer=JSONSerializer)
        except NoSuchJobError:  # rq let the job hash go (a long wait); the claim is what counts
            return Job.create(RUN_REQUEST_JOB, args=[self.runtime.topic, claim.uid], id=claim.uid,
                              connection=self.connection, serializer=JSONSerializer,
                              timeout=JOB_TIMEOUT_S, origin=self.node_queue.name)
