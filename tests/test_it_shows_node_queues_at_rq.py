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
