"""scheduler_ttl and scheduler_max_size on real node queues: eviction really runs, 429 for what does
not fit, and an expired request never runs."""

import time

import pytest

from tests.nodes import wait_row_status

pytestmark = pytest.mark.django_db(transaction=True)


def submit(api, **extra):
    return api.post("/api/v1/topics/default/requests", {"prompt": "hi", "max_tokens": 4, **extra})


def test_third_request_is_refused_and_the_first_two_expire(api, node, store, run_node):
    patched = api.patch("/api/v1/topics/default", {"scheduler_ttl": 1, "scheduler_max_size": 2})
    assert patched.status_code == 200
    first, second, third = submit(api), submit(api), submit(api)
    assert (first.status_code, second.status_code) == (202, 202)
    assert third.status_code == 429
    assert third.json()["error"]["code"] == "queue_full"
    assert "scheduler_max_size=2" in third.json()["error"]["message"]
    from fdconsole.inference.models import Request

    assert Request.objects.count() == 2  # the refused one left no record
    time.sleep(1.2)
    for answer in (first, second):
        body = api.get(f"/api/v1/requests/{answer.json()['request_id']}").json()
        assert body["status"] == "expired"
        assert body["error"]["code"] == "expired" and "scheduler_ttl=1" in body["error"]["message"]
        assert body["output_token_ids"] == [] and body["finished_at"]
    assert store.queue_length("default", "node-a") == 0
    run_node()
    assert api.get("/api/v1/nodes/node-a").json()["requests_run"] == 0


def test_eviction_runs_with_an_unbounded_queue_that_is_not_full(api, node):
    api.patch("/api/v1/topics/default", {"scheduler_ttl": 1})  # max_size stays -1
    request_id = submit(api).json()["request_id"]
    time.sleep(1.2)
    assert api.get(f"/api/v1/requests/{request_id}").json()["status"] == "expired"


def test_the_reaper_expires_within_a_second_without_any_reader(api, node, store):
    from fdconsole.cluster.hooks import sync_many
    from fdconsole.inference.models import Request
    from scheduler.reaper import Reaper

    api.patch("/api/v1/topics/default", {"scheduler_ttl": 1})
    submit(api)
    reaper = Reaper(store, sync_many)
    reaper.start()
    try:
        row = Request.objects.get()
        wait_row_status(row, "expired")
    finally:
        reaper.stop()
    assert row.status == "expired"
    waited = (row.finished_at - row.created_at).total_seconds()
    assert 1.0 <= waited <= 2.0, waited


def test_a_shorter_ttl_applies_to_requests_already_waiting(api, node):
    request_id = submit(api).json()["request_id"]  # queued under the default ttl of 900 s
    api.patch("/api/v1/topics/default", {"scheduler_ttl": 1})
    time.sleep(1.2)
    assert api.get(f"/api/v1/requests/{request_id}").json()["status"] == "expired"


def test_an_overdue_request_is_expired_by_the_claim_not_run(api, node, store, run_node):
    api.patch("/api/v1/topics/default", {"scheduler_ttl": 1})
    request_id = submit(api).json()["request_id"]
    time.sleep(1.1)
    run_node()  # the node pops the job; its claim sees the deadline passed
    body = api.get(f"/api/v1/requests/{request_id}").json()
    assert body["status"] == "expired" and body["executed_by"] is None


def test_space_freed_by_expiry_is_usable_again(api, node):
    api.patch("/api/v1/topics/default", {"scheduler_ttl": 1, "scheduler_max_size": 1})
    assert submit(api).status_code == 202
    assert submit(api).status_code == 429
    time.sleep(1.2)
    assert submit(api).status_code == 202


def test_an_unnamed_request_goes_to_another_node_when_its_turn_is_full(api, topic):
    from fdconsole.topics.services import ensure_node

    ensure_node("n1", topic)
    ensure_node("n2", topic)
    api.patch("/api/v1/topics/default", {"scheduler_max_size": 1})
    assert submit(api, node="n1").status_code == 202
    homes = [submit(api) for _ in range(2)]
    assert [a.status_code for a in homes] == [202, 429]
    assert homes[0].json()["home_node"] == "n2"
    assert "every enabled node" in homes[1].json()["error"]["message"]
    named = submit(api, node="n1")
    assert named.status_code == 429 and "node 'n1'" in named.json()["error"]["message"]
