"""The Django admin: its pages render, node actions change where requests go, API tokens are shown
once and stored hashed, and the topic form refuses invalid scheduler values."""

from __future__ import annotations

import json
import re

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db

URL = "/api/v1/topics/default/requests"


@pytest.fixture
def two_nodes(node):
    from fdconsole.topics.services import ensure_node

    return node, ensure_node("node-b", node.topic)


def admin_state(name: str) -> str:
    from fdconsole.nodes.models import Node

    return Node.objects.get(name=name).admin_state


def messages_of(answer) -> list[str]:
    return [str(m) for m in answer.context["messages"]]


# -- pages -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    [
        "/admin/",
        "/admin/topics/topic/",
        "/admin/nodes/node/",
        "/admin/inference/request/",
        "/admin/api/apitoken/",
        "/admin/api/apitoken/add/",
        "/admin/topics/topic/add/",
        "/admin/nodes/node/add/",
        "/admin/auth/user/",
        "/admin/nodes/node/?admin_state__exact=draining",
        "/admin/inference/request/?status__exact=queued",
        "/admin/inference/request/?q=hello",
    ],
)
def test_admin_pages_render_with_a_node_and_a_request(admin, api, node, path):
    assert api.post(URL, {"prompt": "a", "request_id": "hello#1"}).status_code == 202
    answer = admin.get(path)
    assert answer.status_code == 200, answer.content[:500]


def test_changelists_list_the_objects(admin, api, api_token, node):
    from fdconsole.api.models import ApiToken
    from fdconsole.inference.models import Request

    assert api.post(URL, {"prompt": "a", "request_id": "hello#1"}).status_code == 202
    assert b"node-a" in admin.get("/admin/nodes/node/").content
    assert b"hello#1" in admin.get("/admin/inference/request/").content
    assert b"default" in admin.get("/admin/topics/topic/").content
    token = ApiToken.objects.get()
    tokens_page = admin.get("/admin/api/apitoken/").content.decode()
    assert token.prefix in tokens_page and api_token not in tokens_page
    change_page = admin.get(f"/admin/api/apitoken/{token.pk}/change/").content.decode()
    assert api_token not in change_page and token.token_hash not in change_page
    row = Request.objects.get()
    assert admin.get(f"/admin/inference/request/{row.pk}/change/").status_code == 200
    assert admin.get(f"/admin/nodes/node/{node.pk}/change/").status_code == 200


@pytest.mark.parametrize("path", ["/admin/topics/topic/", "/admin/nodes/node/", "/admin/api/apitoken/"])
def test_admin_pages_need_a_staff_login(db, path):
    from django.contrib.auth import get_user_model

    client = Client()
    assert client.get(path).status_code == 302
    client.force_login(get_user_model().objects.create_user("viewer"))  # a user, not staff
    assert client.get(path).status_code == 302


def test_requests_cannot_be_added_or_edited_in_the_admin(admin, api, node):
    from fdconsole.inference.models import Request

    assert api.post(URL, {"prompt": "a"}).status_code == 202
    row = Request.objects.get()
    assert admin.get("/admin/inference/request/add/").status_code == 403
    answer = admin.post(f"/admin/inference/request/{row.pk}/change/", {"status": "finished"})
    assert answer.status_code == 403
    assert Request.objects.get().status == "queued"


# -- node actions ------------------------------------------------------------------------------------
def run_action(admin: Client, action: str, *nodes) -> list[str]:
    answer = admin.post("/admin/nodes/node/",
                        {"action": action, "_selected_action": [n.pk for n in nodes]}, follow=True)
    assert answer.status_code == 200
    return messages_of(answer)


@pytest.mark.parametrize(
    "action, state",
    [("drain_nodes", "draining"), ("disable_nodes", "disabled"), ("enable_nodes", "enabled")],
)
def test_node_actions_set_the_admin_state_of_the_selected_nodes_only(admin, two_nodes, action, state):
    from fdconsole.nodes.models import Node

    a, b = two_nodes
    start = "enabled" if state != "enabled" else "disabled"
    Node.objects.update(admin_state=start)
    messages = run_action(admin, action, a)
    assert admin_state("node-a") == state
    assert admin_state("node-b") == start
    assert any("1 node" in m and state in m for m in messages), messages


def test_node_actions_apply_to_every_selected_node(admin, two_nodes):
    run_action(admin, "drain_nodes", *two_nodes)
    assert {admin_state("node-a"), admin_state("node-b")} == {"draining"}
    run_action(admin, "enable_nodes", *two_nodes)
    assert {admin_state("node-a"), admin_state("node-b")} == {"enabled"}


