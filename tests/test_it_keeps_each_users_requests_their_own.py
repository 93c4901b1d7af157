"""A request belongs to whoever submitted it: other users are told it does not exist (404, as for an id
nobody used) over the API, its stream, the OpenAI API and the pages; the permissions to view or cancel
every request (and superusers) see and cancel all. The cluster pages show everyone the load, and
prompts only to those who may see them. Operators' limits hold in every scheduler mode: a cap on the
waiting requests of a topic, and the Redis hosts a topic may be pointed at."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from fdconsole.api.models import ApiToken
from tests.test_it_serves_the_console_pages import with_permissions

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def people(db, store):
    """bob (no permission), vera (may view all), carl (may view and cancel all), root (superuser): each
    with an API client and a logged-in browser."""
    from django.contrib.auth import get_user_model

    users = get_user_model().objects
    made = {name: users.create_user(name) for name in ("bob", "vera", "carl")}
    made["root"] = users.create_superuser("root", "r@example.com", "pw-r")
    with_permissions(made["vera"], "inference.view_all_requests")
    with_permissions(made["carl"], "inference.view_all_requests", "inference.cancel_all_requests")
    out = {}
    for name, user in made.items():
        browser = Client()
        browser.force_login(user)
        out[name] = (Client(HTTP_AUTHORIZATION=f"Bearer {ApiToken.issue(user, 't')[1]}"), browser)
    return out


def submitted(api, request_id: str, prompt: str = "a secret prompt") -> None:
    answer = api.post("/api/v1/topics/default/requests", {"prompt": prompt, "max_tokens": 4,
                                                          "request_id": request_id})
    assert answer.status_code == 202, answer.content


def test_another_users_request_does_not_exist_for_them(api, node, people):
    submitted(api, "alices")
    bob, bob_browser = people["bob"]
    unknown = bob.get("/api/v1/requests/never-made")
    for answer in (bob.get("/api/v1/requests/alices"), bob.delete("/api/v1/requests/alices"),
                   bob.get("/api/v1/requests/alices/stream")):
        assert answer.status_code == 404, answer.content
        assert answer.json()["error"]["code"] == unknown.json()["error"]["code"] == "not_found"
    assert api.get("/api/v1/requests/alices").json()["status"] == "queued"  # not cancelled by bob
    reattach = bob.post("/v1/completions", data=json.dumps({"model": "default", "prompt": "a secret prompt",
                                                            "max_tokens": 4, "temperature": 0,
                                                            "request_id": "alices"}),
                        content_type="application/json")
    assert reattach.status_code == 409 and "secret" not in reattach.content.decode()

    for path in ("/requests/alices/", "/requests/alices/stream"):
        assert bob_browser.get(path).status_code == 404, path
    assert bob_browser.post("/requests/alices/cancel").status_code == 404
    listed = bob_browser.get("/requests/").content.decode()
    assert "alices" not in listed
    home = bob_browser.get("/").content.decode()
    assert "alices" not in home and 'id="nodes"' in home  # the load, not the requests


def test_their_own_requests_are_theirs_to_read_stream_and_cancel(node, people):
    bob, bob_browser = people["bob"]
    submitted(ApiClientLike(bob), "bobs")
    assert bob.get("/api/v1/requests/bobs").json()["request_id"] == "bobs"
    assert "bobs" in bob_browser.get("/requests/").content.decode()
    assert bob_browser.get("/requests/bobs/").status_code == 200
    assert bob.delete("/api/v1/requests/bobs").status_code in (200, 202)


def test_the_permissions_to_view_and_cancel_all(api, node, people):
    submitted(api, "alices")
    vera, vera_browser = people["vera"]
    assert vera.get("/api/v1/requests/alices").status_code == 200
    assert "alices" in vera_browser.get("/requests/").content.decode()
    assert "secret prompt" in vera_browser.get("/requests/alices/").content.decode()
    refused = vera.delete("/api/v1/requests/alices")
    assert refused.status_code == 403
    assert "inference.cancel_all_requests" in refused.json()["error"]["message"]
    assert vera_browser.post("/requests/alices/cancel").status_code == 403
    carl, _ = people["carl"]
    assert carl.delete("/api/v1/requests/alices").status_code in (200, 202)
    submitted(api, "alices-2")
    root, root_browser = people["root"]
    assert root.get("/api/v1/requests/alices-2").status_code == 200
    assert root_browser.post("/requests/alices-2/cancel").status_code == 302


class ApiClientLike:
    """A Django test client with the ``api`` fixture's ``post(path, body)``."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def post(self, path: str, body: dict):
        return self.client.post(path, data=json.dumps(body), content_type="application/json")


