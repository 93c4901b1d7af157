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