def test_node_actions_need_the_node_change_permission(db, two_nodes):
    from django.contrib.auth import get_user_model

    from tests.test_it_serves_the_console_pages import with_permissions

    viewer = with_permissions(get_user_model().objects.create_user("watcher", is_staff=True),
                              "nodes.view_node")
    browser = Client()
    browser.force_login(viewer)
    page = browser.get("/admin/nodes/node/").content.decode()
    assert "node-a" in page and "disable_nodes" not in page  # listed, no action offered
    browser.post("/admin/nodes/node/", {"action": "disable_nodes", "_selected_action": [two_nodes[0].pk]})
    assert admin_state("node-a") == "enabled"
    with_permissions(viewer, "nodes.change_node")
    browser.post("/admin/nodes/node/", {"action": "disable_nodes", "_selected_action": [two_nodes[0].pk]})
    assert admin_state("node-a") == "disabled"


def test_a_live_node_shows_draining_in_the_api_after_the_action(admin, api, store, two_nodes):
    store.write_heartbeat("default", "node-a", {"state": "idle"})
    assert api.get("/api/v1/nodes/node-a").json()["state"] == "idle"
    run_action(admin, "drain_nodes", two_nodes[0])
    described = api.get("/api/v1/nodes/node-a").json()
    assert described["admin_state"] == "draining" and described["state"] == "draining"


@pytest.mark.parametrize("action", ["drain_nodes", "disable_nodes"])
def test_a_drained_node_gets_no_new_requests(admin, api, store, two_nodes, action):
    run_action(admin, action, two_nodes[0])
    homes = [api.post(URL, {"prompt": "a", "max_tokens": 1}).json()["home_node"] for _ in range(5)]
    assert homes == ["node-b"] * 5
    assert store.queue_length("default", "node-a") == 0
    assert store.queue_length("default", "node-b") == 5

    refused = api.post(URL, {"prompt": "a", "node": "node-a"})
    assert refused.status_code == 400, refused.content
    assert refused.json()["error"]["field"] == "node"
    assert store.queue_length("default", "node-a") == 0

    run_action(admin, "enable_nodes", two_nodes[0])
    homes = {api.post(URL, {"prompt": "a", "max_tokens": 1}).json()["home_node"] for _ in range(4)}
    assert homes == {"node-a", "node-b"}
    assert api.post(URL, {"prompt": "a", "node": "node-a"}).status_code == 202


def test_draining_every_node_leaves_the_topic_with_none_available(admin, api, store, two_nodes):
    from fdconsole.inference.models import Request

    run_action(admin, "drain_nodes", *two_nodes)
    answer = api.post(URL, {"prompt": "a"})
    assert answer.status_code == 503, answer.content
    assert answer.json()["error"]["code"] == "no_node_available"
    assert Request.objects.count() == 0


# -- API tokens --------------------------------------------------------------------------------------
def test_a_token_made_in_the_admin_is_shown_once_and_stored_hashed(admin, db, store):
    from django.contrib.auth import get_user_model

    from fdconsole.api.models import ApiToken, hash_token

    bob = get_user_model().objects.create_user("bob")
    answer = admin.post("/admin/api/apitoken/add/", {"user": bob.pk, "name": "ci",
                                                  "scope_choices": ["submit", "read"]}, follow=True)
    assert answer.status_code == 200
    shown = [m for m in messages_of(answer) if re.search(r"fd_[A-Za-z0-9_-]{32,}", m)]
    assert len(shown) == 1, messages_of(answer)
    plain = re.search(r"fd_[A-Za-z0-9_-]+", shown[0]).group(0)

    row = ApiToken.objects.get()
    assert row.user == bob and row.name == "ci" and not row.revoked and row.scopes == "submit,read"
    assert row.token_hash == hash_token(plain) and row.token_hash != plain
    assert plain.startswith(row.prefix)
    assert all(plain not in str(getattr(row, f.attname)) for f in ApiToken._meta.concrete_fields)

    works = Client().get("/api/v1/topics", headers={"Authorization": f"Bearer {plain}"})
    assert works.status_code == 200, works.content

    again = admin.get("/admin/api/apitoken/").content.decode() + \
        admin.get(f"/admin/api/apitoken/{row.pk}/change/").content.decode()
    assert plain not in again


