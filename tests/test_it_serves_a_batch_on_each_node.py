"""A node runs its requests together: it claims only what its engine can admit at the next step (the
rest stays queued, stealable, in its load score), streams each step in one Redis round trip, and
every request is an rq job of the node, started while it runs and finished or failed after."""

import pytest

from scheduler import keys

pytestmark = pytest.mark.django_db(transaction=True)


def submit(api, count: int, prompt: str = "Batch me, please.", max_tokens: int = 8) -> list[str]:
    ids = []
    for i in range(count):
        answer = api.post("/api/v1/topics/default/requests",
                          {"prompt": f"{prompt} #{i}", "max_tokens": max_tokens, "node": "node-a"})
        assert answer.status_code == 202, answer.content
        ids.append(answer.json()["request_id"])
    return ids


def worker_with(store, engine, capacity):
    from gpu_worker.batch_engine import BatchEngine
    from gpu_worker.node import NodeWorker
    from gpu_worker.runtime import NodeRuntime, install_runtime

    runtime = NodeRuntime(topic="default", name="node-a", role="mixed", store=store,
                          engine=BatchEngine(engine, capacity))
    install_runtime(runtime)
    return NodeWorker(runtime)


def claim_and_start(store, worker) -> int:
    """One claim as the node's loop makes it; what it claimed joins the engine. How many it claimed."""
    call = worker.loop.claim_call()
    claims = store.parse_claims(store.run(call)) if call is not None else []
    worker._hold(claims)
    while worker.claimed:
        worker.execute_job(worker._job_for(worker.claimed.popleft()), worker.node_queue)
    return len(claims)


def test_a_node_claims_only_the_sequences_its_engine_has_room_for(api, node, store, engine):
    from gpu_worker.capacity import EngineCapacity

    submit(api, 5)
    worker = worker_with(store, engine, EngineCapacity(max_num_seqs=2, num_kv_blocks=64))
    assert claim_and_start(store, worker) == 1  # an idle node takes its queue's head first, whatever its size
    assert claim_and_start(store, worker) == 1  # then what its free slots hold
    assert claim_and_start(store, worker) == 0
    assert store.queue_length("default", "node-a") == 3
    assert store.load_scores("default", ["node-a"]) == {"node-a": 3.0}  # still counted, still stealable


def test_a_node_claims_only_what_fits_its_free_kv_blocks(api, node, store, engine):
    from gpu_worker.capacity import EngineCapacity

    submit(api, 3, prompt="x" * 40)  # 44 tokens: 3 blocks of 16, plus 1 reserved for the output
    worker = worker_with(store, engine, EngineCapacity(num_kv_blocks=9, reserved_output_blocks=1))
    assert claim_and_start(store, worker) + claim_and_start(store, worker) == 2
    assert claim_and_start(store, worker) == 0  # 4 + 4 of 9 blocks; a third needs 4 more
    assert store.queue_length("default", "node-a") == 1


def test_a_batch_streams_each_step_in_one_round_trip(api, node, store, run_node, monkeypatch):
    from scheduler.scripts import EMIT, EMIT_FINISH, FINISH

    per_round_trip: list[int] = []
    run_scripts = store.runner.run_scripts

    def counting(calls, commands=()):
        streamed = sum(1 for c in calls if c.script in (EMIT, EMIT_FINISH, FINISH))
        if streamed:
            per_round_trip.append(streamed)
        return run_scripts(calls, commands)

    monkeypatch.setattr(store.runner, "run_scripts", counting)
    ids = submit(api, 6, max_tokens=8)
    run_node()
    bodies = [api.get(f"/api/v1/requests/{rid}").json() for rid in ids]
    assert [b["status"] for b in bodies] == ["finished"] * 6
    tokens = sum(len(b["output_token_ids"]) for b in bodies)
    assert max(per_round_trip) == 6  # the six requests' tokens of one step went together
    assert len(per_round_trip) <= tokens / 6 + 2  # about one round trip a step, not one a token


