"""A topic whose Redis does not answer gets 503 JSON naming the topic and its host:port (never its
password), and nothing half-done: no topic saved, no request recorded."""

from __future__ import annotations

import json

import pytest

from tests.api_errors import assert_error
from tests.test_it_reports_health import closed_port
from tests.test_it_streams_tokens_over_sse import collect

pytestmark = pytest.mark.django_db
PASSWORD = "hunter2-never-shown"


def assert_names_the_topic(answer, topic: str, port: int) -> None:
    error = assert_error(answer, 503)
    assert error["code"] == "redis_unavailable"
    assert f"topic '{topic}'" in error["message"] and f"127.0.0.1:{port}" in error["message"]
    assert PASSWORD not in answer.content.decode()


def test_moving_a_topic_to_a_redis_that_does_not_answer_changes_nothing(api, topic, store):
    from fdconsole.topics.models import Topic

    port = closed_port()
    answer = api.patch("/api/v1/topics/default", {"scheduler_port": port, "scheduler_password": PASSWORD})
    assert_names_the_topic(answer, "default", port)
    row = Topic.objects.get(name="default")
    assert (row.scheduler_port, row.scheduler_password) == (6379, "")


def test_creating_a_topic_on_a_redis_that_does_not_answer_creates_nothing(api, topic):
    from fdconsole.topics.models import Topic

    port = closed_port()
    body = {"name": "far", "scheduler_port": port, "scheduler_password": PASSWORD}
    answer = api.post("/api/v1/topics", body)
    assert_names_the_topic(answer, "far", port)
    assert not Topic.objects.filter(name="far").exists()


@pytest.fixture
def gone(api, node, store):
    """A request queued on topic ``default``, whose Redis then goes away (its port now points nowhere)."""
    from fdconsole.topics.models import Topic

    answer = api.post("/api/v1/topics/default/requests", {"prompt": "x", "max_tokens": 2, "request_id": "r1"})
    assert answer.status_code == 202, answer.content
    port = closed_port()
    Topic.objects.filter(name="default").update(scheduler_port=port, scheduler_password=PASSWORD)
    return port


def test_submitting_names_the_topic_and_records_nothing(api, gone):
    from fdconsole.inference.models import Request

    answer = api.post("/api/v1/topics/default/requests", {"prompt": "x", "request_id": "r2"})
    assert_names_the_topic(answer, "default", gone)
    assert list(Request.objects.values_list("request_id", flat=True)) == ["r1"]


@pytest.mark.parametrize("method, path", [("get", "/api/v1/requests/r1"), ("delete", "/api/v1/requests/r1"),
                                          ("get", "/api/v1/nodes"), ("get", "/api/v1/nodes/node-a")])
def test_reads_and_cancels_name_the_topic(api, gone, method, path):
    assert_names_the_topic(getattr(api, method)(path), "default", gone)


@pytest.mark.django_db(transaction=True)
def test_the_stream_ends_with_an_error_event_naming_the_topic(api, gone):
    from asgiref.sync import async_to_sync

    response = api.get("/api/v1/requests/r1/stream")
    assert response.status_code == 200
    raw = async_to_sync(collect)(response.streaming_content).decode()
    assert PASSWORD not in raw
    name, data = raw.strip().split("\n")[:2]
    assert name == "event: error"
    error = json.loads(data.removeprefix("data: "))
    assert error["code"] == "redis_unavailable"
    assert "topic 'default'" in error["message"] and f"127.0.0.1:{gone}" in error["message"]


def test_the_config_page_and_the_admin_save_nothing_either(topic, store, settings):
    """One rule for every way a topic changes (fdconsole.topics.services): Redis refuses, nothing saved."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    from fdconsole.topics.models import Topic
    from scheduler.config import PARAMETERS

    operator = get_user_model().objects.create_superuser("root", password="pw-root-123")
    client = Client()
    client.force_login(operator)
    port = closed_port()
    form = {p.name: getattr(topic, p.name) for p in PARAMETERS}

    page = client.post("/topics/default/config/", {**form, "scheduler_port": str(port)})
    assert page.status_code == 400 and "Nothing was saved" in page.content.decode()
    admin = client.post(f"/admin/topics/topic/{topic.pk}/change/",
                        {**form, "name": "default", "scheduler_port": port, "scheduler_password": PASSWORD},
                        follow=True)
    said = " ".join(str(m) for m in admin.context["messages"])
    assert "Nothing was saved" in said and f"127.0.0.1:{port}" in said and PASSWORD not in said
    added = client.post("/admin/topics/topic/add/", {**form, "name": "far", "scheduler_topic": "far",
                                                     "scheduler_port": port}, follow=True)
    assert "Nothing was saved" in " ".join(str(m) for m in added.context["messages"])

    row = Topic.objects.get(name="default")
    assert (row.scheduler_port, row.scheduler_password) == (6379, "")
    assert not Topic.objects.filter(name="far").exists()
    assert json.loads(store.redis.get("fd:{default}:config"))["scheduler_port"] == 6379
