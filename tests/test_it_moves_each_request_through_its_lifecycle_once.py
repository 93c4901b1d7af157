"""The Redis lifecycle scripts: each request is claimed once, streamed in order under its lease,
finished once, and a node queue never holds more than scheduler_max_size, even under concurrent puts."""

import threading

import pytest

from scheduler.config import parse_config
from scheduler.errors import DuplicateRequest, QueueFull
from scheduler.messages import Request
from scheduler.store import RequestStore, new_uid


@pytest.fixture
def lifecycle(redis_conn) -> RequestStore:
    store = RequestStore(redis_conn)
    store.publish_config("t", parse_config({"scheduler_topic": "t"}))
    return store


def put(store: RequestStore, request_id: str | None = None, node: str = "n1", **config) -> str:
    uid = new_uid()
    store.submit("t", uid, Request(request_id or uid, [1, 2, 3]), node, parse_config(config))
    return uid


def test_a_request_is_claimed_by_one_node_only(lifecycle):
    uid = put(lifecycle)
    [claim] = lifecycle.claim("t", "n1")
    assert claim.uid == uid and claim.request.prompt_token_ids == [1, 2, 3] and claim.streamed == 0
    assert lifecycle.claim("t", "n1") == [] and lifecycle.claim("t", "n2") == []
    assert lifecycle.emit("t", uid, "n2#1", 0, 65, "A") == -1  # not n2's lease
    assert lifecycle.emit("t", uid, claim.lease, 0, 65, "A") == 0
    assert lifecycle.emit("t", uid, claim.lease, 0, 65, "A") == -2  # index 0 again: refused
    assert lifecycle.emit("t", uid, claim.lease, 2, 65, "A") == -2  # a gap: refused


def test_a_request_finishes_once(lifecycle):
    uid = put(lifecycle)
    [claim] = lifecycle.claim("t", "n1")
    assert lifecycle.finish("t", uid, claim.lease, status="finished", finish_reason="length") == "finished"
    assert lifecycle.finish("t", uid, claim.lease, status="failed", finish_reason=None) == "finished"
    assert lifecycle.cancel("t", uid) == "finished"
    done = [e for e in lifecycle.read_output("t", uid) if e.kind == "done"]
    assert len(done) == 1


def test_finished_keys_get_a_ttl(lifecycle):
    from scheduler import keys

    uid = put(lifecycle)
    assert 0 < lifecycle.redis.ttl(keys.request("t", uid)) <= 900 + 3600
    [claim] = lifecycle.claim("t", "n1")
    lifecycle.emit("t", uid, claim.lease, 0, 65, "A")
    lifecycle.finish("t", uid, claim.lease, status="finished", finish_reason="length")
    assert 0 < lifecycle.redis.ttl(keys.request("t", uid)) <= 3600
    assert 0 < lifecycle.redis.ttl(keys.output("t", uid)) <= 3600


def test_a_cancel_reaches_the_running_node_at_its_next_token(lifecycle):
    uid = put(lifecycle)
    [claim] = lifecycle.claim("t", "n1")
    assert lifecycle.cancel("t", uid) == "cancelling"
    assert lifecycle.emit("t", uid, claim.lease, 0, 65, "A") == 1


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
    assert lifecycle.load_scores("t", ["n1"]) == {"n1": 30}


def test_a_request_id_is_unique_while_in_flight(lifecycle):
    put(lifecycle, request_id="same")
    with pytest.raises(DuplicateRequest):
        put(lifecycle, request_id="same")
    assert lifecycle.queue_length("t", "n1") == 1
    assert len(lifecycle.redis.keys("rq:job:*")) == 1  # the refused one left no job behind


def test_ids_with_any_printable_character_round_trip(lifecycle):
    odd = "a#b c/d?e%f{g}h:i✓"
    put(lifecycle, request_id=odd)
    [claim] = lifecycle.claim("t", "n1")
    assert claim.request.request_id == odd


def test_claims_are_fifo_and_respect_the_kv_budget(lifecycle):
    from scheduler.store import Budget

    uids = [put(lifecycle) for _ in range(5)]  # 3-token prompts
    # 2 blocks each (1 for the prompt, 1 reserved): 5 available blocks fit two of them.
    claims = lifecycle.claim("t", "n1", 5, budget=Budget(5, 16, 1, 8192))
    assert [c.uid for c in claims] == uids[:2]
    assert lifecycle.claim("t", "n1", 5, budget=Budget(1, 16, 1, 8192)) == []  # blocks <= reserved
    assert [c.uid for c in lifecycle.claim("t", "n1", 5)] == uids[2:]
