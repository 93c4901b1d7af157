"""/rq/ (django-rq, staff only) lists every node's queue with its queued jobs."""

import pytest

pytestmark = pytest.mark.django_db


def test_staff_see_each_node_queue_and_its_jobs(client, api, node, store):
    from django.contrib.auth import get_user_model
    from django_rq.settings import get_queues_map

    api.post("/api/v1/topics/default/requests", {"prompt": "x", "request_id": "visible-in-rq"})
    client.force_login(get_user_model().objects.create_superuser("root", password="pw-root-1234"))
    overview = client.get("/rq/")
    assert overview.status_code == 200
    assert "fd:{default}:node:node-a" in overview.content.decode()
    index = get_queues_map()["fd:{default}:node:node-a"]
    from fdconsole.inference.models import Request

    jobs = client.get(f"/rq/queues/{index}/").content.decode()
    assert Request.objects.get(request_id="visible-in-rq").uid in jobs  # the rq job id is the request's uid
    assert "gpu_worker.jobs.run_request" in jobs


def test_others_are_kept_out(client, node):
    from django.contrib.auth import get_user_model

    client.force_login(get_user_model().objects.create_user("ops"))
    assert client.get("/rq/").status_code in (302, 403)


@pytest.fixture
def staff_client(client):
    from django.contrib.auth import get_user_model

    client.force_login(get_user_model().objects.create_superuser("root", password="pw-root-1234"))
    return client


def queue_index(staff_client, name: str) -> int:
    """django-rq's index of queue ``name``, as the /rq/ pages number them (listed afresh per page)."""
    from django_rq.settings import get_queues_map

    assert staff_client.get("/rq/").status_code == 200
    return get_queues_map()[name]


def queued_on_node_a(api, store, request_id: str):
    from fdconsole.inference.models import Request
    from scheduler import keys
    from scheduler.telemetry import Telemetry

    api.post("/api/v1/topics/default/requests", {"prompt": "x", "request_id": request_id, "node": "node-a"})
    uid = Request.objects.get(request_id=request_id).uid
    queue = keys.rq_queue(keys.node_queue_name("default", "node-a"))
    return uid, lambda: (store.redis.lrange(queue, 0, -1), store.load_scores("default", ["node-a"]),
                         Telemetry(store.redis).waiting_count("default"), store.state("default", uid).status)


@pytest.mark.parametrize("action", ["delete", "requeue", "enqueue", "stop"])
def test_job_writes_on_a_node_queue_are_refused_and_change_nothing(staff_client, api, node, store, action):
    uid, snapshot = queued_on_node_a(api, store, "stays-queued")
    before = snapshot()
    index = queue_index(staff_client, "fd:{default}:node:node-a")
    for method in (staff_client.get, staff_client.post):  # the confirmation page, then the action
        page = method(f"/rq/queues/{index}/{uid}/{action}/")
        assert page.status_code == 409
        body = page.content.decode()
        assert "Node queues are the scheduler's" in body and "/requests/stays-queued/" in body
    assert snapshot() == before and before[0] == [uid.encode()] and before[3] == "queued"


@pytest.mark.parametrize("path", ["empty/", "requeue-all/"])
def test_queue_writes_on_a_node_queue_are_refused_and_change_nothing(staff_client, api, node, store, path):
    _, snapshot = queued_on_node_a(api, store, "also-stays")
    before = snapshot()
    index = queue_index(staff_client, "fd:{default}:node:node-a")
    assert staff_client.post(f"/rq/queues/{index}/{path}").status_code == 409
    for bulk in ("confirm-action", "actions"):
        page = staff_client.post(f"/rq/queues/{bulk}/{index}/", {"action": "delete", "job_ids": ["x"]})
        assert page.status_code == 409
    assert snapshot() == before


def test_the_consoles_own_queue_keeps_rqs_actions(staff_client, node, store):
    index = queue_index(staff_client, "default")
    assert staff_client.post(f"/rq/queues/{index}/empty/").status_code == 302  # emptied, back to the list
