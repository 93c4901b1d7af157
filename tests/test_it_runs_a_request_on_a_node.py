"""A submitted request runs on its node and its result is persisted, over the real Redis."""

import pytest

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_request_finishes_with_the_greedy_tokens_of_the_model(api, node, run_node, engine):
    from scheduler.messages import SamplingParams

    answer = api.post("/api/v1/topics/default/requests", {"prompt": "Hello, world", "max_tokens": 12})
    assert answer.status_code == 202, answer.content
    body = answer.json()
    assert body["status"] == "queued" and body["home_node"] == "node-a" and body["prompt_tokens"] == 12

    run_node()

    done = api.get(f"/api/v1/requests/{body['request_id']}").json()
    assert done["status"] == "finished"
    assert done["executed_by"] == "node-a" and done["stolen"] is False
    assert done["finish_reason"] in ("length", "stop")
    expected = [s.token_id for s in engine.generate(list(b"Hello, world"), SamplingParams(max_tokens=12))
                if s.token_id >= 0]
    assert done["output_token_ids"] == expected
    assert done["started_at"] and done["first_token_at"] and done["finished_at"]
    assert done["created_at"] <= done["started_at"] <= done["first_token_at"] <= done["finished_at"]


def test_node_counts_the_requests_it_ran(api, node, run_node):
    for _ in range(3):
        answer = api.post("/api/v1/topics/default/requests", {"prompt": "x", "max_tokens": 2})
        assert answer.status_code == 202
    run_node()
    described = api.get("/api/v1/nodes/node-a").json()
    assert described["requests_run"] == 3
    assert described["load_score"] == 0


def test_round_robin_spreads_requests_over_enabled_nodes(api, topic, store):
    from fdconsole.nodes.models import Node
    from fdconsole.topics.services import ensure_node

    for name in ("n1", "n2", "n3"):
        ensure_node(name, topic)
    Node.objects.filter(name="n3").update(admin_state="draining")
    homes = [api.post("/api/v1/topics/default/requests", {"prompt": "x", "max_tokens": 1}).json()["home_node"]
             for _ in range(4)]
    assert sorted(homes) == ["n1", "n1", "n2", "n2"]
    assert store.queue_length("default", "n3") == 0


def test_a_named_node_gets_the_request(api, topic):
    from fdconsole.topics.services import ensure_node

    ensure_node("n1", topic)
    ensure_node("n2", topic)
    homes = {api.post("/api/v1/topics/default/requests",
                      {"prompt": "x", "max_tokens": 1, "node": "n2"}).json()["home_node"] for _ in range(3)}
    assert homes == {"n2"}


def test_seeded_sampling_is_reproducible_through_the_api(api, node, run_node):
    ids = []
    for i in range(2):
        body = {"prompt": "abc", "max_tokens": 10, "temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 7,
                "request_id": f"seeded-{i}"}
        assert api.post("/api/v1/topics/default/requests", body).status_code == 202
    run_node()
    for i in range(2):
        ids.append(api.get(f"/api/v1/requests/seeded-{i}").json()["output_token_ids"])
    assert len(ids[0]) >= 1 and ids[0] == ids[1]
