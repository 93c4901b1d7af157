"""One declared request state and one status vocabulary: every field the scripts write into a request's
hash is declared and parsed by RequestState, in every mode and on every path (queued, stolen, cancelled,
expired, failed over, placed by splitwise and handed off); statuses are ordered so that "finished" is a
comparison, and the database, the core and the in-process scheduler use the same ones."""

import time

import pytest

from scheduler import failover, keys, splitwise
from scheduler.config import parse_config
from scheduler.messages import Request
from scheduler.state import RequestState
from scheduler.status import CancelReply, RequestStatus
from scheduler.store import RequestStore, new_uid


def config(**changes):
    return parse_config({"scheduler_topic": "t", **changes})


@pytest.fixture
def store(redis_conn) -> RequestStore:
    return RequestStore(redis_conn)


def submit(store: RequestStore, home: str = "n1", **changes) -> str:
    uid = new_uid()
    store.submit("t", uid, Request(f"id-{uid[:6]}", [1, 2, 3]), home, config(**changes), origin="o")
    return uid


def every_hash(store: RequestStore) -> list[dict[bytes, bytes]]:
    return [store.redis.hgetall(key) for key in store.redis.scan_iter(match=keys.request("t", "*"))]


def walk_local_and_global(store: RequestStore) -> None:
    store.publish_config("t", config(scheduler_name="global", scheduler_min_load_score=1))
    done, cancelled, running = submit(store), submit(store), submit(store)
    [claim] = store.claim("t", "n1")
    store.emit("t", done, claim.lease, 0, 65, "A")
    store.finish("t", done, claim.lease, status=RequestStatus.FINISHED, finish_reason="length",
                 output_token_ids=[65])
    assert store.cancel("t", cancelled) == RequestStatus.CANCELLED
    [claim] = store.claim("t", "n2", 2)  # stolen from n1's queue
    assert claim.uid == running and claim.home == "n1"
    store.cancel("t", running)
    store.renew("t", "n3", {})
    store.redis.zadd(keys.inflight("t"), {running: 0})  # n2 died holding it
    failover.recover(store, "t")
    store.publish_config("t", config(scheduler_name="global", scheduler_ttl=1))
    submit(store)
    time.sleep(1.1)
    assert len(store.expire_due("t")) == 1


def handed_off(store: RequestStore) -> str:
    """A splitwise request placed on p1 and d1, its first token streamed by p1, then handed to d1."""
    store.publish_config("t", config(scheduler_name="splitwise"))
    store.renew("t", "p1", {}, role="prefill")
    store.renew("t", "d1", {}, role="decode")
    uid = submit(store)
    [claim] = store.claim("t", "p1")
    store.emit("t", uid, claim.lease, 0, 65, "A")
    assert splitwise.hand_off(store, "t", uid, claim.lease, 1234, 1.5)
    return uid


def walk_splitwise(store: RequestStore) -> None:
    handed_off(store)
    [claim] = store.claim("t", "d1")
    assert claim.phase == "decode"
    store.redis.zrem(keys.alive("t"), "p1", "d1")
    waiting = submit(store)  # no live node: it waits for one, saying for what
    assert store.state("t", waiting).waiting_for == "live node"


@pytest.mark.parametrize("walk", [walk_local_and_global, walk_splitwise])
def test_every_field_the_scripts_write_is_declared(store, walk):
    walk(store)
    hashes = every_hash(store)
    assert len(hashes) >= 2
    for raw in hashes:
        assert RequestState.unknown_fields(raw) == set()
        RequestState.from_hash(raw)  # and every value parses as its declared type


def test_the_hash_parses_into_typed_fields(store):
    uid = handed_off(store)
    state = store.state("t", uid)
    assert state.status is RequestStatus.QUEUED and state.phase == "decode"
    assert (state.prefill_node, state.decode_node, state.queue_node) == ("p1", "d1", "d1")
    assert (state.handoff_bytes, state.handoff_ms) == (1234, 1.5)
    assert (state.num_output_tokens, state.attempt) == (1, 1)
    assert (state.charge_p, state.charge_d) == (0, 1)  # the prefill charge was released at the handoff
    assert isinstance(state.started_at, float) and isinstance(state.first_token_at, float)
    assert state.finished_at is None and state.output_token_ids is None and not state.cancel_requested
    assert state.request.prompt_token_ids == [1, 2, 3] and state.ttl == 900
    assert store.state("t", "no-such-uid") is None
    [partial] = store.states("t", [uid], ["status", "decode_node"])
    assert (partial.status, partial.decode_node, partial.prefill_node) == (RequestStatus.QUEUED, "d1", "")


def test_statuses_are_ordered_so_that_finished_is_a_comparison():
    queued, running, finals = RequestStatus.QUEUED, RequestStatus.RUNNING, RequestStatus.finals()
    assert queued < running < RequestStatus.FINISHED
    assert set(finals) == {"finished", "failed", "expired", "cancelled"}
    for final in finals:
        assert final.is_final and final >= RequestStatus.FINISHED and final > running
        assert not final < RequestStatus.FINISHED and not final > RequestStatus.FINISHED  # they rank alike
        assert not final.may_become(RequestStatus.FAILED) and running.may_become(final)
    assert not running.is_final and not running.may_become(queued) and queued.may_become(queued)
    with pytest.raises(TypeError):
        assert queued < "running"
    assert RequestStatus("expired") == "expired"  # a string as well: Redis, JSON and the database take it


def test_the_database_and_the_in_process_scheduler_share_the_vocabulary(db):
    from fdconsole.inference.models import Request as Row
    from scheduler.interface.in_process import InProcessScheduler
    from scheduler.messages import Result

    field = Row._meta.get_field("status")
    assert [value for value, _ in field.choices] == [status.value for status in RequestStatus]
    scheduler = InProcessScheduler(parse_config({}))
    scheduler.put_requests([Request("a", [1]), Request("b", [1])])
    assert scheduler.requests["a"].status is RequestStatus.QUEUED
    scheduler.get_requests(10, 16, 1, 4096, 1)
    assert scheduler.requests["a"].status is RequestStatus.RUNNING
    scheduler.put_results([Result("a", finished=True, finish_reason="length")])
    scheduler.cancel("b")
    assert (scheduler.requests["a"].status, scheduler.requests["b"].status) == (RequestStatus.FINISHED,
                                                                                RequestStatus.CANCELLED)


def test_cancel_names_its_replies(store):
    store.publish_config("t", config())
    uid = submit(store)
    store.claim("t", "n1")
    assert store.cancel("t", uid) is CancelReply.CANCELLING
    assert store.cancel("t", "no-such-uid") is CancelReply.MISSING
