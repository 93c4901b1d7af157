"""The database is the record, Redis the working state: what the reconciler does with an unfinished row
whatever Redis went through. Redis restarted without its data is a FLUSHDB of the test server; a row
older than the reconciler's grace is one whose submission is long done (its created_at set back)."""

from datetime import timedelta

import pytest
from django.utils import timezone

from fdconsole.inference.models import Request
from fdconsole.inference.reconcile import reconcile_once
from fdconsole.inference.sync import RESUBMIT_GRACE_S
from scheduler import keys

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgresql]
PROMPT = {"prompt": "the record and the working state", "max_tokens": 12}


def submit(api, body=PROMPT) -> Request:
    answer = api.post("/api/v1/topics/default/requests", body)
    assert answer.status_code == 202, answer.content
    return Request.objects.get(request_id=answer.json()["request_id"])


def age(row: Request, seconds: float) -> None:
    Request.objects.filter(pk=row.pk).update(created_at=timezone.now() - timedelta(seconds=seconds))


def reference_output(api, run_node) -> list[int]:
    row = submit(api)
    run_node()
    row.refresh_from_db()
    assert row.status == "finished" and len(row.output_token_ids) == PROMPT["max_tokens"]
    return list(row.output_token_ids)


def stream_indexes(store, row: Request) -> list[int]:
    return [e.index for e in store.read_output("default", row.uid, count=10_000) if e.kind == "token"]


def test_a_waiting_request_redis_forgot_is_queued_again_from_its_row_and_finishes(api, node, store, run_node):
    expected = reference_output(api, run_node)
    row = submit(api)
    store.redis.flushdb()  # Redis restarted empty: the request, its queue and the topic's config are gone
    age(row, RESUBMIT_GRACE_S + 1)
    assert reconcile_once().checked == 1
    assert store.state("default", row.uid) is not None
    assert store.config_of("default") is not None  # published again from the database
    run_node()
    reconcile_once()
    row.refresh_from_db()
    assert (row.status, row.output_token_ids, row.error_code) == ("finished", expected, "")


def test_a_running_request_redis_forgot_resumes_after_the_tokens_its_row_holds(api, node, store, run_node):
    expected = reference_output(api, run_node)
    row = submit(api)
    # The row as the node's hook last wrote it mid-run: five tokens streamed, then Redis lost everything.
    Request.objects.filter(pk=row.pk).update(status="running", output_token_ids=expected[:5])
    store.redis.flushdb()
    age(row, RESUBMIT_GRACE_S + 1)
    reconcile_once()
    state = store.state("default", row.uid)
    assert state.num_output_tokens == 5 and stream_indexes(store, row) == [0, 1, 2, 3, 4]
    run_node()
    row.refresh_from_db()
    assert (row.status, row.output_token_ids) == ("finished", expected)
    assert stream_indexes(store, row) == list(range(len(expected)))  # each index once


def test_a_resubmitted_request_keeps_its_text(api, node, store, run_node):
    reference = submit(api)
    run_node()
    reference.refresh_from_db()
    row = submit(api)
    held = reference.output_token_ids[:5]
    Request.objects.filter(pk=row.pk).update(status="running", output_token_ids=held)
    store.redis.flushdb()
    age(row, RESUBMIT_GRACE_S + 1)
    reconcile_once()
    run_node()
    texts = "".join(e.text for e in store.read_output("default", row.uid, count=10_000) if e.kind == "token")
    assert texts == reference.output_text
    row.refresh_from_db()
    assert row.output_text == reference.output_text


def test_a_request_redis_forgot_after_its_ttl_expired_and_is_not_lost(api, node, store):
    api.patch("/api/v1/topics/default", {"scheduler_ttl": 30})
    row = submit(api)
    store.redis.flushdb()
    age(row, 31)
    reconcile_once()
    row.refresh_from_db()
    assert row.status == "expired" and row.error_code == "expired"
    assert "scheduler_ttl=30s" in row.error_message
    assert store.state("default", row.uid) is None  # not queued again


