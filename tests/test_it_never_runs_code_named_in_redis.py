"""Nothing read from Redis is imported or called. Whoever can write to a topic's Redis can rewrite a
request's rq job hash (its function, arguments, callbacks, webhooks), plant an abandoned job in the
node's started registry, whose failure callback rq's maintenance would call, or list dependents that
rq would enqueue once the request's job is done; a node builds the job it runs from its claim and
runs exactly the request it claimed, nothing else."""

import json
import logging
import sys
import zlib

import pytest

pytestmark = pytest.mark.django_db(transaction=True)

PLANTED = "tests.planted.record"


def plant_job_hash(redis, uid: str, marker) -> None:
    """The request's job hash, rewritten: os.system with a shell command, and every callback."""
    from rq.job import Job

    data = zlib.compress(json.dumps(["os.system", None, [f"touch {marker}"], {}]).encode())
    redis.hset(Job.key_for(uid), mapping={
        "data": data, "success_callback_name": PLANTED, "failure_callback_name": PLANTED,
        "stopped_callback_name": PLANTED,
        "webhooks": json.dumps([{"url": "http://127.0.0.1:9/planted", "job_status": "finished"}]),
    })


def plant_dependent(redis, uid: str, queue_name: str) -> None:
    """A job listed as depending on the request's, queued (by rq) on the node's queue once it is done."""
    from rq.job import Job

    data = zlib.compress(json.dumps(["os.getcwd", None, [], {}]).encode())
    redis.hset(Job.key_for("dependent"), mapping={"data": data, "origin": queue_name, "status": "deferred",
                                                  "dependency_id": uid, "dependency_ids": json.dumps([uid])})
    redis.sadd(f"{Job.key_for(uid)}:dependents", "dependent")


def plant_abandoned_job(redis, queue_name: str) -> str:
    """An entry in the node queue's started registry, long expired, whose job names a failure callback."""
    from rq.job import Job
    from rq.registry import StartedJobRegistry

    data = zlib.compress(json.dumps(["os.getcwd", None, [], {}]).encode())
    redis.hset(Job.key_for("abandoned"), mapping={"data": data, "failure_callback_name": PLANTED,
                                                  "origin": queue_name, "status": "started"})
    key = StartedJobRegistry(queue_name, connection=redis).key
    redis.zadd(key, {"abandoned:execution-1": 1})
    return key


def test_a_planted_job_hash_is_ignored_and_the_request_runs_as_claimed(api, node, run_node, engine, store,
                                                                        tmp_path, monkeypatch, caplog):
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from fdconsole.inference.models import Request
    from scheduler import keys
    from scheduler.messages import SamplingParams
    from scheduler.store import RUN_REQUEST_JOB

    marker = tmp_path / "planted"
    monkeypatch.setenv("FD_PLANTED_MARK", str(marker))
    answer = api.post("/api/v1/topics/default/requests", {"prompt": "Hello", "max_tokens": 8})
    assert answer.status_code == 202, answer.content
    request_id = answer.json()["request_id"]
    uid = Request.objects.get(request_id=request_id).uid
    plant_job_hash(store.redis, uid, marker)
    queue_name = keys.node_queue_name("default", "node-a")
    registry = plant_abandoned_job(store.redis, queue_name)
    plant_dependent(store.redis, uid, queue_name)

    with caplog.at_level(logging.WARNING, logger="gpu_worker.node"):
        run_node()

    done = api.get(f"/api/v1/requests/{request_id}").json()
    steps = engine.generate(list(b"Hello"), SamplingParams(max_tokens=8))
    expected = [s.token_id for s in steps if s.token_id >= 0]
    assert done["status"] == "finished" and done["output_token_ids"] == expected
    # Nothing planted ran: no shell command, no import of the planted module, no call of it.
    assert not marker.exists()
    assert not marker.with_suffix(".imported").exists() and not marker.with_suffix(".called").exists()
    assert "tests.planted" not in sys.modules
    # It said so, naming what it ignored, and the hash now names what actually ran.
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "'os.system'" in warning and PLANTED in warning and "webhooks" in warning
    job = Job.fetch(uid, connection=store.redis, serializer=JSONSerializer)  # data only: JSON, never pickle
    assert job.func_name == RUN_REQUEST_JOB and job.args == ["default", uid]
    assert not store.redis.hget(Job.key_for(uid), "success_callback_name")
    # The abandoned entry was dropped by the node's maintenance without its job being fetched and run.
    assert store.redis.zcard(registry) == 0
    # Nothing was put in the node's queue behind the scheduler's back: its length is still its score.
    assert store.queue_length("default", "node-a") == 0
    assert store.load_scores("default", ["node-a"]) == {"node-a": 0.0}


def test_a_job_hash_that_names_the_request_job_raises_no_warning(api, node, run_node, store, caplog):
    with caplog.at_level(logging.WARNING, logger="gpu_worker.node"):
        answer = api.post("/api/v1/topics/default/requests", {"prompt": "Hi", "max_tokens": 2})
        assert answer.status_code == 202
        run_node()
    assert not [r for r in caplog.records if "rq job hash" in r.getMessage()]
