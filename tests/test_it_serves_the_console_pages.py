"""The console's pages through Django's test client: the configuration form validates like the API and
publishes what it saves, the request explorer filters and pages, the submit form queues through the
same service as the API (with the same errors), and a request's page streams, shows timings and cancels."""

import pytest
from asgiref.sync import async_to_sync

from scheduler.config import PARAMETERS, PASSWORD_MASK

pytestmark = pytest.mark.django_db(transaction=True)


OPERATOR = ["topics.change_topic", "topics.change_topic_redis", "inference.view_all_requests",
            "inference.cancel_all_requests"]


def with_permissions(user, *names: str):
    from django.contrib.auth.models import Permission

    for name in names:
        app, codename = name.split(".")
        user.user_permissions.add(Permission.objects.get(content_type__app_label=app, codename=codename))
    return user


@pytest.fixture
def ops(client, db):
    """An operator's browser: may change topics, see and cancel everyone's requests."""
    from django.contrib.auth import get_user_model

    client.force_login(with_permissions(get_user_model().objects.create_user("ops"), *OPERATOR))
    return client


@pytest.mark.parametrize("path", ["/topics/default/", "/topics/default/config/", "/requests/",
                                  "/requests/new/", "/requests/abc/"])
def test_every_page_needs_a_login(client, topic, path):
    answer = client.get(path)
    assert answer.status_code == 302 and answer["Location"] == f"/login/?next={path}"


def test_unknown_topics_and_requests_are_404_pages(ops, topic):
    for path in ("/topics/nope/", "/topics/nope/config/", "/requests/nope/", "/topics/a%00b/"):
        answer = ops.get(path)
        assert answer.status_code == 404 and b"<html" in answer.content


def test_the_topic_page_lists_its_nodes_or_says_how_to_start_one(ops, topic, store):
    page = ops.get("/topics/default/").content.decode()
    assert 'id="nodes-empty"' in page and "fdnode --topic default" in page
    assert 'data-url="/ws/topics/default/"' in page
    for chart in ("chart-rps", "chart-tps", "chart-queue", "chart-load"):
        assert f'id="{chart}"' in page
    from fdconsole.topics.services import ensure_node

    ensure_node("node-a", topic)
    store.write_heartbeat("default", "node-a", {"state": "busy", "role": "mixed", "running": "u1,u2"})
    page = ops.get("/topics/default/").content.decode()
    assert 'data-node="node-a"' in page and "state-busy" in page and ">2</a>" in page


def test_the_config_form_shows_every_parameter_with_help_and_unit(ops, topic):
    page = ops.get("/topics/default/config/").content.decode()
    for param in PARAMETERS:
        assert f'name="{param.name}"' in page and param.help.split(".")[0].replace("'", "&#x27;") in page
    assert '<span class="unit">seconds</span>' in page
    assert 'class="param inapplicable' in page  # global-only parameters on a local topic


def test_an_invalid_value_is_refused_inline_and_nothing_is_saved(ops, topic, store):
    answer = ops.post("/topics/default/config/", form(topic, scheduler_ttl="-5"))
    page = answer.content.decode()
    assert answer.status_code == 400
    assert 'class="field-error" data-for="scheduler_ttl"' in page and "scheduler_ttl must be" in page
    topic.refresh_from_db()
    assert topic.scheduler_ttl == 900 and store.config_of("default").scheduler_ttl == 900


def test_a_valid_value_is_saved_published_and_announced(ops, topic, store):
    answer = ops.post("/topics/default/config/", form(topic, scheduler_ttl="60", scheduler_name="global"),
                      follow=True)
    page = answer.content.decode()
    assert answer.status_code == 200 and "flash success" in page and "applied to the running nodes" in page
    topic.refresh_from_db()
    assert (topic.scheduler_ttl, topic.scheduler_name) == (60, "global")
    published = store.config_of("default")
    assert (published.scheduler_ttl, published.scheduler_name) == (60, "global")


def test_a_typed_password_is_not_sent_back_with_errors(ops, topic):
    page = ops.post("/topics/default/config/", form(topic, scheduler_ttl="-5",
                                                    scheduler_password="typed-s3cret")).content.decode()
    assert "typed-s3cret" not in page and PASSWORD_MASK in page


