"""A node's step loop: claim what the engine can admit, step it, and stream the step in one round trip.

Design note. The node's rq worker (``gpu_worker.node``) drives this loop. Each iteration:

1. ``claim_call``: the engine's free sequence slots, free KV blocks and the step's spare tokens are
   the claim's budget (FastDeploy's ``get_requests`` rules, run by the claim script), so a node takes
   from Redis only what it can start at its next step; the rest stays in its queue, stealable and
   counted in its load score.
2. ``step``: one engine step; then every token it produced, every end, every handoff and the
   claim for the next step go to Redis in one round trip (the lease and next-index checks stay per
   request, in the scripts). A reply that says the lease is gone drops the request (another node
   carries it on); one that says the client cancelled ends it at the next step.

Each request is an rq job of the node's queue: started when admitted, finished (or failed) when it
ends, so django-rq shows the node's running batch. The jobs are built by the node from its claims and
only their bookkeeping is written (nothing is performed from a job hash). Database updates go through
a background thread, so a slow database never stalls a step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.results import Result
from rq.utils import now as rq_now
from rq.utils import utcformat

from gpu_worker.runtime import NodeRuntime
from gpu_worker.steps import GenerationStep
from scheduler import keys, splitwise
from scheduler.scripts import ScriptCall
from scheduler.status import EmitReply, RequestStatus, status_or_reply
from scheduler.store import JOB_FAILURE_TTL_S, NO_BUDGET, Budget, Claim, emit_call, finish_call

log = logging.getLogger(__name__)
EXECUTION_TTL_S = 120  # a started rq job's registry entry, renewed while it runs (gone soon after a crash)
EXECUTION_RENEW_S = 30
KV_TTL_S = 600  # an abandoned handoff (its decode node never came) is gone after this
RATE_WINDOW_S = 5.0  # tokens/s in the heartbeat is measured over this window


@dataclass(eq=False)
class Running:
    """A request the node holds: its claim, its rq job and what it has streamed so far."""

    claim: Claim
    job: Job
    execution: Execution | None = None  # rq's record of this run (the started registry's entry)
    output_ids: list[int] = field(default_factory=list)
    last_token_at: float | None = None  # perf_counter() of its previous token here (inter-token latency)


@dataclass(frozen=True)
class Left:
    """A request that left the node: the database should read it again (and count it, if it ran)."""

    uid: str
    ran: bool  # it ended here (not dropped for another node to carry on)
    stolen: bool


class Background(threading.Thread):
    """Tells the database what left the node, off the step loop: whatever piled up meanwhile in one
    go (one transaction for many requests rather than one each)."""

    def __init__(self, runtime: NodeRuntime) -> None:
        super().__init__(name="fd-hooks", daemon=True)
        self.rt = runtime
        self.tasks: queue.SimpleQueue[Left | None] = queue.SimpleQueue()

    def run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self.tasks.get()]
            while not self.tasks.empty():
                batch.append(self.tasks.get_nowait())
            stopping = None in batch
            left = [item for item in batch if item is not None]
            if left:
                self._tell(left)

    def _tell(self, left: list[Left]) -> None:
        try:  # top-level loop: the hooks log their own failures; keep going
            self.rt.hooks.on_changed(self.rt.topic, [item.uid for item in left])
            ran = [item for item in left if item.ran]
            if ran:
                self.rt.hooks.on_ran(self.rt.name, len(ran), sum(item.stolen for item in ran))
        except Exception:
            log.exception("a database hook failed")

    def submit(self, item: Left) -> None:
        self.tasks.put(item)

    def stop(self, timeout_s: float = 10.0) -> None:
        self.tasks.put(None)
        self.join(timeout=timeout_s)


class StepLoop:
    """The node's engine loop (see the module note). One thread drives it."""

    def __init__(self, runtime: NodeRuntime, worker_name: str, redis: Redis) -> None:
        self.rt = runtime
        self.engine = runtime.engine
        self.worker_name = worker_name
        self.redis = redis  # bytes replies: rq's connection
        self.running: dict[str, Running] = {}
        self.commands: list[tuple[Any, ...]] = []  # rq bookkeeping, sent with the next round trip
        self.hooks = Background(runtime)
        self.generated = 0  # tokens streamed since the node started
        self.samples: deque[tuple[float, int]] = deque()  # (time, generated): the heartbeat's alone
        self.executions_renewed = time.monotonic()
        self.preemptions = self._engine_preemptions()  # counted by the engine; reported as they grow

    # -- claiming ------------------------------------------------------------------------------------
    def claim_call(self) -> ScriptCall | None:
        """The claim of what the engine can admit at its next step, or None when it can take nothing."""
        if not self.rt.may_claim:
            return None
        blocks, tokens, slots = self.engine.admission_budget()
        if slots < 1:
            return None
        cap = self.engine.capacity
        if blocks < 0:  # an engine without a block budget
            budget = NO_BUDGET
        elif not self.running:
            # An empty engine takes the head of its queue whatever its size: one that fits runs, one
            # that could never fit this node's cache fails at once, naming why, instead of blocking
            # the queue behind it forever.
            budget, slots = NO_BUDGET, 1
        elif blocks <= cap.reserved_output_blocks or tokens < 1:
            return None
        else:
            budget = Budget(blocks, cap.block_size, cap.reserved_output_blocks, tokens)
        return self.rt.store.claim_call(self.rt.topic, self.rt.name, slots, may_steal=self.rt.may_steal,
                                        budget=budget)

    # -- admitting -----------------------------------------------------------------------------------
    def start(self, claim: Claim, job: Job) -> None:
        """The claimed request becomes a started rq job of this node and joins the engine's batch."""
        stale = self.running.get(claim.uid)
        if stale is not None:  # its lease lapsed while it waited here and it came back: the new claim wins
            log.warning("request %s came back to this node under lease %s; its old run (%s) is let go",
                        claim.uid, claim.lease, stale.claim.lease)
            self.engine.abort(claim.uid)
            self._forget(stale)
            self.commands.extend(self._capture(lambda pipe: stale.execution.delete(stale.job, pipe)))
        running = Running(claim, job)
        self.running[claim.uid] = running
        self.commands.extend(self._capture(lambda pipe: self._started(running, pipe)))
        try:
            self._admit(running)
        except Exception as exc:  # a request the engine refuses (too long, a bad handoff): it fails alone
            log.warning("request %s cannot run here: %s", claim.uid, exc)
            self._fail(running, "engine_error", f"{type(exc).__name__}: {exc}")

    def _admit(self, running: Running) -> None:
        claim, store, topic = running.claim, self.rt.store, self.rt.topic
        request = claim.request
        if claim.streamed:
            running.output_ids.extend(store.streamed_tokens(topic, claim.uid))
        if claim.phase == "prefill" and running.output_ids:
            self._hand_off(running, None)  # its first token is out: the decode node resumes after it
            return
        kv = None
        if claim.phase == "decode" and len(running.output_ids) == 1:
            kv = self._handed_over(running)
        self.engine.add_request(claim.uid, request.prompt_token_ids, request.sampling,
                                resume_token_ids=running.output_ids, prefill_only=claim.phase == "prefill",
                                kv=kv)

    def _handed_over(self, running: Running):
        """The prompt's KV cache the prefill node left in Redis (None when gone: then it re-prefills)."""
        from gpu_worker.kv_transfer import HandoffError, RedisKVStore, prompt_digest

        claim = running.claim
        try:
            handoff = RedisKVStore(self.redis).get(self.rt.topic, claim.uid, self.engine.engine.device,
                                                   self.engine.engine.config)
        except HandoffError as exc:
            log.warning("request %s: the KV handoff cannot be used (%s); prefilling again", claim.uid, exc)
            return None
        prompt = claim.request.prompt_token_ids
        if handoff is None or handoff.prompt_digest != prompt_digest(prompt):
            return None  # gone (it expired), or for another prompt: prefill again
        return dict(handoff.kv)

    # -- stepping ------------------------------------------------------------------------------------
    def step(self, claim: bool = True) -> list[Claim]:
        """One engine step and its one round trip; returns what was claimed for the next step."""
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a failing forward pass: fail what it ran, keep the node serving
            log.exception("engine step failed")
            outputs = []
            in_pass = getattr(self.engine, "running", None)  # a stand-in engine has no batch to tell
            for uid in [s.request_id for s in in_pass] if in_pass is not None else list(self.running):
                self.engine.abort(uid)
                if uid in self.running:
                    self._fail(self.running[uid], "engine_error", f"{type(exc).__name__}: {exc}")
        calls, handlers = [], []
        for uid, out in outputs:
            running = self.running.get(uid)
            if running is not None:
                self._stream(running, out, calls, handlers)
            else:  # let go meanwhile: nothing of it is wanted any more
                self.engine.exported.pop(uid, None)
        claim_call = self.claim_call() if claim else None
        if claim_call is not None:
            calls.append(claim_call)
        self.commands.extend(self._metrics_commands(outputs))
        self._renew_executions()
        replies = self._round_trip(calls)
        for handler, reply in zip(handlers, replies, strict=False):
            handler(reply)
        self.generated += sum(1 for _, out in outputs if out.token_id >= 0)
        if self.rt.token_delay_s and outputs:
            time.sleep(self.rt.token_delay_s)
        return self.rt.store.parse_claims(replies[-1]) if claim_call is not None else []

    def _stream(self, running: Running, out: GenerationStep, calls: list, handlers: list) -> None:
        """The calls for one output of a step, and what to do with their replies."""
        claim, topic = running.claim, self.rt.topic
        uid, lease = claim.uid, claim.lease
        if out.token_id >= 0:
            running.output_ids.append(out.token_id)
        if out.finish_reason is None:
            calls.append(emit_call(topic, uid, lease, out.index, out.token_id, out.text))
            handlers.append(lambda reply: self._emitted(running, EmitReply(reply)))
            return
        status = RequestStatus.CANCELLED if out.finish_reason == "cancelled" else RequestStatus.FINISHED
        last = (out.index, out.token_id, out.text) if out.token_id >= 0 else None
        calls.append(finish_call(topic, uid, lease, status, out.finish_reason, running.output_ids,
                                 last_token=last))
        handlers.append(lambda reply: self._finished(running, reply, last is not None))

    def _emitted(self, running: Running, reply: EmitReply) -> None:
        uid = running.claim.uid
        exported = self.engine.exported.pop(uid, None)  # a prefill node's first token is out
        if reply in (EmitReply.LEASE_LOST, EmitReply.OUT_OF_ORDER):
            log.warning("request %s: lease %s lost (%s); another node carries on", uid, running.claim.lease,
                        reply.name)
            self.engine.abort(uid)
            self._drop(running)
        elif exported is not None and reply == EmitReply.CANCEL_ASKED:
            self._finish_now(running, RequestStatus.CANCELLED, "cancelled")
        elif exported is not None:
            self._hand_off(running, exported)
        elif reply == EmitReply.CANCEL_ASKED:
            self.engine.cancel(uid)

    def _finished(self, running: Running, reply: Any, with_token: bool) -> None:
        final = status_or_reply((reply[1] if with_token else reply).decode())
        lost = EmitReply(reply[0]) == EmitReply.LEASE_LOST if with_token else not isinstance(
            final, RequestStatus) or not final.is_final
        if lost:  # the lease had gone: the request is another node's now (or gone), not ended here
            log.warning("request %s: lease %s lost at its end; another node carries on", running.claim.uid,
                        running.claim.lease)
            self._drop(running)
            return
        self._end(running, {"status": str(final), "tokens": len(running.output_ids)}, failed=False)

    def _hand_off(self, running: Running, kv) -> None:
        """Splitwise prefill: the KV cache to Redis, the request to its decode node's queue."""
        from gpu_worker.kv_transfer import KVHandoff, RedisKVStore, prompt_digest

        claim, started = running.claim, time.perf_counter()
        num_bytes = 0
        if kv is not None:
            prompt = claim.request.prompt_token_ids
            handoff = KVHandoff(kv=kv, first_token=running.output_ids[0], prompt_len=len(prompt),
                                prompt_digest=prompt_digest(prompt), config=self.engine.engine.config,
                                dtype=str(kv["k.0"].dtype).removeprefix("torch."))
            num_bytes = RedisKVStore(self.redis).put(self.rt.topic, claim.uid, handoff, ttl_s=KV_TTL_S)
        ms = (time.perf_counter() - started) * 1000
        if splitwise.hand_off(self.rt.store, self.rt.topic, claim.uid, claim.lease, num_bytes, ms):
            self._end(running, {"status": "handed_off", "tokens": len(running.output_ids)}, failed=False)
        else:
            log.warning("request %s: lease %s lost before the handoff", claim.uid, claim.lease)
            self._drop(running)

    def _fail(self, running: Running, code: str, message: str) -> None:
        self._finish_now(running, RequestStatus.FAILED, None, (code, message))

    def _finish_now(self, running: Running, status: RequestStatus, finish_reason: str | None,
                    error: tuple[str, str] | None = None) -> None:
        """Ends a request in its own round trip (the rare ends that no engine step carries)."""
        claim = running.claim
        final = self.rt.store.finish(self.rt.topic, claim.uid, claim.lease, status=status,
                                     finish_reason=finish_reason, output_token_ids=running.output_ids,
                                     error=error)
        summary = {"status": str(final), "tokens": len(running.output_ids)}
        self._end(running, {**summary, "error": error[1]} if error else summary, failed=error is not None)

    # -- ending --------------------------------------------------------------------------------------
    def _forget(self, running: Running) -> None:
        """No longer held (only this run: a newer claim of the same request stays)."""
        uid = running.claim.uid
        if self.running.get(uid) is running:
            del self.running[uid]
        if self.rt.held.get(uid) is running.claim:
            del self.rt.held[uid]

    def _end(self, running: Running, summary: dict[str, Any], failed: bool) -> None:
        """The request left this node: its rq job ends, the database hears of it."""
        claim = running.claim
        self._forget(running)
        if claim.phase == "decode":
            self.commands.append(("DEL", keys.kv_handoff(self.rt.topic, claim.uid)))
        self.commands.extend(self._capture(lambda pipe: self._ended(running, summary, failed, pipe)))
        stolen = not claim.phase and claim.home != self.rt.name  # a decode node runs what it was handed
        self.hooks.submit(Left(claim.uid, ran=True, stolen=stolen))

    def _drop(self, running: Running) -> None:
        """The lease is gone: another node carries the request on, and counts it."""
        self._forget(running)
        self.commands.extend(self._capture(lambda pipe: running.execution.delete(running.job, pipe)))
        self.hooks.submit(Left(running.claim.uid, ran=False, stolen=False))

    def drop_all(self) -> None:
        """Redis is unreachable: every held request is let go without a word to it (their leases
        lapse and failover carries them on), and the bookkeeping not yet sent is dropped (rq's
        registry entries expire by themselves)."""
        for running in list(self.running.values()):
            self.engine.abort(running.claim.uid)
            self._forget(running)
            self.hooks.submit(Left(running.claim.uid, ran=False, stolen=False))
        self.rt.held.clear()
        self.commands.clear()

    # -- rq bookkeeping ------------------------------------------------------------------------------
    def _started(self, running: Running, pipe) -> None:
        running.execution = Execution.create(running.job, EXECUTION_TTL_S, pipeline=pipe,
                                             worker_name=self.worker_name)
        running.job.prepare_for_execution(self.worker_name, pipe)

    def _ended(self, running: Running, summary: dict[str, Any], failed: bool, pipe) -> None:
        job, execution = running.job, running.execution
        job.ended_at = rq_now()
        execution.delete(job, pipe)
        if failed:
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            job.failed_job_registry.add(job, ttl=JOB_FAILURE_TTL_S, exc_string=summary.get("error", ""),
                                        pipeline=pipe)
            Result.create_failure(job, JOB_FAILURE_TTL_S, summary.get("error", ""), self.worker_name, pipe,
                                  execution_id=execution.id, execution_ended_at=job.ended_at)
        else:
            job.set_status(JobStatus.FINISHED, pipeline=pipe)
            job.finished_job_registry.add(job, ttl=keys.RETENTION_S, pipeline=pipe)
            Result.create(job, Result.Type.SUCCESSFUL, keys.RETENTION_S, return_value=summary,
                          worker_name=self.worker_name, pipeline=pipe, execution_id=execution.id,
                          execution_ended_at=job.ended_at)
        pipe.hset(job.key, "ended_at", utcformat(job.ended_at))

    def _renew_executions(self) -> None:
        if time.monotonic() - self.executions_renewed < EXECUTION_RENEW_S:
            return
        self.executions_renewed = time.monotonic()
        for running in self.running.values():
            self.commands.extend(self._capture(lambda pipe, r=running: r.execution.heartbeat(
                r.job.started_job_registry, EXECUTION_TTL_S, pipe)))

    def _capture(self, write: Callable[[Any], None]) -> list[tuple[Any, ...]]:
        """The commands rq's bookkeeping ``write`` issues on a pipeline, to send with a step."""
        pipe = self.redis.pipeline(transaction=False)
        try:
            write(pipe)
            return [args for args, _options in pipe.command_stack]
        finally:
            pipe.reset()

    def _round_trip(self, calls: list[ScriptCall]) -> list[Any]:
        commands, self.commands = self.commands, []
        if not calls and not commands:
            return []
        return self.rt.store.runner.run_scripts(calls, commands)

    def flush(self) -> None:
        """Sends the bookkeeping still waiting for a step."""
        self._round_trip([])

    # -- metrics -------------------------------------------------------------------------------------
    def _metrics_commands(self, outputs: list[tuple[str, GenerationStep]]) -> list[tuple[Any, ...]]:
        """What /metrics learns only here, as increments of the topic's metrics hash that go with the
        step's one round trip: each token's gap since the same request's previous token on this node
        (inter-token latency; a request's first token here has none), summed per bucket over the
        step, and the preemptions the engine counted since the last step."""
        t, key = time.perf_counter(), keys.metrics(self.rt.topic)
        buckets: Counter[str] = Counter()
        total = 0.0
        for uid, out in outputs:
            running = self.running.get(uid)
            if running is None or out.token_id < 0:
                continue
            if running.last_token_at is not None:
                gap = t - running.last_token_at
                buckets[keys.bucket_field("itl", gap)] += 1
                total += gap
            running.last_token_at = t
        commands: list[tuple[Any, ...]] = [("HINCRBY", key, field, n) for field, n in buckets.items()]
        if buckets:
            commands.append(("HINCRBYFLOAT", key, keys.histogram_field("itl", keys.SUM), f"{total:.9f}"))
        preemptions = self._engine_preemptions()
        if preemptions > self.preemptions:
            commands.append(("HINCRBY", key, "preemptions", preemptions - self.preemptions))
        self.preemptions = preemptions
        return commands

    def _engine_preemptions(self) -> int:
        stats = getattr(self.engine, "stats", None)  # a stand-in engine counts none
        return stats.preemptions if stats is not None else 0

    # -- figures -------------------------------------------------------------------------------------
    def figures(self) -> dict[str, Any]:
        """The engine's figures for the heartbeat (one thread calls it), with tokens/s over the last
        few seconds."""
        t, generated = time.monotonic(), self.generated
        self.samples.append((t, generated))
        while len(self.samples) > 1 and self.samples[0][0] < t - RATE_WINDOW_S:
            self.samples.popleft()
        first_t, first_generated = self.samples[0]
        rate = (generated - first_generated) / (t - first_t) if t > first_t else 0.0
        return {**self.engine.figures(), "tokens_per_s": round(rate, 1)}
