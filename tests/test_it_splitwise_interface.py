"""The splitwise scheduler behind FastDeploy's four calls: results go out through writer threads and
come back through reader threads in order per request, first token first; placement follows roles."""

import time

import pytest

from scheduler.config import parse_config
from scheduler.interface import SplitwiseScheduler
from scheduler.messages import Request, Result


def config(**changes):
    return parse_config({"scheduler_name": "splitwise", "scheduler_topic": "sw", **changes})


@pytest.fixture
def mixed(redis_conn):
    node = SplitwiseScheduler(config(scheduler_writer_parallel=3, scheduler_reader_parallel=2,
                                     scheduler_writer_batch_size=5), redis_conn, node="m1", role="mixed")
    yield node
    node.close()


def collect(scheduler, request_ids, timeout=10.0):
    results: dict[str, list[Result]] = {rid: [] for rid in request_ids}
    deadline = time.monotonic() + timeout
    while not all(r and r[-1].finished for r in results.values()):
        assert time.monotonic() < deadline, {k: len(v) for k, v in results.items()}
        for rid, items in scheduler.get_results().items():
            results[rid].extend(items)
        time.sleep(0.01)
    return results


def test_results_arrive_in_order_per_request_through_parallel_writers_and_readers(mixed):
    ids = [f"r#{i}" for i in range(12)]
    assert mixed.put_requests([Request(rid, [1, 2, 3]) for rid in ids]) == [(rid, None) for rid in ids]
    taken = []
    while len(taken) < len(ids):
        taken += [r.request_id for r in mixed.get_requests(100, 16, 1, 4096, 8)]
    assert sorted(taken) == sorted(ids)
    for index in range(6):  # interleaved across requests, as an engine's steps come
        mixed.put_results([Result(rid, index=index, token_id=65 + index, text="x") for rid in ids])
    mixed.put_results([Result(rid, finished=True, finish_reason="length") for rid in ids])
    results = collect(mixed, ids)
    for rid in ids:
        assert [r.index for r in results[rid]] == [0, 1, 2, 3, 4, 5, -1]
        assert results[rid][-1].finished


def test_a_prefill_and_decode_cluster_places_by_role(redis_conn):
    from scheduler import keys

    prefill = SplitwiseScheduler(config(), redis_conn, node="p1", role="prefill")
    decode = SplitwiseScheduler(config(), redis_conn, node="d1", role="decode")
    try:
        prefill.put_requests([Request("r1", list(range(10)))])
        state = prefill.store.state("sw", prefill.uids["r1"])
        assert (state.prefill_node, state.decode_node, state.phase) == ("p1", "d1", "prefill")
        loads = redis_conn.hgetall(keys.pd_load("sw"))
        assert loads == {b"p1": b"10", b"d1": b"1"}  # prompt tokens on prefill, requests on decode
    finally:
        prefill.close()
        decode.close()