def test_the_masked_password_is_kept_unless_changed(ops, topic):
    from fdconsole.dashboard.views import _changed_fields
    topic.scheduler_password = "s3cret"  # the database's copy only: no Redis here takes that password
    topic.save()
    page = ops.get("/topics/default/config/").content.decode()
    assert "s3cret" not in page and PASSWORD_MASK in page
    assert _changed_fields(topic, form(topic, scheduler_ttl="61")) == {"scheduler_ttl": "61"}
    assert _changed_fields(topic, form(topic, scheduler_password="")) == {"scheduler_password": ""}


def form(topic, **changes) -> dict:
    values = {p.name: str(getattr(topic, p.name)) for p in PARAMETERS}
    values = {k: (v[:-2] if v.endswith(".0") else v) for k, v in values.items()}
    values["scheduler_password"] = PASSWORD_MASK if topic.scheduler_password else ""
    return {**values, **changes}


def test_the_submit_form_queues_a_request_that_runs_and_streams(ops, topic, node, run_node):
    answer = ops.post("/requests/new/", {"topic": "default", "prompt": "Héllo", "max_tokens": "8",
                                         "temperature": "0", "top_p": "1", "top_k": "0", "seed": "",
                                         "node": ""})
    assert answer.status_code == 302 and answer["Location"].startswith("/requests/req-")
    run_node()
    page = ops.get(answer["Location"]).content.decode()
    assert "status-finished" in page and '<span id="token-count">8</span>' in page
    assert "Héllo" in page and 'data-field="first_token_ms"' in page
    stream = async_to_sync(collect)(ops.get(answer["Location"] + "stream").streaming_content).decode()
    assert stream.count("event: token") == 8 and "event: done" in stream


async def collect(chunks) -> bytes:
    return b"".join([chunk async for chunk in chunks])


@pytest.mark.parametrize("field, value, message", [
    ("max_tokens", "-3", "max_tokens must be"),
    ("max_tokens", "many", "max_tokens must be a number"),
    ("temperature", "hot", "temperature must be a number"),
    ("prompt", "", "prompt"),
    ("node", "ghost", "no node 'ghost'"),
    ("topic", "nope", "no topic 'nope'"),
])
def test_the_submit_form_names_what_is_wrong(ops, topic, node, field, value, message):
    from fdconsole.inference.models import Request

    body = {"topic": "default", "prompt": "Hi", "max_tokens": "8", "temperature": "0", "top_p": "1",
            "top_k": "0", "seed": "", "node": "", field: value}
    answer = ops.post("/requests/new/", body)
    page = answer.content.decode()
    assert answer.status_code == 400 and message in page.replace("&#x27;", "'")
    assert Request.objects.count() == 0


def test_the_explorer_filters_by_topic_status_and_node_and_pages(ops, topic, node, api, run_node):
    for i in range(3):
        api.post("/api/v1/topics/default/requests", {"prompt": "x", "max_tokens": 2, "request_id": f"r{i}"})
    run_node()
    api.post("/api/v1/topics/default/requests", {"prompt": "x", "max_tokens": 2, "request_id": "waiting#1"})
    everything = ops.get("/requests/").content.decode()
    assert all(f'data-request="r{i}"' in everything for i in range(3)) and "waiting#1" in everything
    queued = ops.get("/requests/?status=queued").content.decode()
    assert 'data-request="waiting#1"' in queued and 'data-request="r0"' not in queued
    assert "/requests/waiting%231/" in queued  # ids are quoted in links
    assert 'data-request="r1"' in ops.get("/requests/?node=node-a&topic=default").content.decode()
    assert "No request matches" in ops.get("/requests/?node=node-z").content.decode()
    from fdconsole.dashboard import views

    views.PAGE_SIZE, size = 2, views.PAGE_SIZE
    try:
        second = ops.get("/requests/?topic=default&page=2").content.decode()
    finally:
        views.PAGE_SIZE = size
    assert "page 2 of 2" in second and "topic=default&amp;page=1" in second


def test_cancel_from_the_request_page(ops, topic, node, api):
    api.post("/api/v1/topics/default/requests", {"prompt": "x", "max_tokens": 2, "request_id": "stop/me"})
    api.post("/api/v1/topics/default/requests", {"prompt": "x", "max_tokens": 2, "request_id": "a/cancel"})
    assert b"a/cancel" in ops.get("/requests/a/cancel/").content  # an id ending in /cancel has its page
    answer = ops.post("/requests/stop/me/cancel", follow=True)
    page = answer.content.decode()
    assert "status-cancelled" in page and "is cancelled" in page
    assert ops.get("/requests/stop/me/cancel").status_code == 405
