"""The scripts leave a trail for the console: counters of submitted requests, streamed tokens and final
statuses, and events (steal, expiry, failover, re-homing) in a capped stream, in the order they happened."""

import time

import pytest

from scheduler import failover, global_, keys
from scheduler.config import parse_config
from scheduler.messages import Request
from scheduler.status import RequestStatus
from scheduler.store import RequestStore, new_uid
from scheduler.telemetry import Telemetry


@pytest.fixture
def watched(redis_conn) -> RequestStore:
    store = RequestStore(redis_conn)
    store.publish_config("t", parse_config({"scheduler_topic": "t", "scheduler_name": "global",
                                            "scheduler_min_load_score": 1}))
    return store


def put(store: RequestStore, node: str, request_id: str | None = None) -> str:
    uid = new_uid()
    config = parse_config({"scheduler_topic": "t"})
    store.submit("t", uid, Request(request_id or uid, [1, 2, 3]), node, config)
    return uid


def feed(store: RequestStore) -> Telemetry:
    return Telemetry(store.redis)


def kinds(store: RequestStore) -> list[str]:
    return [e["kind"] for e in feed(store).events("t")]


def test_counters_follow_submissions_tokens_and_final_statuses(watched):
    first, second = put(watched, "n1"), put(watched, "n1")
    [claim] = watched.claim("t", "n1")
    for index in range(3):
        watched.emit("t", claim.uid, claim.lease, index, 65, "A")
    watched.finish("t", claim.uid, claim.lease, status=RequestStatus.FINISHED, finish_reason="length")
    watched.cancel("t", second)
    assert feed(watched).counters("t") == {"submitted": 2, "tokens": 3, "finished": 1, "cancelled": 1}
    assert claim.uid == first


def test_a_steal_is_an_event_naming_thief_victim_and_count(watched):
    for _ in range(4):
        put(watched, "busy")
    watched.claim("t", "idle", 2)
    [steal] = feed(watched).events("t")
    assert (steal["kind"], steal["node"], steal["from"], steal["count"]) == ("steal", "idle", "busy", "1")
    assert abs(float(steal["at"]) - time.time()) < 5


def test_an_expiry_is_an_event_with_its_message(watched):
    watched.publish_config("t", parse_config({"scheduler_topic": "t", "scheduler_ttl": 1}))
    put(watched, "n1", request_id="late#1")
    time.sleep(1.1)
    assert len(watched.expire_due("t")) == 1
    [expired] = feed(watched).events("t")
    assert expired["kind"] == "expired" and expired["request_id"] == "late#1" and expired["node"] == "n1"
    assert "scheduler_ttl=1" in expired["message"]


def test_failover_and_rehoming_are_events(watched):
    uid = put(watched, "n1", request_id="moved")
    [claim] = watched.claim("t", "n1")
    watched.write_heartbeat("t", "n2", {"state": "idle"})
    watched.redis.zadd(keys.inflight("t"), {uid: 0})  # n1's lease ran out
    assert failover.recover(watched, "t") == [(uid, "n2")]
    put(watched, "gone")  # queued on a node that never beat: re-homed to the live one
    assert global_.rehome(watched, "t") == 1
    moved, rehomed = feed(watched).events("t")
    assert (moved["kind"], moved["request_id"], moved["from"], moved["to"]) == \
        ("failover", "moved", "n1", "n2")
    assert (rehomed["kind"], rehomed["from"], rehomed["count"]) == ("rehomed", "gone", "1")
    assert claim.uid == uid


def test_events_read_after_an_id_and_stay_capped(watched):
    for i in range(3):
        feed(watched).add_event("t", "node_joined", node=f"n{i}")
    first, *rest = feed(watched).events("t")
    assert [e["node"] for e in feed(watched).events("t", after=first["id"])] == ["n1", "n2"]
    assert feed(watched).last_event_id("t") == rest[-1]["id"]
    for i in range(keys.EVENTS_KEPT * 2):
        feed(watched).add_event("t", "steal", node="x", count=i)
    assert watched.redis.xlen(keys.events("t")) < keys.EVENTS_KEPT * 1.2


def test_chart_points_are_kept_oldest_first_and_trimmed(watched):
    for i in range(5):
        feed(watched).record_point("t", {"t": i, "rps": i * 2}, keep=3)
    assert [p["t"] for p in feed(watched).series("t")] == [2, 3, 4]
