"""Edge cases a running cluster meets: an engine that fails mid-generation, a Redis that lost the
topic's configuration, names that can never exist, and ids that would collide with the stream URL."""

import pytest

pytestmark = pytest.mark.django_db(transaction=True)


class FailingEngine:
    """The real batching engine for the first steps, then an error (a CUDA fault, say)."""

    def __init__(self, batch_engine, after: int) -> None:
        self.batch_engine, self.after, self.steps = batch_engine, after, 0

    def __getattr__(self, name: str):
        return getattr(self.batch_engine, name)

    def step(self):
        if self.steps == self.after:
            raise RuntimeError("device fell over")
        self.steps += 1
        return self.batch_engine.step()


def test_a_failed_request_keeps_the_tokens_it_streamed(api, node, store, batch_engine):
    from fdconsole.cluster.hooks import database_hooks
    from gpu_worker.node import NodeWorker
    from gpu_worker.runtime import NodeRuntime

    answer = api.post("/api/v1/topics/default/requests", {"prompt": "x", "max_tokens": 20})
    request_id = answer.json()["request_id"]
    runtime = NodeRuntime(topic="default", name="node-a", role="mixed", store=store,
                          engine=FailingEngine(batch_engine, after=4), hooks=database_hooks())
    NodeWorker(runtime).work(burst=True, logging_level="CRITICAL")
    body = api.get(f"/api/v1/requests/{request_id}").json()
    assert body["status"] == "failed"
    assert body["error"]["code"] == "engine_error" and "device fell over" in body["error"]["message"]
    assert len(body["output_token_ids"]) == 4


def test_a_topic_config_lost_by_redis_is_published_again_on_submit(api, node, store):
    from scheduler import keys

    api.patch("/api/v1/topics/default", {"scheduler_ttl": 7})
    store.redis.delete(keys.config("default"), keys.scheduling_config("default"))  # Redis restarted
    assert api.post("/api/v1/topics/default/requests", {"prompt": "x"}).status_code == 202
    assert store.config_of("default").scheduler_ttl == 7


@pytest.mark.parametrize("path", ["/api/v1/requests/a%00b", "/api/v1/topics/a%00b", "/api/v1/nodes/a%00b",
                                  "/api/v1/topics/a%00b/requests"])
def test_names_that_cannot_exist_are_404_not_an_error(api, node, path):
    answer = api.get(path) if not path.endswith("requests") else api.post(path, {"prompt": "x"})
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"


def test_a_nul_in_a_node_name_or_password_is_refused(api, node):
    answer = api.post("/api/v1/topics/default/requests", {"prompt": "x", "node": "a\u0000"})
    assert answer.status_code == 400 and answer.json()["error"]["field"] == "node"
    answer = api.patch("/api/v1/topics/default", {"scheduler_password": "p\u0000"})
    assert answer.status_code == 400 and answer.json()["error"]["field"] == "scheduler_password"


def test_an_id_ending_in_stream_is_refused(api, node):
    answer = api.post("/api/v1/topics/default/requests", {"prompt": "x", "request_id": "a/stream"})
    assert answer.status_code == 400 and answer.json()["error"]["field"] == "request_id"


def test_a_published_config_with_a_parameter_this_version_does_not_know_still_reads(api, node, store):
    """A newer version (or anyone who can write to the topic's Redis) may publish more: the node list and
    the live pages keep working on what this version knows."""
    import json

    from scheduler import keys

    api.patch("/api/v1/topics/default", {"scheduler_name": "splitwise", "scheduler_sync_period": 2})
    published = json.loads(store.redis.get(keys.config("default")))
    store.redis.set(keys.config("default"), json.dumps({**published, "scheduler_from_the_future": 1}))
    assert store.config_of("default").scheduler_sync_period == 2
    assert api.get("/api/v1/nodes").status_code == 200
    store.redis.set(keys.config("default"), "not json")
    assert store.config_of("default") is None and api.get("/api/v1/nodes/node-a").status_code == 200