def test_a_submission_still_on_its_way_is_left_alone(api, node, store):
    row = submit(api)
    store.redis.flushdb()  # as if the reconciler looked between the row's insert and the queueing
    reconcile_once()
    assert store.state("default", row.uid) is None
    row.refresh_from_db()
    assert row.status == "queued"


def test_a_final_state_no_node_wrote_reaches_the_row_and_redis_keeps_it_until_then(api, node, store,
                                                                                   batch_engine):
    from gpu_worker.node import NodeWorker
    from gpu_worker.runtime import NodeHooks, NodeRuntime

    row = submit(api)
    # A node whose database writes all went nowhere (NodeHooks(): it tells no database anything).
    runtime = NodeRuntime(topic="default", name="node-a", role="mixed", store=store, engine=batch_engine,
                          hooks=NodeHooks())
    NodeWorker(runtime).work(burst=True, logging_level="WARNING")
    assert Request.objects.get(pk=row.pk).status == "queued"
    request_key = keys.request("default", row.uid)
    assert store.state("default", row.uid).status == "finished"
    assert store.redis.ttl(request_key) > keys.RETENTION_S  # kept until the database has it
    done = reconcile_once()
    assert (done.checked, done.finished) == (1, 1)
    row.refresh_from_db()
    assert row.status == "finished" and len(row.output_token_ids) == PROMPT["max_tokens"]
    assert 0 < store.redis.ttl(request_key) <= keys.RETENTION_S
    assert 0 < store.redis.ttl(keys.output("default", row.uid)) <= keys.RETENTION_S


def test_a_late_first_submission_of_a_request_already_queued_again_is_no_duplicate(api, node, store):
    from fdconsole.inference.sync import _request_of

    row = submit(api)
    store.redis.flushdb()
    age(row, RESUBMIT_GRACE_S + 1)
    reconcile_once()  # queued again from its row
    config = row.topic.config
    # Its own first submission arriving late: no duplicate, nothing expired.
    assert store.submit("default", row.uid, _request_of(row), "node-a", config) == []


def test_one_topic_redis_down_holds_up_only_its_own_rows(api, node, store, run_node):
    from fdconsole.topics.models import Topic
    from fdconsole.topics.services import create_topic

    down = create_topic("elsewhere", {"model": "tiny"})
    Topic.objects.filter(pk=down.pk).update(scheduler_port=1)  # its Redis went away (nothing answers on 1)
    Request.objects.create(uid="u-down", request_id="r-down", topic=down, model="tiny",
                           created_at=timezone.now() - timedelta(seconds=60))
    row = submit(api)
    run_node()
    Request.objects.filter(pk=row.pk).update(status="queued")  # the node's write of its end was lost
    done = reconcile_once()
    assert list(done.unreachable) == ["elsewhere"]
    row.refresh_from_db()
    assert row.status == "finished"


def test_cancelling_a_request_redis_forgot_cancels_it_and_never_queues_it_again(api, node, store):
    row = submit(api)
    store.redis.flushdb()
    age(row, RESUBMIT_GRACE_S + 1)
    answer = api.delete(f"/api/v1/requests/{row.request_id}")
    assert answer.json()["status"] == "cancelled"
    reconcile_once()
    assert store.state("default", row.uid) is None
    row.refresh_from_db()
    assert (row.status, row.error_code) == ("cancelled", "cancelled")


def test_a_request_queued_again_keeps_its_time_to_first_token(api, node, store, run_node):
    row = submit(api)
    run_node()
    row.refresh_from_db()
    first_token_at = row.first_token_at
    # As if Redis lost it right after it finished, before the node's hook wrote the end.
    Request.objects.filter(pk=row.pk).update(status="running", finished_at=None)
    store.redis.flushdb()
    age(row, RESUBMIT_GRACE_S + 1)
    reconcile_once()
    run_node()
    reconcile_once()
    row.refresh_from_db()
    assert row.status == "finished" and row.first_token_at == first_token_at
