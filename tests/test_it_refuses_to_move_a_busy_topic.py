"""Changing where a topic's Redis is (scheduler_host/port/db/password) is refused with 409, naming the
field, while the topic has unfinished requests or running nodes, through the API and in the admin; an
idle topic moves, and the Redis it left forgets it."""

from __future__ import annotations

import json

import pytest
from django.test import Client
from redis import Redis

from tests.api_errors import assert_error
from tests.test_it_manages_nodes_in_the_admin import topic_form

pytestmark = pytest.mark.django_db
NEW_DB = 7
TOPIC = "/api/v1/topics/default"


@pytest.fixture(autouse=True)
def second_host(settings):
    """'localhost' names this machine's Redis too: the operator allows it (FD_TOPIC_REDIS_HOSTS)."""
    settings.FD_TOPIC_REDIS_HOSTS = ["127.0.0.1", "localhost"]


@pytest.fixture
def new_db(redis_url):
    """Database 7 of the test Redis, where the topic moves to; empty before and after."""
    conn = Redis.from_url(redis_url.rsplit("/", 1)[0] + f"/{NEW_DB}")
    conn.flushdb()
    yield conn
    conn.flushdb()
    conn.close()


def submit(api) -> str:
    answer = api.post(f"{TOPIC}/requests", {"prompt": "wait for me", "max_tokens": 4})
    assert answer.status_code == 202, answer.content
    return answer.json()["request_id"]


def beat(store, state: str) -> None:
    """What node-a's heartbeat says (as a running or a stopped fdnode writes it)."""
    store.write_heartbeat("default", "node-a", {"state": state, "role": "mixed"})


def stored_config(store) -> dict:
    return json.loads(store.redis.get("fd:{default}:config"))


def test_an_unfinished_request_keeps_the_topic_where_it_is(api, node, store, new_db,
                                                           django_capture_on_commit_callbacks):
    from fdconsole.topics.models import Topic

    request_id = submit(api)
    error = assert_error(api.patch(TOPIC, {"scheduler_db": NEW_DB, "scheduler_ttl": 5}), 409, "scheduler_db")
    assert error["code"] == "topic_busy"
    assert "1 unfinished request" in error["message"] and "finish" in error["message"]
    row = Topic.objects.get(name="default")
    assert (row.scheduler_db, row.scheduler_ttl) == (0, 900)  # nothing of the PATCH was saved
    assert stored_config(store)["scheduler_ttl"] == 900
    assert api.get(f"/api/v1/requests/{request_id}").json()["status"] == "queued"

    assert api.delete(f"/api/v1/requests/{request_id}").json()["status"] == "cancelled"
    with django_capture_on_commit_callbacks(execute=True):  # the old Redis forgets it once committed
        moved = api.patch(TOPIC, {"scheduler_db": NEW_DB})
    assert moved.status_code == 200, moved.content
    assert json.loads(new_db.get("fd:{default}:config"))["scheduler_db"] == NEW_DB
    assert not store.redis.exists("fd:{default}:config")  # the Redis it left forgets it
    assert b"default" not in store.redis.smembers("fd:topics")


@pytest.mark.parametrize("field, value", [("scheduler_host", "localhost"), ("scheduler_port", 6390),
                                          ("scheduler_db", NEW_DB), ("scheduler_password", "new-secret")])
def test_a_running_node_keeps_the_topic_where_it_is(api, node, store, field, value):
    beat(store, "idle")
    error = assert_error(api.patch(TOPIC, {field: value}), 409, field)
    assert "node-a" in error["message"] and "stop the topic's nodes" in error["message"]
    assert "new-secret" not in error["message"]
    assert api.get(TOPIC).json()[field] != value


def test_a_stopped_node_does_not_keep_the_topic(api, node, store, new_db):
    beat(store, "stopped")
    assert api.patch(TOPIC, {"scheduler_db": NEW_DB}).status_code == 200
    assert new_db.exists("fd:{default}:config")


def test_changes_that_keep_the_same_redis_are_allowed_while_busy(api, node, store):
    beat(store, "busy")
    submit(api)
    same_place = {"scheduler_ttl": 5, "scheduler_host": "127.0.0.1", "scheduler_port": 6379,
                  "scheduler_db": 0}
    assert api.patch(TOPIC, same_place).status_code == 200
    assert stored_config(store)["scheduler_ttl"] == 5


def test_the_admin_refuses_the_move_with_an_error_on_the_field(admin, api, node, store):
    from fdconsole.topics.models import Topic

    submit(api)
    answer = admin.post(f"/admin/topics/topic/{node.topic.pk}/change/",
                        topic_form(node.topic, scheduler_db=NEW_DB))
    assert answer.status_code == 200  # the form again, not a redirect
    errors = answer.context["adminform"].form.errors
    assert "unfinished request" in errors["scheduler_db"][0], errors
    assert Topic.objects.get(name="default").scheduler_db == 0


def test_another_name_for_the_same_redis_is_no_move(api, node, store, redis_url):
    """'localhost' for '127.0.0.1' is another URL but the same server: it must keep the configuration."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    assert api.patch(TOPIC, {"scheduler_port": port}).status_code == 200
    assert api.patch(TOPIC, {"scheduler_host": "localhost"}).status_code == 200
    assert stored_config(store)["scheduler_host"] == "localhost"
    assert b"default" in store.redis.smembers("fd:topics")


def test_pointing_a_topic_at_another_redis_needs_its_own_permission(api, node, store, new_db, client):
    from django.contrib.auth import get_user_model

    from fdconsole.api.models import ApiToken
    from tests.test_it_serves_the_console_pages import with_permissions

    viewer = get_user_model().objects.create_user("viewer")
    _, token = ApiToken.issue(viewer, "tests")
    other = Client(HTTP_AUTHORIZATION=f"Bearer {token}")

    def patch(body):
        return other.patch(TOPIC, data=json.dumps(body), content_type="application/json")

    answer = patch({"scheduler_db": NEW_DB})
    assert answer.status_code == 403 and answer.json()["error"]["field"] == "scheduler_db"
    assert "topics.change_topic_redis" in answer.json()["error"]["message"]
    answer = other.post("/api/v1/topics", data=json.dumps({"name": "far", "scheduler_port": 6390}),
                        content_type="application/json")
    assert answer.status_code == 403 and "topics.add_topic" in answer.json()["error"]["message"]
    answer = patch({"scheduler_ttl": 60})
    assert answer.status_code == 403 and "topics.change_topic" in answer.json()["error"]["message"]
    with_permissions(viewer, "topics.change_topic")
    assert patch({"scheduler_ttl": 60}).status_code == 200  # scheduler parameters are now theirs to set
    assert patch({"scheduler_db": NEW_DB}).status_code == 403  # where the Redis is, still not
    client.force_login(viewer)
    from fdconsole.topics.models import Topic
    from scheduler.config import PARAMETERS

    row = Topic.objects.get(name="default")
    page = client.get("/topics/default/config/").content.decode()
    assert '<code id="id_scheduler_db" class="readonly">' in page and 'name="scheduler_ttl"' in page
    form = {p.name: str(getattr(row, p.name)) for p in PARAMETERS} | {"scheduler_db": str(NEW_DB)}
    page = client.post("/topics/default/config/", form).content.decode()
    assert 'data-for="scheduler_db"' in page and "topics.change_topic_redis" in page
    assert api.patch(TOPIC, {"scheduler_db": NEW_DB}).status_code == 200  # alice holds the permission
