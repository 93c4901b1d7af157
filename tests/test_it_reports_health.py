"""/healthz says whether the database and Redis answer; with Redis gone the API answers 503 JSON and
leaves no half-written request behind."""

from __future__ import annotations

import socket
import time

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db

URL = "/api/v1/topics/default/requests"


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def redis_down(settings, store):
    """Point the console at a Redis that does not answer; the store cache is cleared both ways."""
    from fdconsole import redis_conn

    redis_conn._cache.clear()
    settings.FD_REDIS_URL = f"redis://127.0.0.1:{closed_port()}/0"
    yield
    redis_conn._cache.clear()


def test_healthz_is_ok_with_the_database_and_redis_up(store):
    answer = Client().get("/healthz")
    assert answer.status_code == 200, answer.content
    assert answer["Content-Type"].startswith("application/json")
    assert answer.json()["status"] == "ok"


def test_healthz_names_redis_when_it_is_down(topic, redis_down):
    started = time.monotonic()
    answer = Client().get("/healthz")
    assert time.monotonic() - started < 5
    assert answer.status_code == 503, answer.content
    assert answer["Content-Type"].startswith("application/json")
    body = answer.json()
    assert body["status"] != "ok"
    assert "redis" in body["failed"]
    assert "database" not in body["failed"]


def assert_redis_unavailable(answer) -> None:
    assert answer.status_code == 503, answer.content
    assert answer["Content-Type"].startswith("application/json")
    error = answer.json()["error"]
    assert error["code"] == "redis_unavailable" and "Redis" in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"prompt": "a"}, id="round-robin"),
        pytest.param({"prompt": "a", "node": "node-a"}, id="named-node"),
        pytest.param({"prompt": "a", "node": "node-a", "request_id": "mine"}, id="named-node-and-id"),
    ],
)
def test_a_request_with_redis_down_answers_503_and_leaves_no_row(api, node, redis_down, body):
    from fdconsole.inference.models import Request

    assert_redis_unavailable(api.post(URL, body))
    assert Request.objects.count() == 0


def test_the_request_id_is_free_again_once_redis_is_back(api, node, store, settings):
    from fdconsole import redis_conn
    from fdconsole.inference.models import Request

    good = settings.FD_REDIS_URL
    settings.FD_REDIS_URL = f"redis://127.0.0.1:{closed_port()}/0"
    assert_redis_unavailable(api.post(URL, {"prompt": "a", "node": "node-a", "request_id": "mine"}))
    settings.FD_REDIS_URL = good
    redis_conn._cache.clear()
    answer = api.post(URL, {"prompt": "a", "node": "node-a", "request_id": "mine"})
    assert answer.status_code == 202, answer.content
    assert Request.objects.count() == 1
    assert store.queue_length("default", "node-a") == 1


def test_a_topic_patch_with_redis_down_answers_503_and_changes_nothing(api, topic, redis_down):
    from fdconsole.topics.models import Topic

    assert_redis_unavailable(api.patch("/api/v1/topics/default", {"scheduler_ttl": 5}))
    assert Topic.objects.get(name="default").scheduler_ttl == 900


def test_a_topic_create_with_redis_down_answers_503_and_creates_nothing(api, topic, redis_down):
    from fdconsole.topics.models import Topic

    assert_redis_unavailable(api.post("/api/v1/topics", {"name": "fresh"}))
    assert list(Topic.objects.values_list("name", flat=True)) == ["default"]


@pytest.mark.parametrize("path", ["/api/v1/nodes", "/api/v1/nodes/node-a"])
def test_reads_that_need_redis_answer_503_json(api, node, redis_down, path):
    assert_redis_unavailable(api.get(path))
