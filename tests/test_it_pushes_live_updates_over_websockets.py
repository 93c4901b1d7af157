"""The live pages' feed: consumers refuse anonymous users and unknown topics, greet a page with the
current state (nodes, recent chart points and events), then forward what the pulse broadcasts through
the Redis channel layer: heartbeats, node state changes, the scripts' events and a chart point a second."""

import time

import pytest
from asgiref.sync import async_to_sync
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from fdconsole.dashboard.pulse import Pulse, transition_event
from fdconsole.dashboard.routing import websocket_urlpatterns
from fdconsole.topics.services import change_topic
from scheduler.config import parse_config
from scheduler.messages import Request
from scheduler.store import new_uid
from scheduler.telemetry import Telemetry

pytestmark = pytest.mark.django_db(transaction=True)
ORIGIN = [(b"origin", b"http://localhost")]


@pytest.fixture
def ops(db):
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user("ops")


def communicator(path: str, user=None) -> WebsocketCommunicator:
    if user is None:
        from fdconsole.asgi import application  # the real stack: origin check, session auth

        return WebsocketCommunicator(application, path, headers=ORIGIN)
    talk = WebsocketCommunicator(URLRouter(websocket_urlpatterns), path)
    talk.scope["user"] = user
    return talk


def greet(path: str, user) -> dict:
    """Connect, take the hello, leave."""

    async def run():
        talk = communicator(path, user)
        assert (await talk.connect())[0]
        hello = await talk.receive_json_from(timeout=5)
        await talk.disconnect()
        return hello

    return async_to_sync(run)()


def until(talk: WebsocketCommunicator, pulse: Pulse, check, seconds: float = 5.0):
    """Broadcast ticks until a message for this page satisfies ``check``; bounded in time."""

    async def run():
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await pulse.broadcast()
            while not await talk.receive_nothing(timeout=0.05):
                message = await talk.receive_json_from()
                if check(message):
                    return message
        raise AssertionError("no matching update within the time limit")

    return run()


def has_event(kind: str):
    return lambda message: any(e["kind"] == kind for e in message["events"])


def test_anonymous_users_and_unknown_topics_are_refused(topic, ops):
    async def attempts():
        refused = []
        for path in ("/ws/cluster/", "/ws/topics/default/"):
            talk = communicator(path)
            connected, _ = await talk.connect()
            refused.append(not connected)
        talk = communicator("/ws/topics/nope/", ops)
        connected, code = await talk.connect()
        refused.append(not connected and code == 4404)
        return refused

    assert async_to_sync(attempts)() == [True, True, True]


def test_a_page_is_greeted_with_nodes_chart_points_and_events(topic, node, store, ops):
    store.write_heartbeat("default", "node-a", {"state": "idle", "role": "mixed"})
    Telemetry(store.redis).add_event("default", "node_joined", node="node-a", role="mixed")
    Telemetry(store.redis).record_point("default", {"t": time.time() - 1, "rps": 2.0, "tps": 40.0, "queue": 1,
                                                    "load": {"node-a": 1}})

    hello = greet("/ws/topics/default/", ops)
    assert hello["hello"] and hello["topic"] == "default"
    [row] = hello["nodes"]
    assert (row["name"], row["state"], row["role"]) == ("node-a", "idle", "mixed")
    assert abs(row["heartbeat_ts"] - time.time()) < 5
    assert [e["kind"] for e in hello["events"]] == ["node_joined"]
    assert hello["series"][0]["tps"] == 40.0


def test_heartbeats_state_changes_events_and_points_reach_the_page(topic, node, store, ops):
    change_topic(topic, {"scheduler_name": "global", "scheduler_min_load_score": 1})
    pulse = Pulse()

    async def watch():
        talk = communicator("/ws/topics/default/", ops)
        assert (await talk.connect())[0]
        await talk.receive_json_from(timeout=5)  # the hello
        seen = {}
        seen["first"] = await until(talk, pulse, lambda m: m["type"] == "topic")
        store.write_heartbeat("default", "node-a", {"state": "idle", "role": "mixed"})
        seen["joined"] = await until(talk, pulse, has_event("node_joined"))
        for _ in range(4):  # queued on node-b, which never beats: node-a steals from it
            store.submit("default", new_uid(), Request(new_uid(), [1, 2]), "node-b",
                         parse_config({"scheduler_name": "global"}))
        store.claim("default", "node-a", 2)
        seen["steal"] = await until(talk, pulse, has_event("steal"))
        seen["point"] = await until(talk, pulse, lambda m: m["point"] is not None)
        store.write_heartbeat("default", "node-a", {"state": "stopped", "role": "mixed"})
        seen["stopped"] = await until(talk, pulse, has_event("node_stopped"))
        await talk.disconnect()
        return seen

    seen = async_to_sync(watch)()
    assert seen["first"]["nodes"][0]["state"] == "dead"  # no heartbeat yet
    assert seen["joined"]["nodes"][0]["state"] == "idle"
    [steal] = [e for e in seen["steal"]["events"] if e["kind"] == "steal"]
    assert (steal["node"], steal["from"], steal["count"]) == ("node-a", "node-b", "1")
    point = seen["point"]["point"]
    assert point["queue"] == 3 and point["load"] == {"node-a": 0} and point["submitted_ps"] > 0  # one runs
    assert Telemetry(store.redis).series("default")[-1] == point  # kept for pages that open later
    assert seen["stopped"]["nodes"][0]["state"] == "dead"


