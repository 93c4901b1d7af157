"""The rq job of one request: what its job hash names, and what the node's worker calls for it.

A request's job is built by its node from the claim (``gpu_worker.node``); the node never performs
what a job hash in Redis names. Running a job admits the claimed request into the node's batch
(``gpu_worker.serving.StepLoop.start``); the job stays started while the request generates with the
others, and ends as finished or failed with it. A request that comes back after its node died resumes
after the tokens already streamed, so a greedy request ends exactly as an uninterrupted run would.
"""

from __future__ import annotations

import logging

from rq.job import Job

from gpu_worker.runtime import current_runtime

log = logging.getLogger(__name__)


def run_request(topic: str, uid: str, job: Job | None = None) -> None:
    """Admit request ``uid`` of ``topic``, claimed by this node, into its running batch."""
    runtime = current_runtime()
    claim = runtime.held.get(uid)
    if claim is None or job is None or runtime.loop is None:
        log.warning("request %s was not claimed by node %s; not running it", uid, runtime.name)
        return
    runtime.loop.start(claim, job)
