"""Failover with real node processes: a node killed with SIGKILL loses nothing and duplicates
nothing. Its running request resumes on a live node after the tokens already streamed (a greedy
request ends exactly as an uninterrupted run), its queued requests move to live nodes, and a node
restarted under its old name takes its work back."""

import signal
import threading
import time

import pytest

from tests.test_it_streams_tokens_over_sse import read_events

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]
SLOW = {"FD_TOKEN_DELAY_MS": "10"}  # 10 ms a token: time to kill a node mid-generation
FAILOVER_LIMIT_S = 15


def submit(api, node: str, **extra) -> str:
    body = {"prompt": "Failover, take one.", "max_tokens": 300, "node": node, **extra}
    answer = api.post("/api/v1/topics/default/requests", body)
    assert answer.status_code == 202, answer.content
    return answer.json()["request_id"]


def uid_of(request_id: str) -> str:
    from fdconsole.inference.models import Request

    return Request.objects.get(request_id=request_id).uid


def wait_for_tokens(store, uid: str, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while store.state("default", uid).num_output_tokens < count:
        assert time.monotonic() < deadline, "the request never streamed enough tokens"
        time.sleep(0.01)


def stream_in_background(api, request_id: str) -> tuple[threading.Thread, list]:
    results: list = []
    reader = threading.Thread(target=lambda: results.append(read_events(api, request_id)))
    reader.start()
    return reader, results


def greedy(engine, prompt: str, max_tokens: int) -> list[int]:
    from scheduler.messages import SamplingParams

    return [s.token_id for s in engine.generate(list(prompt.encode()), SamplingParams(max_tokens=max_tokens))
            if s.token_id >= 0]


def start_two(node_processes, global_topic) -> None:
    from fdconsole.topics.services import ensure_node

    for name in ("node-a", "node-b"):
        ensure_node(name, global_topic)
        node_processes.start(name, "default", **SLOW)


def test_a_request_resumes_on_a_live_node_with_every_token_once(api, global_topic, store, node_processes,
                                                                engine):
    start_two(node_processes, global_topic)
    request_id = submit(api, "node-a")
    reader, results = stream_in_background(api, request_id)
    wait_for_tokens(store, uid_of(request_id), 50)
    node_processes.kill("node-a")  # SIGKILL: no goodbye, no handing back
    killed_at = time.monotonic()
    uid = uid_of(request_id)
    while store.state("default", uid).executed_by != "node-b":
        assert time.monotonic() - killed_at < FAILOVER_LIMIT_S, "no live node took the request over"
        time.sleep(0.05)
    reader.join(timeout=FAILOVER_LIMIT_S + 30)
    assert results, "the stream never ended"
    events = results[0]
    tokens = [data for name, data in events if name == "token"]
    expected = greedy(engine, "Failover, take one.", 300)  # ends at the end-of-text token, if sooner
    assert len(expected) > 100, "the premise: it still runs well past the kill at 50 tokens"
    assert [t["index"] for t in tokens] == list(range(len(expected)))  # every index once, in order
    assert [name for name, _ in events].count("done") == 1
    done = events[-1][1]
    assert done["status"] == "finished" and done["executed_by"] == "node-b" and done["stolen"] is True
    assert done["output_token_ids"] == expected
    assert [t["token_id"] for t in tokens] == done["output_token_ids"]


def test_a_dead_nodes_queue_moves_to_live_nodes(api, global_topic, store, node_processes, engine):
    start_two(node_processes, global_topic)
    running = submit(api, "node-a")
    wait_for_tokens(store, uid_of(running), 10)
    queued = [submit(api, "node-a", max_tokens=20, request_id=f"queued-{i}") for i in range(2)]
    node_processes.kill("node-a")
    deadline = time.monotonic() + FAILOVER_LIMIT_S + 10
    bodies = []
    while time.monotonic() < deadline:
        bodies = [api.get(f"/api/v1/requests/{rid}").json() for rid in [running, *queued]]
        if all(b["status"] == "finished" for b in bodies):
            break
        time.sleep(0.2)
    assert [b["status"] for b in bodies] == ["finished"] * 3
    assert {b["executed_by"] for b in bodies} == {"node-b"}
    assert bodies[0]["output_token_ids"] == greedy(engine, "Failover, take one.", 300)
    assert store.load_scores("default", ["node-a", "node-b"]) == {"node-a": 0, "node-b": 0}


def test_a_node_restarted_under_its_name_takes_its_work_back(api, global_topic, store, node_processes,
                                                             engine):
    from fdconsole.topics.services import ensure_node

    ensure_node("node-a", global_topic)
    node_processes.start("node-a", "default", **SLOW)
    request_id = submit(api, "node-a")
    wait_for_tokens(store, uid_of(request_id), 30)
    node_processes.kill("node-a")
    node_processes.start("node-a", "default", **SLOW)  # back before its lease ran out
    deadline = time.monotonic() + 30
    while api.get(f"/api/v1/requests/{request_id}").json()["status"] != "finished":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    body = api.get(f"/api/v1/requests/{request_id}").json()
    assert body["executed_by"] == "node-a" and body["stolen"] is False
    assert body["output_token_ids"] == greedy(engine, "Failover, take one.", 300)


def test_sigterm_finishes_the_current_request_then_exits_cleanly(api, global_topic, store, node_processes):
    from fdconsole.topics.services import ensure_node

    ensure_node("node-a", global_topic)
    node_processes.start("node-a", "default", **SLOW)
    request_id = submit(api, "node-a", max_tokens=100)
    wait_for_tokens(store, uid_of(request_id), 5)
    assert node_processes.kill("node-a", signal.SIGTERM) == 0
    assert api.get(f"/api/v1/requests/{request_id}").json()["status"] == "finished"


def test_a_node_killed_with_a_full_batch_loses_none_and_duplicates_no_token(api, global_topic, store,
                                                                             node_processes, engine):
    from fdconsole.nodes.models import Node
    from fdconsole.topics.services import ensure_node

    ensure_node("node-b", global_topic)
    Node.objects.filter(name="node-b").update(admin_state=Node.AdminState.DISABLED)  # up, but idle
    node_processes.start("node-b", "default", **SLOW)
    ensure_node("node-a", global_topic)
    node_processes.start("node-a", "default", **SLOW)
    prompts = [f"Batch member {i}, keep going." for i in range(12)]
    ids = [submit(api, "node-a", prompt=prompt, max_tokens=150) for prompt in prompts]
    readers = [stream_in_background(api, request_id) for request_id in ids]
    for request_id in ids:  # all twelve run together on node-a
        wait_for_tokens(store, uid_of(request_id), 5)
    states = [store.state("default", uid_of(r)) for r in ids]  # the premise: all mid-generation on node-a
    assert all(s.executed_by == "node-a" and s.status == "running" and s.num_output_tokens < 100
               for s in states)
    Node.objects.filter(name="node-b").update(admin_state=Node.AdminState.ENABLED)
    node_processes.kill("node-a")
    for reader, _ in readers:
        reader.join(timeout=FAILOVER_LIMIT_S + 60)
    for prompt, (_, results) in zip(prompts, readers, strict=True):
        assert results, "a stream never ended"
        events = results[0]
        tokens = [data for name, data in events if name == "token"]
        expected = greedy(engine, prompt, 150)
        assert [t["index"] for t in tokens] == list(range(len(expected)))  # every index once, in order
        assert [name for name, _ in events].count("done") == 1
        done = events[-1][1]
        assert done["status"] == "finished" and done["executed_by"] == "node-b"
        assert done["output_token_ids"] == expected == [t["token_id"] for t in tokens]
