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

from gpu_worker.node import current_runtime
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
        runtime.store.finish(topic, uid, claim.lease, status="failed", finish_reason=None,
                             output_token_ids=output_ids,
                             error=("engine_error", f"{type(exc).__name__}: {exc}"))
        raise  # rq records the failed job, visible at /rq/
    finally:
        runtime.held.pop(uid, None)
        runtime.hooks.on_change(topic, uid)
        if summary["status"] != "lease_lost":  # another node carries it on, and counts it
            runtime.hooks.on_finished(runtime.name, claim.home != runtime.name)


def _generate(runtime, topic: str, claim: Claim, output_ids: list[int]) -> dict[str, Any]:
    store, uid, lease = runtime.store, claim.uid, claim.lease
    if claim.streamed:
        output_ids.extend(store.streamed_tokens(topic, uid))
    cancel = threading.Event()  # set when Redis says the client cancelled; checked before each token
    finish_reason = None
    steps = runtime.engine.generate(claim.request.prompt_token_ids, claim.request.sampling, cancel.is_set,
                                    resume_token_ids=list(output_ids))
    for step in steps:
        finish_reason = step.finish_reason or finish_reason
        if step.token_id < 0:
            continue  # the end marker of a stop or cancel: nothing to stream
        output_ids.append(step.token_id)
        reply = store.emit(topic, uid, lease, step.index, step.token_id, step.text)
        if reply < 0:
            log.warning("request %s: lease %s lost (%d); another node carries on", uid, lease, reply)
            return {"status": "lease_lost", "tokens": len(output_ids)}
        if reply == 1:
            cancel.set()
        if runtime.token_delay_s:
            time.sleep(runtime.token_delay_s)
    status = "cancelled" if finish_reason == "cancelled" else "finished"
    final = store.finish(topic, uid, lease, status=status, finish_reason=finish_reason,
                         output_token_ids=output_ids)
    return {"status": final, "tokens": len(output_ids), "finish_reason": finish_reason}
