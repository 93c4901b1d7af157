"""The Global and Splitwise schedulers behind FastDeploy's four calls: one node of a topic over Redis.

Design note. One instance is one node of a topic and, as in FastDeploy, also the origin of the
requests it puts: ``put_requests`` queues them on this node (their home; in splitwise mode placement
chooses), ``get_requests`` claims from this node's queue (stealing from the most loaded nodes when it
is empty, in global mode), ``put_results`` streams results under the lease taken at claim time, and
``get_results`` takes what reached this origin, whichever node ran the request. Each call is one round
trip of the cluster's own scripts (``scheduler.store``), whatever the batch size.

``SplitwiseScheduler`` adds how results travel: ``put_results`` hands them to
``scheduler_writer_parallel`` writer threads, each writing batches of up to
``scheduler_writer_batch_size`` in one round trip, and ``scheduler_reader_parallel`` reader threads take
batches of up to ``scheduler_reader_batch_size`` from the origin's result lists. A request's results
always go through the same writer and the same list (chosen by its id), so they arrive in order,
first token first.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from typing import Any

from redis import Redis

from scheduler.config import SchedulerConfig
from scheduler.connection import connect, topic_redis_url
from scheduler.interface.base import Scheduler
from scheduler.liveness import HEARTBEAT_INTERVAL_S
from scheduler.messages import Request, Result
from scheduler.reaper import Reaper
from scheduler.scripts import ScriptCall
from scheduler.status import CancelReply, EmitReply, RequestStatus, SubmitReply
from scheduler.store import Budget, Claim, RequestStore, emit_call, finish_call, new_uid, result_shard

log = logging.getLogger(__name__)
IDLE_S = 0.1  # the longest a reader blocks on an empty list before it checks whether to stop
GATHER_S = 0.002  # a writer gathers results this long for one round trip (a token's latency cost); it
# sleeps rather than waking for each result that arrives meanwhile: one wake-up per batch


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
            for (uid, request, _), reply in zip(items, outcome, strict=True):
                if reply == SubmitReply.OK:
                    self.uids[request.request_id] = uid
                answers.append((request.request_id, _refusal(reply, request.request_id)))
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
        replies = self.store.runner.run_scripts([call for _, call in calls]) if calls else []
        with self._lock:
            for (result, _), reply in zip(calls, replies, strict=True):
                emitted = reply[0] if isinstance(reply, list) else reply  # EMIT's reply; FINISH's is a status
                if emitted == EmitReply.CANCEL_ASKED:
                    self.cancelled.add(result.request_id)
                elif emitted in (EmitReply.LEASE_LOST, EmitReply.OUT_OF_ORDER):
                    log.warning("result for %s dropped: %s", result.request_id, EmitReply(emitted).name)
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
        return uid is not None and self.store.cancel(self.topic, uid) in (RequestStatus.CANCELLED,
                                                                          CancelReply.CANCELLING)

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
    if not result.finished:
        if not token:
            return None
        return emit_call(topic, claim.uid, claim.lease, result.index, result.token_id, result.text)
    error = (result.error["code"], result.error.get("message", "")) if result.error else None
    status = RequestStatus.FAILED if result.error else RequestStatus.FINISHED
    last_token = (result.index, result.token_id, result.text) if token else None
    return finish_call(topic, claim.uid, claim.lease, status, result.finish_reason, error=error,
                       last_token=last_token)


def _refusal(reply: SubmitReply, request_id: str) -> str | None:
    if reply == SubmitReply.OK:
        return None
    if reply == SubmitReply.DUPLICATE:
        return f"duplicate request id '{request_id}'"
    return "queue full"


class SplitwiseScheduler(GlobalScheduler):
    name = "splitwise"

    def __init__(self, config: SchedulerConfig, redis: Redis | None = None, node: str = "node-0",
                 origin: str | None = None, liveness: bool = True, role: str = "mixed") -> None:
        self.result_shards = config.scheduler_reader_parallel
        super().__init__(config, redis, node, origin, liveness, role)
        self._outbox: list[queue.SimpleQueue[list[Result]]] = [
            queue.SimpleQueue() for _ in range(config.scheduler_writer_parallel)]
        self._inbox: dict[str, list[Result]] = defaultdict(list)
        self._inbox_lock = threading.Lock()
        self._workers = [threading.Thread(target=self._write, args=(box,), daemon=True, name=f"fd-writer-{i}")
                         for i, box in enumerate(self._outbox)]
        self._workers += [threading.Thread(target=self._read, args=(shard,), daemon=True,
                                           name=f"fd-reader-{shard}") for shard in range(self.result_shards)]
        for worker in self._workers:
            worker.start()

    def put_results(self, results: list[Result]) -> None:
        """Queue results for the writers; a request's results always go through the same one."""
        shares: dict[int, list[Result]] = defaultdict(list)
        for result in results:
            shares[result_shard(result.request_id, len(self._outbox))].append(result)
        for writer, share in shares.items():
            self._outbox[writer].put(share)

    def get_results(self) -> dict[str, list[Result]]:
        with self._inbox_lock:
            taken, self._inbox = self._inbox, defaultdict(list)
        with self._lock:
            for request_id, results in taken.items():
                if results[-1].finished:
                    self.uids.pop(request_id, None)
        return dict(taken)

    def close(self) -> None:
        super().close()
        for worker in self._workers:
            worker.join(timeout=2)

    def _write(self, box: queue.SimpleQueue[list[Result]]) -> None:
        limit = self.config.scheduler_writer_batch_size
        while not self._stopped.is_set():
            try:
                pending = box.get(timeout=0.1)
            except queue.Empty:
                continue
            if len(pending) < limit:
                time.sleep(GATHER_S)
            while len(pending) < limit:
                try:
                    pending.extend(box.get_nowait())
                except queue.Empty:
                    break
            for start in range(0, len(pending), limit):
                batch = pending[start:start + limit]
                try:
                    GlobalScheduler.put_results(self, batch)
                except Exception:  # top-level loop: log, keep writing the next batches
                    log.exception("writing %d result(s) failed", len(batch))

    def _read(self, shard: int) -> None:
        limit = self.config.scheduler_reader_batch_size
        while not self._stopped.is_set():
            try:
                raw = self.store.wait_for_results(self.topic, f"{self.origin}:{shard}", limit, IDLE_S)
            except Exception:  # top-level loop: Redis may come back
                log.exception("reading results failed")
                time.sleep(IDLE_S)
                continue
            if not raw:
                continue
            with self._inbox_lock:
                for item in raw:
                    result = Result.from_dict(item)
                    self._inbox[result.request_id].append(result)
