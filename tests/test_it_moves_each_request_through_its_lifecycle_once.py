"""The Redis lifecycle scripts: each request is claimed once, streamed in order under its lease,
finished once, and a node queue never holds more than scheduler_max_size, even under concurrent puts."""

import threading

import pytest

from scheduler import failover
from scheduler.config import parse_config
from scheduler.errors import DuplicateRequest, QueueFull
from scheduler.messages import Request
from scheduler.status import CancelReply, EmitReply, RequestStatus
from scheduler.store import RequestStore, finish_call, new_uid


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
    # Waiting, it has none: TTL eviction ends it, even after scheduler_ttl was raised past any TTL.
    assert lifecycle.redis.ttl(keys.request("t", uid)) == -1
    [claim] = lifecycle.claim("t", "n1")
    lifecycle.emit("t", uid, claim.lease, 0, 65, "A")
    lifecycle.finish("t", uid, claim.lease, status="finished", finish_reason="length")
    # Kept until the console's database has it (a day at most), then the retention (an hour).
    for key in (keys.request("t", uid), keys.output("t", uid)):
        assert keys.RETENTION_S < lifecycle.redis.ttl(key) <= 86400 + keys.RETENTION_S
    lifecycle.recorded("t", [uid])
    for key in (keys.request("t", uid), keys.output("t", uid)):
        assert 0 < lifecycle.redis.ttl(key) <= keys.RETENTION_S


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


def run_out_leases(store: RequestStore) -> None:
    """What time does to a dead node: every lease it held is past its deadline."""
    from scheduler import keys

    for uid in store.redis.zrange(keys.inflight("t"), 0, -1):
        store.redis.zadd(keys.inflight("t"), {uid: 0})


def test_a_cancel_that_lands_while_the_node_dies_ends_the_request(lifecycle):
    uid = put(lifecycle)
    lifecycle.claim("t", "n1")
    assert lifecycle.cancel("t", uid) == "cancelling"
    run_out_leases(lifecycle)
    assert failover.recover(lifecycle, "t") == []  # not requeued: cancelled
    assert lifecycle.state("t", uid).status == "cancelled"
    assert [e.kind for e in lifecycle.read_output("t", uid)] == ["done"]
    assert lifecycle.queue_length("t", "n1") == 0


def test_failover_puts_requests_back_in_their_order(lifecycle):
    uids = [put(lifecycle) for _ in range(4)]
    lifecycle.claim("t", "n1", 3)
    run_out_leases(lifecycle)
    requeued = [uid for uid, _ in failover.recover(lifecycle, "t")]
    assert requeued == list(reversed(uids[:3]))  # pushed to the front, last first
    assert [c.uid for c in lifecycle.claim("t", "n1", 4)] == uids  # the original order again


def test_a_running_request_cancelled_late_is_recorded_cancelled(lifecycle):
    uid = put(lifecycle)
    [claim] = lifecycle.claim("t", "n1")
    lifecycle.cancel("t", uid)
    assert lifecycle.finish("t", uid, claim.lease, status="finished", finish_reason="length") == "cancelled"


def test_a_node_that_takes_no_work_is_no_failover_target(lifecycle):
    from scheduler import keys

    lifecycle.renew("t", "n1", {})
    lifecycle.renew("t", "n2", {}, accepts_work=False)
    assert lifecycle.redis.zrange(keys.alive("t"), 0, -1) == [b"n1"]


def test_a_final_result_carrying_the_last_token_streams_it_and_ends_the_request(lifecycle):
    from scheduler import keys

    uid = new_uid()
    lifecycle.submit("t", uid, Request("r1", [1, 2, 3]), "n1", parse_config({}), origin="o")
    [claim] = lifecycle.claim("t", "n1")
    assert lifecycle.emit("t", uid, claim.lease, 0, 65, "A") == EmitReply.GO_ON
    call = finish_call("t", uid, claim.lease, RequestStatus.FINISHED, "length", [65, 66],
                       last_token=(1, 66, "B"))
    [reply] = lifecycle.runner.run_scripts([call])
    assert reply == [EmitReply.GO_ON, b"finished"]
    events = lifecycle.read_output("t", uid)
    assert [(e.kind, e.index, e.text) for e in events] == [
        ("token", 0, "A"), ("token", 1, "B"), ("done", -1, "")]
    state = lifecycle.state("t", uid)
    assert (state.status, state.num_output_tokens) == ("finished", 2)
    assert state.output_token_ids == [65, 66]
    results = lifecycle.take_results("t", "o")
    assert [(r.get("index"), r.get("finished")) for r in results] == [(0, None), (1, None), (None, True)]
    assert lifecycle.redis.zscore(keys.inflight("t"), uid) is None


def test_a_final_result_with_an_out_of_order_token_still_ends_the_request_once(lifecycle):
    uid = put(lifecycle)
    [claim] = lifecycle.claim("t", "n1")
    call = finish_call("t", uid, claim.lease, RequestStatus.FINISHED, "length", last_token=(3, 65, "A"))
    assert lifecycle.runner.run_scripts([call]) == [[EmitReply.OUT_OF_ORDER, b"finished"]]
    assert [e.kind for e in lifecycle.read_output("t", uid)] == ["done"]
    assert lifecycle.runner.run_scripts([call]) == [[EmitReply.LEASE_LOST, b"finished"]]  # the lease is gone
    assert [e.kind for e in lifecycle.read_output("t", uid)] == ["done"]


def test_a_final_result_with_a_token_after_a_cancel_ends_cancelled(lifecycle):
    uid = put(lifecycle)
    [claim] = lifecycle.claim("t", "n1")
    assert lifecycle.cancel("t", uid) == CancelReply.CANCELLING
    call = finish_call("t", uid, claim.lease, RequestStatus.FINISHED, "length", last_token=(0, 65, "A"))
    assert lifecycle.runner.run_scripts([call]) == [[EmitReply.CANCEL_ASKED, b"cancelled"]]
    assert lifecycle.state("t", uid).status == "cancelled"


def test_submitting_nothing_answers_nothing(lifecycle):
    for name in ("local", "global", "splitwise"):
        assert lifecycle.submit_many("t", [], parse_config({"scheduler_name": name})) == ([], [])