def test_each_request_is_an_rq_job_of_its_node_finished_after_it_ran(api, node, store, run_node):
    from rq.job import Job, JobStatus
    from rq.registry import FinishedJobRegistry, StartedJobRegistry
    from rq.serializers import JSONSerializer

    from fdconsole.inference.models import Request

    ids = submit(api, 3, max_tokens=4)
    run_node()
    queue = keys.node_queue_name("default", "node-a")
    options = {"connection": store.redis, "serializer": JSONSerializer}
    uids = [Request.objects.get(request_id=rid).uid for rid in ids]
    assert set(FinishedJobRegistry(queue, **options).get_job_ids()) >= set(uids)
    assert StartedJobRegistry(queue, **options).get_job_ids() == []
    for uid in uids:
        job = Job.fetch(uid, **options)
        assert job.get_status() == JobStatus.FINISHED and job.func_name == "gpu_worker.jobs.run_request"
        assert job.latest_result().return_value["status"] == "finished"


def test_a_request_the_node_can_never_hold_fails_at_once_with_a_clear_error(api, node, store, engine):
    from gpu_worker.capacity import EngineCapacity

    answer = api.post("/api/v1/topics/default/requests",
                      {"prompt": "y" * 100, "max_tokens": 4, "node": "node-a"})
    worker = worker_with(store, engine, EngineCapacity(num_kv_blocks=4, reserved_output_blocks=0))
    worker.work(burst=True, logging_level="CRITICAL")
    body = api.get(f"/api/v1/requests/{answer.json()['request_id']}").json()
    assert body["status"] == "failed"
    assert "more KV blocks than this node's whole cache of 4 blocks" in body["error"]["message"]


def test_the_heartbeat_carries_the_engines_figures(api, node, store, run_node):
    submit(api, 2, max_tokens=4)
    run_node()
    beat = store.read_heartbeats("default", ["node-a"])["node-a"]
    assert beat["kv_blocks_total"] == "512" and beat["kv_blocks_used"] == "0"  # everything freed
    assert beat["batch"] == "0" and beat["waiting"] == "0" and beat["preemptions"] == "0"
    assert 0.0 <= float(beat["prefix_hit_rate"]) <= 1.0 and float(beat["tokens_per_s"]) >= 0.0
    shown = api.get("/api/v1/nodes/node-a").json()
    assert shown["kv_blocks_total"] == 512 and shown["batch_size"] == 0 and shown["preemptions"] == 0


def test_a_request_whose_lease_went_elsewhere_is_let_go_not_ended(api, node, store, engine):
    from rq.registry import FinishedJobRegistry, StartedJobRegistry
    from rq.serializers import JSONSerializer

    from fdconsole.inference.models import Request
    from gpu_worker.capacity import EngineCapacity

    [request_id] = submit(api, 1, max_tokens=3)
    uid = Request.objects.get(request_id=request_id).uid
    worker = worker_with(store, engine, EngineCapacity(num_kv_blocks=64))
    step = worker.runtime.engine.step

    def step_then_lose_the_lease():  # at its last token, as if failover had moved it meanwhile
        outputs = step()
        if any(out.finish_reason for _, out in outputs):
            store.redis.hset(keys.request("default", uid), "lease", "node-z#9")
        return outputs

    worker.runtime.engine.step = step_then_lose_the_lease
    worker.work(burst=True, logging_level="CRITICAL")
    state = store.state("default", uid)
    assert state.status == "running" and state.lease == "node-z#9"  # still the other node's to end
    queue = keys.node_queue_name("default", "node-a")
    options = {"connection": store.redis, "serializer": JSONSerializer}
    assert uid not in FinishedJobRegistry(queue, **options).get_job_ids()
    assert StartedJobRegistry(queue, **options).get_job_ids() == []
    assert not worker.loop.running and not worker.runtime.held
