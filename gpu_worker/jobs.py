"""The rq job a node runs for one request: generate, stream each token, record the end.

The node claimed the request (and its lease) when it dequeued the job; the job's arguments are plain
values (topic, uid) and the claim, the resident engine and the store come from the node's runtime, so
no job ever loads the model. A request that comes back after its node died resumes after the tokens
already streamed: prompt and those tokens are prefilled again and generation continues at the next
index, so a greedy request ends exactly as an uninterrupted run would.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from gpu_worker.runtime import NodeRuntime, current_runtime
from scheduler import splitwise
from scheduler.status import EmitReply, RequestStatus
from scheduler.store import Claim

log = logging.getLogger(__name__)


def run_request(topic: str, uid: str) -> dict[str, Any]:
    """Run request ``uid`` of ``topic`` on this node; returns a small JSON summary for rq."""
    runtime = current_runtime()
    claim = runtime.held.get(uid)
    if claim is None:
        log.warning("request %s was not claimed by node %s; not running it", uid, runtime.name)
        return {"status": "not_claimed"}
    output_ids: list[int] = []  # filled as tokens stream, so that a failure keeps what was sent
    summary: dict[str, Any] = {"status": "failed"}
    try:
        summary = _generate(runtime, topic, claim, output_ids)
        return summary
    except Exception as exc:
        log.exception("request %s failed", uid)
        runtime.store.finish(topic, uid, claim.lease, status=RequestStatus.FAILED, finish_reason=None,
                             output_token_ids=output_ids,
                             error=("engine_error", f"{type(exc).__name__}: {exc}"))
        raise  # rq records the failed job, visible at /rq/
    finally:
        runtime.held.pop(uid, None)
        runtime.hooks.on_change(topic, uid)
        if summary["status"] != "lease_lost":  # another node carries it on, and counts it
            # Stolen: run by a node other than the one it was placed on (a splitwise decode node runs
            # what its prefill node handed it: that is no steal).
            runtime.hooks.on_finished(runtime.name, not claim.phase and claim.home != runtime.name)


def _generate(runtime: NodeRuntime, topic: str, claim: Claim, output_ids: list[int]) -> dict[str, Any]:
    if claim.streamed:
        output_ids.extend(runtime.store.streamed_tokens(topic, claim.uid))
    cancel = threading.Event()  # set when Redis says the client cancelled; checked before each token
    if claim.phase == "prefill":
        steps = _prefill_and_hand_off(runtime, topic, claim)
    elif claim.phase == "decode":
        steps = _decode_after_handoff(runtime, topic, claim, list(output_ids), cancel)
    else:
        steps = runtime.engine.generate(claim.request.prompt_token_ids, claim.request.sampling, cancel.is_set,
                                        resume_token_ids=list(output_ids))
    return _stream(runtime, topic, claim, steps, output_ids, cancel)


def _stream(runtime: NodeRuntime, topic: str, claim: Claim, steps, output_ids: list[int],
            cancel: threading.Event) -> dict[str, Any]:
    """Stream ``steps`` under the claim's lease, then record the end (unless handed off)."""
    store, uid, lease = runtime.store, claim.uid, claim.lease
    finish_reason = None
    for step in steps:
        if step is HANDED_OFF:
            return {"status": "handed_off", "tokens": len(output_ids)}
        if step is LEASE_LOST:
            return {"status": "lease_lost", "tokens": len(output_ids)}
        finish_reason = step.finish_reason or finish_reason
        if step.token_id < 0:
            continue  # the end marker of a stop or cancel: nothing to stream
        output_ids.append(step.token_id)
        reply = store.emit(topic, uid, lease, step.index, step.token_id, step.text)
        if reply in (EmitReply.LEASE_LOST, EmitReply.OUT_OF_ORDER):
            log.warning("request %s: lease %s lost (%s); another node carries on", uid, lease, reply.name)
            return {"status": "lease_lost", "tokens": len(output_ids)}
        if reply == EmitReply.CANCEL_ASKED:
            cancel.set()
        if runtime.token_delay_s:
            time.sleep(runtime.token_delay_s)
    status = RequestStatus.CANCELLED if finish_reason == "cancelled" else RequestStatus.FINISHED
    final = store.finish(topic, uid, lease, status=status, finish_reason=finish_reason,
                         output_token_ids=output_ids)
    return {"status": final, "tokens": len(output_ids), "finish_reason": finish_reason}


HANDED_OFF = object()  # what a prefill run yields last when a decode node carries the request on
LEASE_LOST = object()  # ... or when it lost the request before it could hand it off
KV_TTL_S = 600  # an abandoned handoff (its decode node never came) is gone after this


def _prefill_and_hand_off(runtime: NodeRuntime, topic: str, claim: Claim):
    """Splitwise prefill node: the KV cache and the first token; then the KV cache goes to Redis and
    the request to its decode node's queue. Yields the first step (and HANDED_OFF after it)."""
    from gpu_worker.kv_transfer import RedisKVStore, first_step, prefill_for_handoff

    request = claim.request
    if claim.streamed:  # a resumed prefill whose first token is out: the decode side resumes
        yield HANDED_OFF if _hand_off(runtime, topic, claim, 0, 0.0) else LEASE_LOST
        return
    handoff = prefill_for_handoff(runtime.engine, request.prompt_token_ids, request.sampling)
    step = first_step(runtime.engine, handoff, request.sampling)
    yield step
    if step.finish_reason is not None:
        return  # the first token ended it: no decode node needed
    started = time.perf_counter()
    num_bytes = RedisKVStore(runtime.store.redis).put(topic, claim.uid, handoff, ttl_s=KV_TTL_S)
    moved = _hand_off(runtime, topic, claim, num_bytes, (time.perf_counter() - started) * 1000)
    yield HANDED_OFF if moved else LEASE_LOST


def _hand_off(runtime: NodeRuntime, topic: str, claim: Claim, num_bytes: int, ms: float) -> bool:
    moved = splitwise.hand_off(runtime.store, topic, claim.uid, claim.lease, num_bytes, ms)
    if not moved:
        log.warning("request %s: lease %s lost before the handoff", claim.uid, claim.lease)
    return moved


def _decode_after_handoff(runtime: NodeRuntime, topic: str, claim: Claim, streamed: list[int],
                          cancel: threading.Event):
    """Splitwise decode node: continue from the prefill node's KV cache when only the first token is
    out; after a failover (more tokens out, or the KV cache gone) re-prefill and resume instead."""
    from gpu_worker.kv_transfer import RedisKVStore, continue_from_handoff

    request, kv_store = claim.request, RedisKVStore(runtime.store.redis)
    handoff = kv_store.get(topic, claim.uid, runtime.engine.device) if len(streamed) == 1 else None
    if handoff is not None:
        yield from continue_from_handoff(runtime.engine, handoff, request.prompt_token_ids, request.sampling,
                                         cancel.is_set)
    else:
        yield from runtime.engine.generate(request.prompt_token_ids, request.sampling, cancel.is_set,
                                           resume_token_ids=streamed)
    kv_store.delete(topic, claim.uid)