# -- operators' limits --------------------------------------------------------------------------------
def test_a_cap_on_waiting_requests_holds_for_a_global_topic(api, global_topic, settings):
    from fdconsole.topics.services import ensure_node

    ensure_node("node-a", global_topic)
    settings.FD_MAX_WAITING_PER_TOPIC = 2
    submitted(api, "w1")
    submitted(api, "w2")
    refused = api.post("/api/v1/topics/default/requests", {"prompt": "x", "max_tokens": 4})
    assert refused.status_code == 429 and refused["Retry-After"] == "1"
    error = refused.json()["error"]
    assert error["code"] == "queue_full" and "FD_MAX_WAITING_PER_TOPIC=2" in error["message"]


def test_a_topic_redis_must_be_on_a_host_the_operator_allows(api, node, settings):
    refused = api.patch("/api/v1/topics/default", {"scheduler_host": "10.1.2.3"})
    assert refused.status_code == 400 and refused.json()["error"]["field"] == "scheduler_host"
    assert "FD_TOPIC_REDIS_HOSTS allows 127.0.0.1" in refused.json()["error"]["message"]
    made = api.post("/api/v1/topics", {"name": "far", "scheduler_host": "redis.example.com"})
    assert made.status_code == 400 and made.json()["error"]["field"] == "scheduler_host"
    settings.FD_TOPIC_REDIS_HOSTS = ["127.0.0.1", "localhost"]
    assert api.patch("/api/v1/topics/default", {"scheduler_host": "localhost"}).status_code == 200


def test_the_rq_pages_need_the_permission_to_view_all_requests(api, node, people):
    from django.contrib.auth import get_user_model

    from tests.test_it_serves_the_console_pages import with_permissions

    staff = get_user_model().objects.create_user("stan", is_staff=True)
    browser = Client()
    browser.force_login(staff)
    refused = browser.get("/rq/")
    assert refused.status_code == 403 and "inference.view_all_requests" in refused.content.decode()
    with_permissions(staff, "inference.view_all_requests")
    assert browser.get("/rq/").status_code == 200
    from django_rq.settings import get_queues_list

    submitted(api, "queued-1")
    browser.get("/rq/")  # the node queues are listed from the Node table
    index = next(i for i, q in enumerate(get_queues_list()) if q["name"] != "default")
    cleared = browser.post(f"/rq/queues/{index}/failed/clear/")  # a write on a node queue
    assert cleared.status_code == 409


def test_the_admin_shows_a_topic_password_masked_to_who_may_only_view_it(api, node, db):
    from django.contrib.auth import get_user_model

    from fdconsole.topics.models import Topic
    from tests.test_it_serves_the_console_pages import with_permissions

    Topic.objects.filter(name="default").update(scheduler_password="TOPSECRETPW")
    viewer = with_permissions(get_user_model().objects.create_user("vic", is_staff=True), "topics.view_topic")
    browser = Client()
    browser.force_login(viewer)
    pk = Topic.objects.get(name="default").pk
    page = browser.get(f"/admin/topics/topic/{pk}/change/").content.decode()
    assert "Scheduler password" in page and "TOPSECRETPW" not in page
