"""``GET /metrics``: the whole cluster in Prometheus's text format, behind a bearer token, read from each
topic's Redis when scraped. Counters move as requests finish, are stolen, fail over, expire and are
refused; latency histograms are cumulative and count what they should; what a node process measured
(inter-token latency, tokens) shows although the console never ran the request."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from fdconsole.topics.services import create_topic, ensure_node

pytestmark = pytest.mark.django_db(transaction=True)
LABELS = {"topic", "node", "role", "status", "reason"}
HISTOGRAMS = ("fdconsole_time_to_first_token_seconds", "fdconsole_inter_token_latency_seconds",
              "fdconsole_e2e_request_latency_seconds", "fdconsole_request_queue_time_seconds",
              "fdconsole_kv_handoff_seconds")


def scrape(api) -> list[Sample]:
    """Every sample of one scrape, after checking the names and labels of every family."""
    answer = api.get("/metrics")
    assert answer.status_code == 200, answer.content
    assert answer["Content-Type"].startswith("text/plain")
    families = list(text_string_to_metric_families(answer.content.decode()))
    assert families
    for family in families:
        assert family.name.startswith("fdconsole_"), family.name
        for sample in family.samples:
            allowed = LABELS | ({"le"} if family.type == "histogram" else set())
            assert set(sample.labels) <= allowed, (sample.name, sample.labels)
    return [sample for family in families for sample in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def histogram(samples: list[Sample], name: str, topic: str = "default") -> tuple[list[float], float, float]:
    """(cumulative bucket counts by ``le``, count, sum), after checking the buckets are cumulative."""
    buckets = sorted((float(s.labels["le"]), s.value) for s in samples
                     if s.name == f"{name}_bucket" and s.labels["topic"] == topic)
    counts = [count for _, count in buckets]
    assert buckets[-1][0] == float("inf") and counts == sorted(counts), buckets  # monotone, +Inf last
    count, total = value(samples, f"{name}_count", topic=topic), value(samples, f"{name}_sum", topic=topic)
    assert counts[-1] == count
    return counts, count, total


def submit(api, topic: str = "default", **extra):
    return api.post(f"/api/v1/topics/{topic}/requests", {"prompt": "Hello there", "max_tokens": 6, **extra})


def final_bodies(api, request_ids: list[str]) -> list[dict]:
    return [api.get(f"/api/v1/requests/{rid}").json() for rid in request_ids]


def test_it_needs_a_bearer_token(api, node):
    from django.test import Client

    assert Client().get("/metrics").status_code == 401
    refused = Client(HTTP_AUTHORIZATION="Bearer fd_not-a-token").get("/metrics")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    assert refused["WWW-Authenticate"] == "Bearer"
    samples = scrape(api)
    assert value(samples, "fdconsole_redis_up", topic="default") == 1
    assert api.post("/metrics", {}).status_code == 405


def test_it_speaks_openmetrics_when_asked(api, api_token, node):
    from django.test import Client
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics

    answer = Client(HTTP_AUTHORIZATION=f"Bearer {api_token}",
                    HTTP_ACCEPT="application/openmetrics-text; version=1.0.0").get("/metrics")
    assert answer.status_code == 200 and answer["Content-Type"].startswith("application/openmetrics-text")
    families = {family.name: family for family in openmetrics(answer.content.decode())}
    assert families["fdconsole_requests"].type == "counter"
    assert families["fdconsole_time_to_first_token_seconds"].type == "histogram"


def test_counters_and_histograms_follow_finished_requests(api, node, run_node):
    request_ids = [submit(api, max_tokens=4 + i).json()["request_id"] for i in range(3)]
    before = scrape(api)
    assert value(before, "fdconsole_queue_depth", topic="default", node="node-a", role="mixed") == 3
    assert value(before, "fdconsole_load_score", topic="default", node="node-a", role="mixed") == 3
    assert value(before, "fdconsole_requests_submitted_total", topic="default") == 3
    run_node()
    bodies = final_bodies(api, request_ids)
    assert {b["status"] for b in bodies} == {"finished"}
    tokens = [len(b["output_token_ids"]) for b in bodies]
    samples = scrape(api)
    assert value(samples, "fdconsole_requests_total", topic="default", status="finished") == 3
    assert value(samples, "fdconsole_requests_total", topic="default", status="failed") == 0
    assert value(samples, "fdconsole_generated_tokens_total", topic="default") == sum(tokens)
    assert value(samples, "fdconsole_prompt_tokens_total", topic="default") == sum(b["prompt_tokens"]
                                                                                   for b in bodies)
    assert value(samples, "fdconsole_queue_depth", topic="default", node="node-a", role="mixed") == 0
    for name in ("fdconsole_time_to_first_token_seconds", "fdconsole_e2e_request_latency_seconds",
                 "fdconsole_request_queue_time_seconds"):
        _, count, total = histogram(samples, name)
        assert count == 3 and total > 0, name
    _, ttft_count, ttft_sum = histogram(samples, "fdconsole_time_to_first_token_seconds")
    _, _, e2e_sum = histogram(samples, "fdconsole_e2e_request_latency_seconds")
    assert ttft_sum <= e2e_sum
    _, itl_count, itl_sum = histogram(samples, "fdconsole_inter_token_latency_seconds")
    assert itl_count == sum(tokens) - len(tokens) and itl_sum > 0  # each token after a request's first
    assert histogram(samples, "fdconsole_kv_handoff_seconds")[1] == 0
    # The burst node said goodbye: exactly one state is 1, and it is "stopped".
    states = {s.labels["status"]: s.value for s in samples if s.name == "fdconsole_node_state"}
    assert states["stopped"] == 1 and sum(states.values()) == 1
    labels = {"topic": "default", "node": "node-a", "role": "mixed"}
    assert value(samples, "fdconsole_heartbeat_age_seconds", **labels) < 30


def test_rejections_count_by_reason_in_every_topic(api, node):
    assert api.patch("/api/v1/topics/default", {"scheduler_max_size": 1}).status_code == 200
    assert submit(api).status_code == 202
    assert [submit(api).status_code for _ in range(2)] == [429, 429]
    create_topic("lonely")  # no node at all
    assert submit(api, topic="lonely").status_code == 503
    samples = scrape(api)
    assert value(samples, "fdconsole_rejections_total", topic="default", reason="queue_full") == 2
    assert value(samples, "fdconsole_rejections_total", topic="default", reason="no_node") == 0
    assert value(samples, "fdconsole_rejections_total", topic="lonely", reason="no_node") == 1
    assert value(samples, "fdconsole_queue_capacity", topic="default") == 1
    assert value(samples, "fdconsole_queue_capacity", topic="lonely") == float("inf")
    assert value(samples, "fdconsole_requests_submitted_total", topic="default") == 1
    assert value(samples, "fdconsole_requests_waiting", topic="default") == 1


def test_expirations_count_as_expired_requests(api, node, store):
    api.patch("/api/v1/topics/default", {"scheduler_ttl": 1})
    for _ in range(2):
        assert submit(api).status_code == 202
    time.sleep(1.1)
    assert len(store.expire_due("default")) == 2
    samples = scrape(api)
    assert value(samples, "fdconsole_requests_total", topic="default", status="expired") == 2
    assert value(samples, "fdconsole_queue_depth", topic="default", node="node-a", role="mixed") == 0
    assert histogram(samples, "fdconsole_e2e_request_latency_seconds")[1] == 0  # finished ones only


def test_steals_count_each_request_moved(api, global_topic, store, run_node):
    for name in ("node-a", "node-b"):
        ensure_node(name, global_topic)
    store.write_heartbeat("default", "node-a", {"state": "busy", "role": "mixed"})  # alive, not re-homed
    request_ids = [submit(api, node="node-a").json()["request_id"] for _ in range(6)]
    run_node("node-b")  # node-a never runs: node-b steals while node-a holds scheduler_min_load_score
    stolen = [b for b in final_bodies(api, request_ids) if b["executed_by"] == "node-b"]
    assert stolen and all(b["stolen"] for b in stolen)
    samples = scrape(api)
    assert value(samples, "fdconsole_steals_total", topic="default") == len(stolen)
    assert value(samples, "fdconsole_failovers_total", topic="default", reason="rehomed") == 0
    left = 6 - len(stolen)
    assert left == 2  # below scheduler_min_load_score=3: nobody steals those
    assert value(samples, "fdconsole_queue_depth", topic="default", node="node-a", role="mixed") == left
    assert value(samples, "fdconsole_load_score", topic="default", node="node-a", role="mixed") == left
    assert value(samples, "fdconsole_node_state", topic="default", node="node-a", role="mixed",
                 status="busy") == 1


def test_failovers_count_by_reason(api, global_topic, store):
    from scheduler import failover, global_, keys

    for name in ("node-a", "node-b", "node-c"):
        ensure_node(name, global_topic)
    submit(api, node="node-a")
    [claim] = store.claim("default", "node-a")
    store.write_heartbeat("default", "node-b", {"state": "idle", "role": "mixed"})
    store.redis.zadd(keys.inflight("default"), {claim.uid: 0})  # node-a's lease ran out
    assert failover.recover(store, "default") == [(claim.uid, "node-b")]
    [again] = store.claim("default", "node-b")
    assert failover.reclaim(store, "default", "node-b") == [again.uid]  # node-b restarted under its name
    submit(api, node="node-c")  # queued on a node that never beat: re-homed to the live one
    assert global_.rehome(store, "default") == 1
    samples = scrape(api)
    for reason in ("lease_expired", "reclaimed", "rehomed"):
        assert value(samples, "fdconsole_failovers_total", topic="default", reason=reason) == 1, reason
    assert value(samples, "fdconsole_node_state", topic="default", node="node-b", role="mixed",
                 status="idle") == 1


def test_preemptions_on_a_node_are_counted(api, node, store, engine):
    from fdconsole.cluster.hooks import database_hooks
    from gpu_worker.batch_engine import BatchEngine
    from gpu_worker.capacity import EngineCapacity
    from gpu_worker.node import NodeWorker
    from gpu_worker.runtime import NodeRuntime

    for prompt, max_tokens in (("Hi", 22), ("héllo", 20), ("abcdefg", 18), ("Ωμ", 24), ("x", 16)):
        assert submit(api, prompt=prompt, max_tokens=max_tokens).status_code == 202
    small = BatchEngine(engine, EngineCapacity(num_kv_blocks=12, block_size=4))
    runtime = NodeRuntime(topic="default", name="node-a", role="mixed", store=store, engine=small,
                          hooks=database_hooks())
    NodeWorker(runtime).work(burst=True, logging_level="WARNING")
    assert small.stats.preemptions > 0
    samples = scrape(api)
    assert value(samples, "fdconsole_preemptions_total", topic="default") == small.stats.preemptions
    assert value(samples, "fdconsole_requests_total", topic="default", status="finished") == 5


def test_kv_handoffs_are_timed_and_counted(api, db, store, engine):
    from fdconsole.cluster.hooks import database_hooks
    from fdconsole.topics.services import change_topic, ensure_topic
    from gpu_worker.batch_engine import BatchEngine
    from gpu_worker.capacity import EngineCapacity
    from gpu_worker.node import NodeWorker
    from gpu_worker.runtime import NodeRuntime

    topic = change_topic(ensure_topic("default"), {"scheduler_name": "splitwise"})
    roles = {"pre-1": "prefill", "dec-1": "decode"}
    for name, role in roles.items():
        ensure_node(name, topic, role=role)
        store.write_heartbeat("default", name, {"state": "idle", "role": role})  # live for placement
    request_ids = [submit(api, max_tokens=5).json()["request_id"] for _ in range(2)]
    for name, role in roles.items():  # the prefill node hands over, then the decode node goes on
        runtime = NodeRuntime(topic="default", name=name, role=role, store=store,
                              engine=BatchEngine(engine, EngineCapacity(num_kv_blocks=64)),
                              hooks=database_hooks())
        NodeWorker(runtime).work(burst=True, logging_level="WARNING")
    bodies = final_bodies(api, request_ids)
    assert [(b["status"], b["decode_node"]) for b in bodies] == [("finished", "dec-1")] * 2
    samples = scrape(api)
    _, count, total = histogram(samples, "fdconsole_kv_handoff_seconds")
    assert count == 2 and total > 0
    assert value(samples, "fdconsole_kv_handoffs_total", topic="default") == 2
    assert value(samples, "fdconsole_kv_handoff_bytes_total", topic="default") == sum(
        b["handoff"]["bytes"] for b in bodies)
    # The decode node's first token follows the prefill node's on another node: no gap is measured.
    tokens = sum(len(b["output_token_ids"]) for b in bodies)
    assert histogram(samples, "fdconsole_inter_token_latency_seconds")[1] == tokens - 2 * len(bodies)
    assert value(samples, "fdconsole_node_state", topic="default", node="pre-1", role="prefill",
                 status="stopped") == 1


def test_a_topic_whose_redis_is_down_does_not_fail_the_scrape(api, node):
    from fdconsole.topics.models import Topic
    from tests.conftest import free_port

    create_topic("far")
    Topic.objects.filter(name="far").update(scheduler_port=free_port())  # nothing listens there
    samples = scrape(api)
    assert value(samples, "fdconsole_redis_up", topic="far") == 0
    assert value(samples, "fdconsole_redis_up", topic="default") == 1
    assert not [s for s in samples if s.labels.get("topic") == "far" and s.name != "fdconsole_redis_up"]


@pytest.mark.e2e
def test_a_node_process_records_what_the_console_never_saw(api, node, node_processes):
    """The node runs in its own process (as on another host): the console's process never ran the
    requests, yet /metrics shows the tokens it streamed and the inter-token gaps it measured."""
    node_processes.start("node-a", "default")
    request_ids = [submit(api, max_tokens=8).json()["request_id"] for _ in range(3)]
    deadline = time.monotonic() + 60
    while {b["status"] for b in final_bodies(api, request_ids)} != {"finished"}:
        assert time.monotonic() < deadline, "the node never finished the requests"
        time.sleep(0.1)
    tokens = [len(b["output_token_ids"]) for b in final_bodies(api, request_ids)]
    samples = scrape(api)
    assert value(samples, "fdconsole_generated_tokens_total", topic="default") == sum(tokens)
    _, itl_count, itl_sum = histogram(samples, "fdconsole_inter_token_latency_seconds")
    assert itl_count == sum(tokens) - len(tokens) and itl_sum > 0
    assert histogram(samples, "fdconsole_time_to_first_token_seconds")[1] == 3
    labels = {"topic": "default", "node": "node-a", "role": "mixed"}
    live = {s.labels["status"] for s in samples if s.name == "fdconsole_node_state" and s.value == 1}
    assert live <= {"idle", "busy"} and len(live) == 1
    assert value(samples, "fdconsole_heartbeat_age_seconds", **labels) < 5
    assert value(samples, "fdconsole_kv_blocks_total", **labels) > 0
    assert value(samples, "fdconsole_requests_running", **labels) == 0


def test_the_grafana_dashboard_queries_only_exported_series(api, node, store):
    import json
    import re
    from pathlib import Path

    store.write_heartbeat("default", "node-a", {"state": "busy", "role": "mixed", "running": "u1,u2",
                                                "kv_blocks_used": 3, "kv_blocks_total": 64})
    path = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "fdconsole.json"
    dashboard = json.loads(path.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert any("histogram_quantile" in expr and "inter_token" in expr for expr in exprs)
    samples = scrape(api)
    labels = {"topic": "default", "node": "node-a", "role": "mixed"}
    assert value(samples, "fdconsole_requests_running", **labels) == 2
    assert (value(samples, "fdconsole_kv_blocks_used", **labels), value(samples, "fdconsole_kv_blocks_total",
                                                                         **labels)) == (3, 64)
    exported = {sample.name for sample in samples}
    used = {name for expr in exprs for name in re.findall(r"\bfdconsole_\w+", expr)}
    assert used and used <= exported, used - exported


def test_a_heartbeat_with_an_unreadable_time_is_a_dead_node_not_a_failed_scrape(api, node, store):
    from scheduler import keys

    store.write_heartbeat("default", "node-a", {"state": "idle", "role": "mixed"})
    for junk in ("not-a-time", "nan", "inf"):  # anyone who can write to Redis can write this
        store.redis.hset(keys.heartbeat("default", "node-a"), "ts", junk)
        samples = scrape(api)
        assert value(samples, "fdconsole_node_state", topic="default", node="node-a", role="mixed",
                     status="dead") == 1, junk
        listed = api.get("/api/v1/nodes")
        assert listed.status_code == 200 and listed.json()["nodes"][0]["state"] == "dead", junk
