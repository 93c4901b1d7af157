"""The scheduler's scripts run on each thread's own connection, in one round trip per call: a script
Redis lost is loaded again without running anything twice, an error reply leaves the connection in
step, a killed connection is replaced, and a forked child never shares its parent's socket."""

import multiprocessing
import threading
import time

import pytest
from redis.exceptions import ConnectionError, ResponseError

from scheduler import scripts
from scheduler.config import parse_config
from scheduler.interface import GlobalScheduler
from scheduler.messages import Request
from scheduler.scripts import ScriptCall
from scheduler.store import RequestStore, new_uid


@pytest.fixture
def lane_store(redis_conn) -> RequestStore:
    store = RequestStore(redis_conn)
    store.publish_config("t", parse_config({"scheduler_topic": "t"}))
    return store


def claim_call(n) -> ScriptCall:
    return scripts.CLAIM.call("t", node="n1", n=n, may_steal="0", rand=0.5, lease_s=5, available_blocks=-1,
                              block_size=1, reserved_output_blocks=0, max_num_batched_tokens=0)


def client_id(store: RequestStore) -> int:
    return int(store.runner.run_command("CLIENT", "ID"))


def test_each_thread_keeps_one_connection_of_its_own(lane_store):
    mine = client_id(lane_store)
    assert client_id(lane_store) == mine
    theirs = []
    worker = threading.Thread(target=lambda: theirs.append(client_id(lane_store)))
    worker.start()
    worker.join()
    assert theirs and theirs[0] != mine


def test_scripts_redis_lost_are_loaded_again_and_run_once(lane_store, redis_conn):
    scheduler = GlobalScheduler(parse_config({"scheduler_name": "global", "scheduler_topic": "g"}),
                                redis_conn, node="a", liveness=False)
    redis_conn.script_flush()
    # A SUBMIT run twice would answer 'duplicate' the second time.
    answers = scheduler.put_requests([Request("r1", [1, 2, 3]), Request("r2", [4])])
    assert answers == [("r1", None), ("r2", None)]
    assert [r.request_id for r in scheduler.get_requests(100, 16, 1, 4096, 8)] == ["r1", "r2"]
    assert scheduler.store.queue_lengths("g", ["a"]) == {"a": 0}


def test_an_error_reply_raises_and_the_connection_stays_in_step(lane_store):
    uid = new_uid()
    lane_store.submit("t", uid, Request("r1", [1, 2, 3]), "n1", parse_config({"scheduler_topic": "t"}))
    with pytest.raises(ResponseError):
        lane_store.runner.run_scripts([scripts.CANCEL.call("t", uid=uid), claim_call(n="not-a-number")])
    # The CANCEL before the failing call ran; the reply after the error was read, not left behind.
    assert lane_store.state("t", uid).status == "cancelled"
    assert lane_store.runner.run_command("PING") == b"PONG"
    assert lane_store.claim("t", "n1") == []


def test_a_connection_the_server_closed_is_replaced_before_use(lane_store, redis_conn):
    from scheduler.connection import LANE_CHECK_AFTER_S

    before = client_id(lane_store)
    redis_conn.client_kill_filter(_id=before)  # as a restart, an idle timeout or a proxy reset would
    time.sleep(LANE_CHECK_AFTER_S * 1.5)
    assert lane_store.claim("t", "n1") == []  # no error: checked and reconnected first
    assert client_id(lane_store) != before


def test_a_connection_killed_mid_use_fails_one_call_and_the_next_reconnects(lane_store, redis_conn):
    redis_conn.client_kill_filter(_id=client_id(lane_store))
    outcomes = []
    for _ in range(2):
        try:
            outcomes.append(lane_store.runner.run_command("PING"))
        except ConnectionError:
            outcomes.append("failed")  # the close landed within the pause: as a call in flight
    assert outcomes[-1] == b"PONG" and outcomes.count("failed") <= 1


def test_an_exception_between_two_replies_never_leaves_one_for_the_next_call(lane_store, monkeypatch):
    from redis.connection import AbstractConnection

    real_read = AbstractConnection.read_response
    calls = []

    def interrupted(self, *args, **kwargs):  # as rq's job timeout (a signal) may strike mid-call
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(AbstractConnection, "read_response", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lane_store.runner.run_scripts([scripts.CANCEL.call("t", uid="no-such-uid"), claim_call(n=1)])
    monkeypatch.setattr(AbstractConnection, "read_response", real_read)
    assert lane_store.runner._lane.connection._sock is None  # closed there and then
    assert lane_store.runner.run_command("PING") == b"PONG"  # not the CLAIM's left-over reply


def _child_client_id(store: RequestStore, answers) -> None:
    answers.put(client_id(store))


def test_a_forked_child_opens_its_own_connection(lane_store):
    parent = client_id(lane_store)
    context = multiprocessing.get_context("fork")
    answers = context.Queue()
    child = context.Process(target=_child_client_id, args=(lane_store, answers))
    child.start()
    child.join(timeout=20)
    assert child.exitcode == 0
    assert answers.get(timeout=5) != parent
    assert client_id(lane_store) == parent  # the parent's connection is untouched
