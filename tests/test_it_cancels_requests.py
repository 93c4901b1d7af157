"""DELETE /api/v1/requests/{id}: a waiting request is cancelled at once, a running one stops at its
next token with what it produced so far, a finished one is left as it is."""

import threading
import time

import pytest

pytestmark = pytest.mark.django_db(transaction=True)


def submit(api, **extra):
    answer = api.post("/api/v1/topics/default/requests", {"prompt": "hi", "max_tokens": 4, **extra})
    assert answer.status_code == 202, answer.content
    return answer.json()["request_id"]


def test_cancelling_a_waiting_request_removes_it_from_the_queue(api, node, store, run_node):
    request_id = submit(api)
    answer = api.delete(f"/api/v1/requests/{request_id}")
    assert answer.status_code == 200
    assert answer.json()["status"] == "cancelled"
    assert store.queue_length("default", "node-a") == 0
    run_node()
    assert api.get(f"/api/v1/requests/{request_id}").json()["status"] == "cancelled"
    assert api.get("/api/v1/nodes/node-a").json()["requests_run"] == 0


def test_cancelling_a_running_request_keeps_its_partial_output(api, node, store, run_node):
    from fdconsole.inference.models import Request

    request_id = submit(api, max_tokens=1000)
    uid = Request.objects.get(request_id=request_id).uid
    answers = []

    def cancel_when_running():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = store.state("default", uid)
            if state is not None and state.num_output_tokens >= 5:
                answers.append(api.delete(f"/api/v1/requests/{request_id}"))
                return
            time.sleep(0.005)

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    run_node()
    canceller.join(timeout=35)
    body = api.get(f"/api/v1/requests/{request_id}").json()
    assert answers, "the request never started"
    assert body["status"] == "cancelled"
    assert 5 <= len(body["output_token_ids"]) < 1000
    assert body["finished_at"]


def test_cancelling_a_finished_request_changes_nothing(api, node, run_node):
    request_id = submit(api)
    run_node()
    answer = api.delete(f"/api/v1/requests/{request_id}")
    assert answer.status_code == 200
    assert answer.json()["status"] == "finished"


def test_cancelling_an_unknown_request_is_404(api, node):
    answer = api.delete("/api/v1/requests/nope")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"