def test_revoking_a_token_in_the_admin_stops_it(admin, api_user, api_token):
    from fdconsole.api.models import ApiToken

    row = ApiToken.objects.get()
    answer = admin.post(f"/admin/api/apitoken/{row.pk}/change/",
                        {"name": row.name, "scope_choices": ["read"], "revoked": "on"}, follow=True)
    assert answer.status_code == 200
    row.refresh_from_db()
    assert row.revoked
    assert row.prefix and api_token.startswith(row.prefix)
    assert Client().get("/api/v1/topics", headers={"Authorization": f"Bearer {api_token}"}).status_code == 401


# -- the topic form ----------------------------------------------------------------------------------
def topic_form(topic, **changes) -> dict:
    from fdconsole.topics.models import Topic
    from scheduler.config import PARAMETERS

    row = Topic.objects.get(pk=topic.pk)
    data = {"name": row.name, **{p.name: getattr(row, p.name) for p in PARAMETERS}}
    data.update(changes)
    return {k: "" if v is None else v for k, v in data.items()}


def published(store) -> dict:
    return json.loads(store.redis.get("fd:{default}:config"))


@pytest.mark.parametrize(
    "field, value",
    [
        ("scheduler_ttl", 0),
        ("scheduler_max_size", 0),
        ("scheduler_max_size", -2),
        ("scheduler_port", 65536),
        ("scheduler_db", -1),
        ("scheduler_min_load_score", 0.5),
        ("scheduler_load_shards_num", 0),
        ("scheduler_sync_period", 0),
        ("scheduler_expire_period", -1),
        ("scheduler_reader_parallel", 0),
        ("scheduler_writer_batch_size", 0),
        ("scheduler_name", "fifo"),
        ("scheduler_topic", "other"),
        ("scheduler_topic", "a b"),
    ],
)
def test_the_topic_admin_refuses_an_invalid_value_with_a_form_error(admin, topic, store, field, value):
    from fdconsole.topics.models import Topic

    before = published(store)
    answer = admin.post(f"/admin/topics/topic/{topic.pk}/change/", topic_form(topic, **{field: value}))
    assert answer.status_code == 200  # the form again, not a redirect
    form = answer.context["adminform"].form
    assert field in form.errors, form.errors
    assert Topic.objects.get(pk=topic.pk).config.as_dict() == Topic(name="default").config.as_dict() | {
        "scheduler_topic": "default"}
    assert published(store) == before


def test_the_topic_admin_saves_and_publishes_a_valid_change(admin, topic, store):
    from fdconsole.topics.models import Topic

    answer = admin.post(f"/admin/topics/topic/{topic.pk}/change/",
                        topic_form(topic, scheduler_ttl=30, scheduler_sync_period=0.5))
    assert answer.status_code == 302, answer.context and answer.context["adminform"].form.errors
    row = Topic.objects.get(pk=topic.pk)
    assert row.scheduler_ttl == 30 and row.scheduler_sync_period == 0.5
    assert published(store)["scheduler_ttl"] == 30
    assert published(store)["scheduler_sync_period"] == 0.5


def test_the_topic_admin_creates_a_topic_under_its_own_name(admin, topic, store):
    from fdconsole.topics.models import Topic

    data = topic_form(topic, name="fresh", scheduler_topic="default")
    answer = admin.post("/admin/topics/topic/add/", data)
    assert answer.status_code == 302, answer.context and answer.context["adminform"].form.errors
    assert Topic.objects.get(name="fresh").scheduler_topic == "fresh"
    assert json.loads(store.redis.get("fd:{fresh}:config"))["scheduler_topic"] == "fresh"


@pytest.mark.parametrize("name", ["a b", "", "x" * 65, "a/b"])
def test_the_topic_admin_refuses_a_bad_name(admin, topic, name):
    from fdconsole.topics.models import Topic

    answer = admin.post("/admin/topics/topic/add/", topic_form(topic, name=name, scheduler_topic="default"))
    assert answer.status_code == 200
    assert "name" in answer.context["adminform"].form.errors
    assert list(Topic.objects.values_list("name", flat=True)) == ["default"]


def test_a_token_made_revoked_in_the_admin_is_revoked(admin, db):
    from django.contrib.auth import get_user_model

    from fdconsole.api.models import ApiToken

    bob = get_user_model().objects.create_user("bob")
    answer = admin.post("/admin/api/apitoken/add/", {"user": bob.pk, "name": "off", "revoked": "on",
                                                     "scope_choices": ["read"]}, follow=True)
    assert answer.status_code == 200
    plain = re.search(r"fd_[A-Za-z0-9_-]{32,}", " ".join(messages_of(answer))).group(0)
    assert ApiToken.objects.get().revoked
    assert Client().get("/api/v1/topics", headers={"Authorization": f"Bearer {plain}"}).status_code == 401
