"""A node's step loop when things go wrong: a request that comes back to the node that still holds
it (its lease lapsed while it waited) runs once, under its new claim; a Redis outage mid-step lets go
of every held request without killing the worker; what a dropped prefill exported is freed."""

import pytest

from scheduler import failover, keys
from tests.test_it_serves_a_batch_on_each_node import claim_and_start, submit, worker_with

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_request_reclaimed_by_the_node_that_holds_it_runs_once_to_the_end(api, node, store, engine,
                                                                           redis_conn):
    from fdconsole.inference.models import Request
    from gpu_worker.capacity import EngineCapacity

    ids = submit(api, 2, max_tokens=4)
    worker = worker_with(store, engine, EngineCapacity(max_num_seqs=4, num_kv_blocks=64))
    assert claim_and_start(store, worker) + claim_and_start(store, worker) == 2
    victim = Request.objects.get(request_id=ids[1]).uid
    redis_conn.zadd(keys.inflight("default"), {victim: 0})  # its lease lapsed (a late heartbeat, say)
    assert (victim, "node-a") in failover.recover(store, "default")  # back in its home queue, here
    assert claim_and_start(store, worker) == 1
    assert worker.loop.running[victim].claim.lease == "node-a#2"
    assert list(worker.runtime.engine.sequences).count(victim) == 1
    while worker.runtime.engine.has_work:
        worker.loop.step(claim=False)
    worker.loop.flush()
    state = store.state("default", victim)
    assert state.status == "finished" and len(state.output_token_ids) == 4
    assert worker.runtime.engine.blocks.num_free_blocks == 64


def test_a_redis_outage_mid_step_lets_go_of_every_request_and_the_worker_lives(api, node, store, engine,
                                                                              monkeypatch):
    import redis

    from gpu_worker.capacity import EngineCapacity

    submit(api, 2, max_tokens=50)
    worker = worker_with(store, engine, EngineCapacity(max_num_seqs=4, num_kv_blocks=64))
    assert claim_and_start(store, worker) + claim_and_start(store, worker) == 2
    worker.loop.step()

    def down(*args, **kwargs):
        raise redis.exceptions.ConnectionError("Redis went away")

    monkeypatch.setattr(store.runner, "run_scripts", down)
    monkeypatch.setattr("gpu_worker.node.time.sleep", lambda s: setattr(worker, "_stop_requested", True))
    assert worker.dequeue_job_and_maintain_ttl(timeout=1) is None  # backed off, then asked to stop
    assert worker.runtime.held == {} and worker.loop.running == {} and not worker.runtime.engine.has_work
    assert worker.runtime.engine.blocks.num_free_blocks == 64


def test_what_a_dropped_prefill_exported_is_freed(engine):
    from gpu_worker.batch_engine import BatchEngine
    from scheduler.messages import SamplingParams

    batch = BatchEngine(engine)
    batch.add_request("p", engine.tokenizer.encode("hello there"), SamplingParams(max_tokens=5),
                      prefill_only=True)
    batch.step()
    assert "p" in batch.exported
    batch.abort("p")
    assert batch.exported == {}
