"""The rq job a node runs for one request: claim it, generate, stream each token, record the end.

Job arguments are plain values (topic, uid); the node's resident engine and store come from the
runtime the worker installed when it started, so no job ever loads the model.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from gpu_worker.node import current_runtime

log = logging.getLogger(__name__)


def run_request(topic: str, uid: str) -> dict[str, Any]:
    """Run request ``uid`` of ``topic`` on this node; returns a small JSON summary for rq."""
    runtime = current_runtime()
    store, node = runtime.store, runtime.name
    status, request = store.start(topic, uid, node)
    runtime.hooks.on_change(topic, uid)
    if request is None:
        log.info("request %s not run: it is %s", uid, status)
        return {"status": status}
    runtime.running = uid
    try:
        summary = _generate(runtime, topic, uid, request)
    except Exception as exc:
        log.exception("request %s failed", uid)
        store.finish(topic, uid, node, status="failed", finish_reason=None,
                     error=("engine_error", f"{type(exc).__name__}: {exc}"))
        raise  # rq records the failed job, visible at /rq/
    finally:
        runtime.running = ""
        runtime.hooks.on_change(topic, uid)
        runtime.hooks.on_finished(node)
    return summary


def _generate(runtime, topic: str, uid: str, request) -> dict[str, Any]:
    store, node = runtime.store, runtime.name
    output_ids: list[int] = []
    cancel = threading.Event()  # set when Redis says the client cancelled; checked before each token
    finish_reason = None
    for step in runtime.engine.generate(request.prompt_token_ids, request.sampling, cancel.is_set):
        finish_reason = step.finish_reason or finish_reason
        if step.token_id < 0:
            continue  # the end marker of a stop or cancel: nothing to stream
        output_ids.append(step.token_id)
        reply = store.emit(topic, uid, node, step.index, step.token_id, step.text)
        if step.index == 0:
            runtime.hooks.on_change(topic, uid)  # first_token_at reaches the database early
        if reply == -1:
            log.warning("request %s is no longer this node's; stopping", uid)
            return {"status": "abandoned", "tokens": len(output_ids)}
        if reply == 1:
            cancel.set()
    status = "cancelled" if finish_reason == "cancelled" else "finished"
    final = store.finish(topic, uid, node, status=status, finish_reason=finish_reason,
                         output_token_ids=output_ids)
    return {"status": final, "tokens": len(output_ids), "finish_reason": finish_reason}
