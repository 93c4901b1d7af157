"""Global scheduler with real node processes: idle nodes steal from a skewed node, never below
scheduler_min_load_score, and the stolen work is recorded as such."""

import time

import pytest

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]


def submit(api, node: str, **extra) -> str:
    body = {"prompt": "x", "max_tokens": 4, "node": node, **extra}
    answer = api.post("/api/v1/topics/default/requests", body)
    assert answer.status_code == 202, answer.content
    return answer.json()["request_id"]


def wait_final(api, request_ids, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        bodies = [api.get(f"/api/v1/requests/{rid}").json() for rid in request_ids]
        if all(b["status"] not in ("queued", "running") for b in bodies):
            return bodies
        time.sleep(0.2)
    raise AssertionError(f"not final after {timeout}s: {[b['status'] for b in bodies]}")


def settled_counts(api, total: int, timeout: float = 10) -> dict[str, dict]:
    """The nodes once their run counters add up to ``total``: a node counts a request in the database just
    after its final status is in Redis, so the API can show the status a moment before the count."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = {n["name"]: n for n in api.get("/api/v1/nodes").json()["nodes"]}
        counted = sum(n["requests_run"] for n in nodes.values())
        if counted == total or time.monotonic() > deadline:
            assert counted == total
            return nodes
        time.sleep(0.1)


def test_idle_nodes_steal_from_a_skewed_node(api, global_topic, store, node_processes):
    from fdconsole.topics.services import ensure_node

    for name in ("node-a", "node-b", "node-c"):
        ensure_node(name, global_topic)
        node_processes.start(name, "default", "--fixed-work-ms", "100")
    request_ids = [submit(api, "node-a") for _ in range(30)]
    bodies = wait_final(api, request_ids)
    assert {b["status"] for b in bodies} == {"finished"}
    runners = {b["executed_by"] for b in bodies}
    assert {"node-b", "node-c"} <= runners, runners
    assert all(b["home_node"] == "node-a" for b in bodies)
    assert all(b["stolen"] == (b["executed_by"] != "node-a") for b in bodies)
    nodes = settled_counts(api, 30)
    assert nodes["node-b"]["requests_stolen"] > 0 and nodes["node-c"]["requests_stolen"] > 0
    assert nodes["node-a"]["requests_stolen"] == 0
    names = list(nodes)
    assert store.load_scores("default", names) == {name: 0 for name in names}


def test_nobody_steals_below_the_minimum_load_score(api, global_topic, store, node_processes):
    from fdconsole.topics.services import ensure_node

    for name in ("node-a", "node-b"):
        ensure_node(name, global_topic)
    node_processes.start("node-a", "default", "--fixed-work-ms", "3000")
    node_processes.start("node-b", "default", "--fixed-work-ms", "100")
    first = submit(api, "node-a")
    deadline = time.monotonic() + 10
    while api.get(f"/api/v1/requests/{first}").json()["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    waiting = [submit(api, "node-a") for _ in range(2)]  # score 2 < scheduler_min_load_score=3
    time.sleep(1.0)
    assert store.load_scores("default", ["node-a"]) == {"node-a": 2}
    assert all(api.get(f"/api/v1/requests/{rid}").json()["status"] == "queued" for rid in waiting)

    # A lower minimum reaches the running nodes without a restart: node-b may steal a score of 2 now.
    assert api.patch("/api/v1/topics/default", {"scheduler_min_load_score": 2}).status_code == 200
    bodies = wait_final(api, waiting, timeout=30)
    assert "node-b" in {b["executed_by"] for b in bodies}


def test_a_hot_shard_change_keeps_scores_and_stealing(api, global_topic, store, node_processes):
    from fdconsole.topics.services import ensure_node
    from scheduler import keys
    from scheduler.loadtable import shard_of

    for name in ("node-a", "node-b"):
        ensure_node(name, global_topic)
    node_processes.start("node-a", "default", "--fixed-work-ms", "2000")
    for _ in range(6):
        submit(api, "node-a")
    assert api.patch("/api/v1/topics/default", {"scheduler_load_shards_num": 4}).status_code == 200
    table = keys.load_table("default", shard_of("node-a", 4))
    assert store.redis.zscore(table, "node-a") == store.queue_length("default", "node-a") >= 5
    node_processes.start("node-b", "default", "--fixed-work-ms", "50")  # steals through the new tables
    deadline = time.monotonic() + 15
    while store.queue_length("default", "node-a") > 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.queue_length("default", "node-a") <= 2
    assert store.redis.zscore(table, "node-a") == store.queue_length("default", "node-a")


def test_requests_waiting_behind_a_busy_node_expire(api, global_topic, store, node_processes):
    from fdconsole.topics.services import ensure_node

    ensure_node("node-a", global_topic)
    node_processes.start("node-a", "default", "--fixed-work-ms", "4000")
    api.patch("/api/v1/topics/default", {"scheduler_ttl": 1})
    busy = submit(api, "node-a")
    deadline = time.monotonic() + 10
    while api.get(f"/api/v1/requests/{busy}").json()["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    behind = submit(api, "node-a")
    time.sleep(1.6)
    body = api.get(f"/api/v1/requests/{behind}").json()
    assert body["status"] == "expired" and body["error"]["code"] == "expired"
    assert api.get(f"/api/v1/requests/{busy}").json()["status"] == "running"  # running work never expires
    assert store.load_scores("default", ["node-a"]) == {"node-a": 0}


def test_a_draining_node_steals_nothing_until_enabled_again(api, global_topic, store, node_processes):
    from fdconsole.nodes.models import Node
    from fdconsole.topics.services import ensure_node

    ensure_node("node-a", global_topic)
    ensure_node("node-b", global_topic)
    Node.objects.filter(name="node-b").update(admin_state="draining")
    node_processes.start("node-a", "default", "--fixed-work-ms", "500")
    node_processes.start("node-b", "default", "--fixed-work-ms", "50")
    request_ids = [submit(api, "node-a") for _ in range(8)]
    time.sleep(1.5)
    runners = {api.get(f"/api/v1/requests/{rid}").json()["executed_by"] for rid in request_ids}
    assert runners <= {None, "node-a"}
    Node.objects.filter(name="node-b").update(admin_state="enabled")  # the admin's "enable" action
    bodies = wait_final(api, request_ids, timeout=30)
    assert "node-b" in {b["executed_by"] for b in bodies}


def test_work_a_thief_dies_with_goes_back_and_finishes(api, global_topic, store, node_processes):
    from fdconsole.topics.services import ensure_node

    for name in ("node-a", "node-b"):
        ensure_node(name, global_topic)
    node_processes.start("node-a", "default", "--fixed-work-ms", "1500")
    node_processes.start("node-b", "default", "--fixed-work-ms", "20000")  # whatever it steals, it sits on
    request_ids = [submit(api, "node-a") for _ in range(6)]
    deadline = time.monotonic() + 15
    stolen = []
    while not stolen and time.monotonic() < deadline:
        runners = {rid: api.get(f"/api/v1/requests/{rid}").json()["executed_by"] for rid in request_ids}
        stolen = [rid for rid, runner in runners.items() if runner == "node-b"]
        time.sleep(0.05)
    assert stolen, "node-b never stole"
    node_processes.kill("node-b")  # the thief dies holding stolen work
    bodies = wait_final(api, request_ids, timeout=60)
    assert [b["status"] for b in bodies] == ["finished"] * 6
    assert api.get(f"/api/v1/requests/{stolen[0]}").json()["executed_by"] == "node-a"
    assert store.load_scores("default", ["node-a", "node-b"]) == {"node-a": 0, "node-b": 0}
