"""Each node's engine figures from its heartbeat: batch size, waiting, KV blocks used of total, prefix-cache
hit rate, preemptions and tokens/s, in the node API, on the cluster and topic pages and in the WebSocket
feed. A node that does not write them (an old engine), or writes garbage, shows nulls and dashes, never
an error."""

import re

import pytest
from asgiref.sync import async_to_sync
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from fdconsole.dashboard.pulse import Pulse
from fdconsole.dashboard.routing import websocket_urlpatterns

pytestmark = pytest.mark.django_db(transaction=True)
ENGINE_BEAT = {"state": "busy", "role": "mixed", "batch": 12, "waiting": 3, "kv_blocks_used": 37,
               "kv_blocks_total": 512, "prefix_hit_rate": 0.875, "preemptions": 2, "tokens_per_s": 431.2}
FIGURES = {"batch_size": 12, "waiting": 3, "kv_blocks_used": 37, "kv_blocks_total": 512,
           "prefix_cache_hit_rate": 0.875, "preemptions": 2, "tokens_per_s": 431.2}
UNKNOWN = dict.fromkeys(FIGURES)
SHOWN = {"batch_size": "12", "waiting": "3", "kv_blocks": "37 / 512", "prefix_cache_hit_rate": "87.5%",
         "preemptions": "2", "tokens_per_s": "431.2"}  # the pages' cells


@pytest.fixture
def ops(db):
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user("ops")


def figures(node: dict) -> dict:
    return {field: node[field] for field in FIGURES}


def test_the_node_api_shows_the_engine_figures(api, node, store):
    store.write_heartbeat("default", "node-a", ENGINE_BEAT)

    assert figures(api.get("/api/v1/nodes/node-a").json()) == FIGURES
    [listed] = api.get("/api/v1/nodes").json()["nodes"]
    assert figures(listed) == FIGURES


def test_a_node_without_them_shows_nulls(api, node, store):
    store.write_heartbeat("default", "node-a", {"state": "idle", "role": "mixed"})  # an old engine
    assert figures(api.get("/api/v1/nodes/node-a").json()) == UNKNOWN
    nothing_looked_up = {**ENGINE_BEAT, "prefix_hit_rate": ""}
    store.write_heartbeat("default", "node-a", nothing_looked_up)
    assert api.get("/api/v1/nodes/node-a").json()["prefix_cache_hit_rate"] is None


@pytest.mark.parametrize("garbage", ["lots", "nan", "inf", "-1", "1e400", "2.5", "0x10", "[1]"])
def test_garbage_in_a_heartbeat_shows_as_null(api, node, store, garbage):
    store.write_heartbeat("default", "node-a", {"state": "busy", "role": "mixed", "load": garbage,
                                                **{field: garbage for field in ENGINE_BEAT if field not in
                                                   ("state", "role")}})
    answer = api.get("/api/v1/nodes/node-a")
    assert answer.status_code == 200 and api.get("/api/v1/nodes").status_code == 200
    shown = figures(answer.json())
    if garbage == "2.5":  # a number, but no count, and no fraction: only tokens/s takes it
        assert shown == {**UNKNOWN, "tokens_per_s": 2.5}
    else:
        assert shown == UNKNOWN
    assert answer.json()["state"] == "busy"


def test_the_pages_show_them_per_node(client, ops, node, store):
    from fdconsole.topics.services import ensure_node

    ensure_node("node-old", node.topic)
    store.write_heartbeat("default", "node-a", ENGINE_BEAT)
    store.write_heartbeat("default", "node-old", {"state": "idle", "role": "mixed"})
    client.force_login(ops)
    for path in ("/", "/topics/default/"):
        page = client.get(path).content.decode()
        new, old = cells(page, "node-a"), cells(page, "node-old")
        assert {field: new[field] for field in SHOWN} == SHOWN, path
        assert {old[field] for field in SHOWN} == {"–"}, path
        for header in ("Batch", "Waiting", "KV blocks", "Prefix hits", "Preempted", "Tokens/s"):
            assert f">{header}</th>" in page


def cells(page: str, node: str) -> dict[str, str]:
    """The text of each ``data-field`` cell of one node's row."""
    row = re.search(rf'<tr data-node="{node}">(.*?)</tr>', page, re.S).group(1)
    return {field: re.sub(r"<[^>]+>", "", text).strip()
            for field, text in re.findall(r'<td data-field="(\w+)"[^>]*>(.*?)</td>', row, re.S)}


def test_the_live_feed_carries_them(ops, node, store):
    store.write_heartbeat("default", "node-a", ENGINE_BEAT)

    async def watch():
        seen = {}
        for path in ("/ws/topics/default/", "/ws/cluster/"):
            talk = WebsocketCommunicator(URLRouter(websocket_urlpatterns), path)
            talk.scope["user"] = ops
            assert (await talk.connect())[0]
            seen[path, "hello"] = await talk.receive_json_from(timeout=5)
            await Pulse().broadcast()
            seen[path, "update"] = await talk.receive_json_from(timeout=5)
            await talk.disconnect()
        return seen

    for key, message in async_to_sync(watch)().items():
        [row] = message["nodes"]
        assert figures(row) == FIGURES and row["prefix_cache_hit_pct"] == 87.5, key
