"""The Redis lifecycle scripts: each request is claimed once, finished once, and its node queue never
holds more than scheduler_max_size, even under concurrent submits."""

import threading

import pytest

from scheduler.config import parse_config
from scheduler.errors import QueueFull
from scheduler.messages import Request
from scheduler.store import RequestStore, new_uid


@pytest.fixture
def lifecycle(redis_conn) -> RequestStore:
    store = RequestStore(redis_conn)
    store.publish_config("t", parse_config({"scheduler_topic": "t"}))
    return store


def put(store: RequestStore, request_id: str = "r", node: str = "n1", **config) -> str:
    uid = new_uid()
    store.submit("t", uid, Request(request_id, [1, 2, 3]), node, parse_config(config))
    return uid


def test_a_request_is_claimed_by_one_node_only(lifecycle):
    uid = put(lifecycle)
    status, request = lifecycle.start("t", uid, "n1")
    assert status == "running" and request.prompt_token_ids == [1, 2, 3]
    assert lifecycle.start("t", uid, "n2") == ("running", None)
    assert lifecycle.emit("t", uid, "n2", 0, 65, "A") == -1  # not n2's request
    assert lifecycle.emit("t", uid, "n1", 0, 65, "A") == 0


def test_a_request_finishes_once(lifecycle):
    uid = put(lifecycle)
    lifecycle.start("t", uid, "n1")
    assert lifecycle.finish("t", uid, "n1", status="finished", finish_reason="length") == "finished"
    assert lifecycle.finish("t", uid, "n1", status="failed", finish_reason=None) == "finished"
    assert lifecycle.cancel("t", uid) == "finished"
    done = [e for e in lifecycle.read_output("t", uid) if e.kind == "done"]
    assert len(done) == 1


def test_finished_keys_get_a_ttl_and_waiting_ones_are_bounded(lifecycle):
    from scheduler import keys

    uid = put(lifecycle)
    assert 0 < lifecycle.redis.ttl(keys.request("t", uid)) <= 900 + 3600
    lifecycle.start("t", uid, "n1")
    lifecycle.emit("t", uid, "n1", 0, 65, "A")
    lifecycle.finish("t", uid, "n1", status="finished", finish_reason="length")
    assert 0 < lifecycle.redis.ttl(keys.request("t", uid)) <= 3600
    assert 0 < lifecycle.redis.ttl(keys.output("t", uid)) <= 3600


def test_a_cancel_reaches_the_running_node_at_its_next_token(lifecycle):
    uid = put(lifecycle)
    lifecycle.start("t", uid, "n1")
    assert lifecycle.cancel("t", uid) == "cancelling"
    assert lifecycle.emit("t", uid, "n1", 0, 65, "A") == 1


def test_concurrent_submits_never_overfill_a_queue(lifecycle):
    accepted, refused = [], []

    def submit_many():
        for _ in range(25):
            try:
                accepted.append(put(lifecycle, scheduler_max_size=30))
            except QueueFull:
                refused.append(1)

    threads = [threading.Thread(target=submit_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(accepted) == 30 and len(refused) == 70
    assert lifecycle.queue_length("t", "n1") == 30


def test_ids_with_any_printable_character_round_trip(lifecycle):
    odd = "a#b c/d?e%f{g}h:i✓"
    uid = put(lifecycle, request_id=odd)
    _, request = lifecycle.start("t", uid, "n1")
    assert request.request_id == odd