def test_the_cluster_page_gets_every_topic_and_node(topic, node, store, ops):
    store.write_heartbeat("default", "node-a", {"state": "busy", "role": "mixed"})

    async def watch():
        talk = communicator("/ws/cluster/", ops)
        assert (await talk.connect())[0]
        hello = await talk.receive_json_from(timeout=5)
        update = await until(talk, Pulse(), lambda m: m["type"] == "cluster")
        await talk.disconnect()
        return hello, update

    hello, update = async_to_sync(watch)()
    for message in (hello, update):
        assert [t["name"] for t in message["topics"]] == ["default"]
        assert message["topics"][0]["live_nodes"] == 1
        assert [(n["name"], n["state"]) for n in message["nodes"]] == [("node-a", "busy")]


def test_one_pulse_at_a_time_holds_the_lease(store):
    first, second = Pulse(), Pulse()
    assert first.hold_lease() and first.hold_lease()
    assert not second.hold_lease()
    first.release_lease()
    assert second.hold_lease()
    second.release_lease()


@pytest.mark.parametrize("before, after, age, kind", [
    (None, "idle", 0.1, None),  # first sight: nothing happened
    ("idle", "busy", 0.1, None),
    ("dead", "idle", 0.1, "node_joined"),
    ("stale", "busy", 0.1, "node_recovered"),
    ("idle", "stale", 4.0, "node_stale"),
    ("busy", "dead", 0.5, "node_stopped"),  # it said goodbye
    ("stale", "dead", 7.0, "node_died"),  # it fell silent
    ("idle", "draining", 0.1, "node_draining"),
    ("draining", "idle", 0.1, "node_enabled"),
])
def test_node_state_changes_worth_an_event(before, after, age, kind):
    assert transition_event(before, after, age) == kind


def test_a_topic_whose_redis_is_down_shows_the_error_and_spares_the_others(topic, node, store, ops):
    from fdconsole.nodes.models import Node
    from fdconsole.topics.models import Topic
    from tests.conftest import free_port

    elsewhere = Topic.objects.create(name="elsewhere", scheduler_topic="elsewhere",
                                     scheduler_port=free_port())
    Node.objects.create(name="far-1", topic=elsewhere)
    store.write_heartbeat("default", "node-a", {"state": "idle", "role": "mixed"})
    messages = dict(Pulse().tick())
    down, up = messages["topic.elsewhere"], messages["topic.default"]
    assert "'elsewhere'" in down["error"] and "127.0.0.1:" in down["error"]
    assert [(n["name"], n["state"]) for n in down["nodes"]] == [("far-1", "unknown")]
    assert up["nodes"][0]["state"] == "idle" and "error" not in up

    hello = greet("/ws/topics/elsewhere/", ops)
    assert hello["hello"] and "unavailable" in hello["error"] and hello["series"] == []
    from django.test import Client

    browser = Client()
    browser.force_login(ops)
    for path in ("/", "/topics/elsewhere/", "/topics/default/"):  # pages still render, saying what is down
        assert browser.get(path).status_code == 200


def test_the_pulse_forgets_deleted_nodes_and_topics(topic, node, store):
    from fdconsole.nodes.models import Node
    from fdconsole.topics.models import Topic

    other = Topic.objects.create(name="other", scheduler_topic="other")
    Node.objects.create(name="o-1", topic=other)
    store.write_heartbeat("default", "node-a", {"state": "idle", "role": "mixed"})
    pulse = Pulse()
    pulse.tick()
    assert set(pulse.states) == {("default", "node-a"), ("other", "o-1")}
    assert set(pulse.after) == set(pulse.counted) == {"default", "other"}
    Node.objects.filter(name__in=["node-a", "o-1"]).delete()
    other.delete()
    pulse.tick()
    assert pulse.states == {} and set(pulse.after) == set(pulse.counted) == {"default"}
    Node.objects.create(name="node-a", topic=topic)  # made again: seen afresh
    pulse.tick()
    assert pulse.states == {("default", "node-a"): "idle"}
