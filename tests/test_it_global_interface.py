"""The Global scheduler behind FastDeploy's four calls, over a real Redis: synchronous answers,
FIFO within budgets, stealing at and above scheduler_min_load_score (changed at run time), results
routed to the origin, error results among the others, TTL."""

import time

import pytest

from scheduler.config import parse_config
from scheduler.interface import GlobalScheduler
from scheduler.messages import Request, Result


def config(**changes):
    return parse_config({"scheduler_name": "global", "scheduler_topic": "g", **changes})


@pytest.fixture
def pair(redis_conn):
    """Two nodes of topic g; each is also the origin of what it puts."""
    nodes = GlobalScheduler(config(), redis_conn, node="a"), GlobalScheduler(config(), redis_conn, node="b")
    yield nodes
    for node in nodes:
        node.close()


def requests(*ids, prompt_len=3):
    return [Request(i, list(range(prompt_len))) for i in ids]


def take(scheduler, batch=8):
    return [r.request_id for r in scheduler.get_requests(100, 16, 1, 4096, batch)]


def test_put_answers_exactly_the_requests_passed_in_order(pair):
    a, _ = pair
    assert a.put_requests(requests("r1", "r2")) == [("r1", None), ("r2", None)]
    assert a.put_requests(requests("r3", "r1", "r4")) == [
        ("r3", None), ("r1", "duplicate request id 'r1'"), ("r4", None)]
    assert take(a) == ["r1", "r2", "r3", "r4"]


def test_get_requests_respects_budgets_and_batch(pair):
    a, _ = pair
    a.put_requests(requests("r1", "r2", "r3", prompt_len=40))  # 3 blocks of 16 + 1 reserved each
    assert a.get_requests(1, 16, 1, 4096, 8) == []  # available <= reserved
    assert a.get_requests(100, 16, 1, 4096, 0) == []
    assert [r.request_id for r in a.get_requests(9, 16, 1, 4096, 8)] == ["r1", "r2"]
    assert [r.request_id for r in a.get_requests(100, 16, 1, 10, 8)] == ["r3"]  # first fits alone


def test_an_idle_node_steals_only_from_a_loaded_one_and_a_new_minimum_applies_at_once(pair):
    a, b = pair
    a.put_requests(requests("r1", "r2"))
    assert take(b) == []  # a's score 2 < scheduler_min_load_score 3
    b.apply_config(config(scheduler_min_load_score=1))
    stolen = take(b, batch=2)
    assert stolen == ["r1"]  # half of b's batch of 2, oldest first
    assert a.stats()["load_scores"] == {"a": 1.0} and b.stats()["load_scores"] == {"b": 0.0}


def test_results_reach_the_origin_whoever_ran_the_request(pair):
    a, b = pair
    a.put_requests(requests("r1", "r2", "r3", "r4"))
    assert take(b, batch=2) == ["r1"]  # b steals one
    b.put_results([Result("r1", index=0, token_id=65, text="A"),
                   Result("r1", finished=True, finish_reason="length")])
    assert take(a) == ["r2", "r3", "r4"]
    a.put_results([Result("r2", finished=True, error={"code": "engine_error", "message": "boom"}),
                   Result("r3", index=0, token_id=66, text="B"),
                   Result("r3", finished=True, finish_reason="stop"),
                   Result("r4", finished=True, finish_reason="length")])
    results = a.get_results()
    assert [(r.index, r.token_id, r.finished) for r in results["r1"]] == [(0, 65, False), (-1, None, True)]
    assert results["r2"][0].error == {"code": "engine_error", "message": "boom"}
    assert [r.finish_reason for r in results["r3"]] == [None, "stop"]
    assert results["r4"][0].finished
    assert b.get_results() == {}  # b ran r1 but is not its origin
    assert a.put_requests(requests("r1")) == [("r1", None)]  # a finished id may be used again


def test_a_waiting_request_expires_with_a_final_result(pair, redis_conn):
    a, _ = pair
    a.apply_config(config(scheduler_ttl=1))
    a.put_requests(requests("r1"))
    time.sleep(1.1)
    assert take(a) == []  # the claim expires it instead of handing it out
    [result] = a.get_results()["r1"]
    assert result.finished and result.error["code"] == "expired"


def test_cancel_of_a_waiting_request(pair):
    a, _ = pair
    a.put_requests(requests("r1", "r2"))
    assert a.cancel("r1") is True
    assert take(a) == ["r2"]
    assert a.get_results()["r1"][0].error["code"] == "cancelled"


def test_a_live_interface_node_keeps_its_queue_and_its_leases(pair, redis_conn):
    from scheduler import failover, global_
    from scheduler.store import LEASE_S

    a, b = pair
    a.put_requests(requests("r1", "r2"))
    assert take(a, batch=1) == ["r1"]
    time.sleep(LEASE_S + 1.5)  # its heartbeat renews the lease; the reapers run all along
    assert failover.recover(a.store, "g") == [] and global_.rehome(a.store, "g") == 0
    assert a.stats()["queue_lengths"] == {"a": 1}
    a.put_results([Result("r1", finished=True, finish_reason="length")])
    assert a.get_results()["r1"][0].finished


def test_a_running_request_cancelled_by_its_client_is_reported_to_the_engine(pair):
    a, _ = pair
    a.put_requests(requests("r1"))
    take(a)
    assert a.cancel("r1") is True
    a.put_results([Result("r1", index=0, token_id=65, text="A")])
    assert a.is_cancelled("r1")
    a.put_results([Result("r1", finished=True, finish_reason="cancelled")])
    [token, final] = a.get_results()["r1"]
    assert final.finished and final.finish_reason == "cancelled"


def test_a_final_result_carrying_the_last_token_reaches_the_origin_as_token_then_end(pair):
    a, _ = pair
    a.put_requests(requests("r1"))
    take(a)
    a.put_results([Result("r1", index=0, token_id=65, text="A")])
    a.put_results([Result("r1", index=1, token_id=66, text="B", finished=True, finish_reason="length")])
    results = a.get_results()["r1"]
    assert [(r.index, r.text, r.finished) for r in results] == [
        (0, "A", False), (1, "B", False), (-1, "", True)]
    assert results[-1].finish_reason == "length"
    assert a.running == {}
