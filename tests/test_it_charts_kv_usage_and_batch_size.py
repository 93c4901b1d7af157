"""The topic page charts KV cache blocks (in use and in all) and the batch size over time: the pulse's
chart point a second sums what the live nodes' heartbeats report, keeps it in the topic's series for
pages opened later, and pushes it to the pages already open."""

import time

import pytest
from asgiref.sync import async_to_sync
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from fdconsole.dashboard.pulse import Pulse, describe_for_browser
from fdconsole.dashboard.routing import websocket_urlpatterns
from scheduler.telemetry import Telemetry

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def ops(db):
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user("ops")


def engine_beat(batch: int, used: int, total: int) -> dict:
    return {"state": "busy", "role": "mixed", "batch": batch, "waiting": 0, "kv_blocks_used": used,
            "kv_blocks_total": total, "prefix_hit_rate": 0.5, "preemptions": 0, "tokens_per_s": 10.0}


def point_of(topic, store) -> dict:
    """One chart point, taken as the pulse takes it a second after its first reading."""
    pulse, telemetry, now = Pulse(), Telemetry(store.redis), time.time()
    nodes = describe_for_browser(list(topic.nodes.select_related("topic").order_by("name")))
    assert pulse.maybe_point(telemetry, topic.name, nodes, 0, now - 1.0) is None  # a rate needs two readings
    return pulse.maybe_point(telemetry, topic.name, nodes, 0, now)


def test_a_point_sums_kv_blocks_and_batch_over_the_live_nodes(topic, store):
    from fdconsole.topics.services import ensure_node

    for name in ("node-a", "node-b", "node-old", "node-gone"):
        ensure_node(name, topic)
    store.write_heartbeat("default", "node-a", engine_beat(batch=5, used=37, total=512))
    store.write_heartbeat("default", "node-b", engine_beat(batch=2, used=10, total=256))
    store.write_heartbeat("default", "node-old", {"state": "idle", "role": "mixed"})  # says nothing
    gone = {**engine_beat(batch=9, used=99, total=99), "state": "stopped"}  # its last beat lingers
    store.write_heartbeat("default", "node-gone", gone)

    point = point_of(topic, store)
    assert (point["kv_used"], point["kv_total"], point["batch"]) == (47, 768, 7)
    assert Telemetry(store.redis).series("default")[-1] == point  # kept for the pages opened later


def test_no_point_figures_when_no_engine_reports_them(topic, node, store):
    store.write_heartbeat("default", "node-a", {"state": "idle", "role": "mixed"})
    point = point_of(topic, store)
    assert (point["kv_used"], point["kv_total"], point["batch"]) == (None, None, None)


def test_the_topic_page_draws_them_from_its_hello_and_the_live_points(client, ops, topic, node, store):
    client.force_login(ops)
    page = client.get("/topics/default/").content.decode()
    assert 'id="chart-kv"' in page and 'id="chart-batch"' in page and 'id="legend-kv"' in page
    earlier = {"t": time.time() - 5, "rps": 0, "tps": 0, "queue": 0, "load": {}, "kv_used": 30,
               "kv_total": 512, "batch": 4}
    Telemetry(store.redis).record_point("default", earlier)
    store.write_heartbeat("default", "node-a", engine_beat(batch=6, used=40, total=512))

    async def watch():
        talk = WebsocketCommunicator(URLRouter(websocket_urlpatterns), "/ws/topics/default/")
        talk.scope["user"] = ops
        assert (await talk.connect())[0]
        hello = await talk.receive_json_from(timeout=5)
        pulse, deadline = Pulse(), time.monotonic() + 5
        while time.monotonic() < deadline:  # the second reading, a second after the first, is a point
            await pulse.broadcast()
            message = await talk.receive_json_from(timeout=5)
            if message["point"] is not None:
                await talk.disconnect()
                return hello, message["point"]
            await talk.receive_nothing(timeout=0.2)
        raise AssertionError("no chart point within the time limit")

    hello, point = async_to_sync(watch)()
    assert hello["series"] == [earlier]
    assert (point["kv_used"], point["kv_total"], point["batch"]) == (40, 512, 6)
