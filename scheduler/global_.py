"""The Global scheduler behind FastDeploy's four calls: Redis-backed, with work stealing.

Design note. One instance is one node of a topic and, as in FastDeploy, also the origin of the
requests it puts: ``put_requests`` queues them on this node (their home), ``get_requests`` claims from
this node's queue and steals from the most loaded nodes when it is empty, ``put_results`` streams
results under the lease taken at claim time, and ``get_results`` takes what reached this origin,
whichever node ran the request. Each call is one round trip (a pipeline of Lua scripts), whatever the
batch size.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Any

from redis import Redis

from scheduler.base import Scheduler
from scheduler.config import SchedulerConfig
from scheduler.connection import connect, topic_redis_url
from scheduler.liveness import HEARTBEAT_INTERVAL_S
from scheduler.messages import Request, Result
from scheduler.reaper import Reaper
from scheduler.store import Budget, Claim, RequestStore, ScriptCall, emit_args, finish_args, new_uid

log = logging.getLogger(__name__)


class GlobalScheduler(Scheduler):
    name = "global"
    result_shards = 0  # one result list per origin

    def __init__(self, config: SchedulerConfig, redis: Redis | None = None, node: str = "node-0",
                 origin: str | None = None, liveness: bool = True, role: str = "mixed") -> None:
        """Without ``redis``, connect where the config's scheduler_host/port/db/password say, as
        FastDeploy's schedulers do."""
        self.config = config
        self.role = role
        self.topic = config.scheduler_topic
        self.node = node
        self.origin = origin or node
        self.store = RequestStore(redis if redis is not None else connect(topic_redis_url(config)))
        self.store.publish_config(self.topic, config)
        self.running: dict[str, Claim] = {}  # request_id -> claim, for the results this node puts
        self.uids: dict[str, str] = {}  # request_id -> uid of the requests this origin put
        self.cancelled: set[str] = set()  # running requests whose client cancelled: the engine stops them
        self._lock = threading.Lock()
        # Like any node: a heartbeat that renews the leases it holds (else its work would be taken
        # back after LEASE_S) and a reaper (TTL eviction, failover of dead nodes' work).
        self._stopped = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name=f"fd-heartbeat-{node}", daemon=True)
        self._reaper = Reaper(self.store)
        if liveness:
            self._beat_once()
            self._heartbeat.start()
            self._reaper.start()

    def _beat_once(self) -> None:
        with self._lock:
            held = {claim.uid: claim.lease for claim in self.running.values()}
        self.store.write_heartbeat(self.topic, self.node, {"state": "busy" if held else "idle",
                                                           "role": self.role}, held)

    def _beat(self) -> None:
        while not self._stopped.wait(HEARTBEAT_INTERVAL_S):
            try:
                self._beat_once()
            except Exception:  # top-level loop: a Redis hiccup must not stop the heartbeat
                log.exception("heartbeat of %s failed", self.node)

    def close(self) -> None:
        """Stop the heartbeat and the reaper (the node then counts as dead)."""
        self._stopped.set()
        self._reaper.stop()
        for thread in (self._heartbeat, self._reaper):
            if thread.is_alive():
                thread.join(timeout=2)

    def put_requests(self, requests: list[Request]) -> list[tuple[str, str | None]]:
        items = [(new_uid(), request, self.node) for request in requests]
        _, outcome = self.store.submit_many(self.topic, items, self.config, origin=self.origin, rq_jobs=False,
                                            result_shards=self.result_shards)
        answers = []
        with self._lock:
            for (uid, request, _), status in zip(items, outcome, strict=True):
                if status == "ok":
                    self.uids[request.request_id] = uid
                answers.append((request.request_id, _refusal(status, request.request_id)))
        return answers

    def get_requests(self, available_blocks: int, block_size: int, reserved_output_blocks: int,
                     max_num_batched_tokens: int, batch: int = 1) -> list[Request]:
        if batch < 1 or available_blocks <= reserved_output_blocks:
            return []
        budget = Budget(available_blocks, block_size, reserved_output_blocks, max_num_batched_tokens)
        claims = self.store.claim(self.topic, self.node, batch, budget=budget)
        with self._lock:
            for claim in claims:
                self.running[claim.request.request_id] = claim
        return [claim.request for claim in claims]

    def put_results(self, results: list[Result]) -> None:
        """Stream results of requests this node claimed; a final result ends its request. One round
        trip, one script per result (a final result carrying the last token included)."""
        with self._lock:
            calls = [(result, _stream_call(self.topic, result, self.running.get(result.request_id)))
                     for result in results]
        calls = [(result, call) for result, call in calls if call is not None]
        replies = self.store.run_scripts([call for _, call in calls]) if calls else []
        with self._lock:
            for (result, _), reply in zip(calls, replies, strict=True):
                emitted = reply[0] if isinstance(reply, list) else reply  # EMIT's reply; FINISH's is a status
                if emitted == 1:
                    self.cancelled.add(result.request_id)
                elif isinstance(emitted, int) and emitted < 0:
                    log.warning("result for %s dropped: this node no longer holds it (%d)", result.request_id,
                                emitted)
            for result in results:
                if result.finished:
                    self.running.pop(result.request_id, None)
                    self.cancelled.discard(result.request_id)

    def is_cancelled(self, request_id: str) -> bool:
        """Whether the client cancelled a request this node runs (stop it and put a final result)."""
        with self._lock:
            return request_id in self.cancelled

    def get_results(self) -> dict[str, list[Result]]:
        grouped: dict[str, list[Result]] = defaultdict(list)
        for raw in self.store.take_results(self.topic, self.origin):
            result = Result.from_dict(raw)
            grouped[result.request_id].append(result)
            if result.finished:
                with self._lock:
                    self.uids.pop(result.request_id, None)
        return dict(grouped)

    def cancel(self, request_id: str) -> bool:
        with self._lock:
            uid = self.uids.get(request_id)
        return uid is not None and self.store.cancel(self.topic, uid) in ("cancelled", "cancelling")

    def reset(self) -> None:
        with self._lock:
            self.running.clear()
            self.uids.clear()

    def stats(self) -> dict[str, Any]:
        nodes = [self.node]
        return {"scheduler": self.name, "node": self.node,
                "load_scores": self.store.load_scores(self.topic, nodes),
                "queue_lengths": self.store.queue_lengths(self.topic, nodes), "running": len(self.running)}

    def apply_config(self, config: SchedulerConfig) -> None:
        self.store.publish_config(self.topic, config)
        self.config = config


def _stream_call(topic: str, result: Result, claim: Claim | None) -> ScriptCall | None:
    """The script that streams ``result`` under ``claim`` (None when this node does not hold it)."""
    if claim is None:
        return None
    token = result.token_id is not None and result.token_id >= 0
    emit = emit_args(claim.uid, claim.lease, result.index, result.token_id, result.text) if token else ()
    if not result.finished:
        return ("EMIT", topic, emit) if token else None
    error = (result.error["code"], result.error.get("message", "")) if result.error else None
    final = finish_args("failed" if result.error else "finished", result.finish_reason, error=error)
    if token:
        return "EMIT_FINISH", topic, (*emit, *final)
    return "FINISH", topic, (claim.uid, claim.lease, *final)


def _refusal(status: str, request_id: str) -> str | None:
    if status == "ok":
        return None
    if status == "duplicate":
        return f"duplicate request id '{request_id}'"
    return "queue full"
