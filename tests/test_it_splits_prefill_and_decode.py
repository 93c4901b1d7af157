"""Splitwise with real node processes: a prefill node builds the KV cache and the first token, a
decode node continues from it, and the output equals the same request in local mode token for token.
Only mixed nodes: one does it all. No decode node: the request waits, then expires saying why. A decode
node killed after the handoff loses nothing."""

import time
from urllib.parse import quote

import pytest

from scheduler.messages import SamplingParams

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]
LONG = ("Prefill, then decode. " + "Ünïcödé ✓ 日本語 🚀 " * 40).encode()[:900].decode(errors="ignore")
PROMPTS = ["Hello, splitwise.", "Grüße, 世界! 🚀", LONG]


@pytest.fixture
def splitwise_topic(db, store):
    from fdconsole.topics.services import change_topic, ensure_topic

    changes = {"scheduler_name": "splitwise", "scheduler_sync_period": 0.5}
    return change_topic(ensure_topic("default"), changes)


def submit(api, prompt: str, max_tokens: int = 40, **extra) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, **extra}
    answer = api.post("/api/v1/topics/default/requests", body)
    assert answer.status_code == 202, answer.content
    return answer.json()["request_id"]


def wait_status(api, request_id: str, statuses: tuple[str, ...], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = api.get(f"/api/v1/requests/{quote(request_id, safe='')}").json()
        if body["status"] in statuses:
            return body
        time.sleep(0.1)
    raise AssertionError(f"{request_id} is {body['status']}, not {statuses}")


def greedy(engine, prompt: str, max_tokens: int) -> list[int]:
    steps = engine.generate(list(prompt.encode()), SamplingParams(max_tokens=max_tokens))
    return [s.token_id for s in steps if s.token_id >= 0]


def test_prefill_then_decode_equals_local_mode(api, splitwise_topic, node_processes, engine):
    node_processes.start("pre-1", "default", "--role", "prefill")
    node_processes.start("dec-1", "default", "--role", "decode")
    request_ids = [submit(api, prompt) for prompt in PROMPTS]
    request_ids.append(submit(api, "odd id", request_id="pd#1 ?/ü %"))
    for request_id, prompt in zip(request_ids, [*PROMPTS, "odd id"], strict=True):
        body = wait_status(api, request_id, ("finished", "failed", "expired"))
        assert body["status"] == "finished", body
        assert body["output_token_ids"] == greedy(engine, prompt, 40)
        assert (body["prefill_node"], body["decode_node"], body["executed_by"]) == ("pre-1", "dec-1", "dec-1")
        assert body["stolen"] is False
        assert body["handoff"]["bytes"] > 0 and body["handoff"]["ms"] >= 0


def test_only_mixed_nodes_run_whole_requests(api, splitwise_topic, node_processes, engine):
    node_processes.start("mix-1", "default", "--role", "mixed")
    body = wait_status(api, submit(api, PROMPTS[1]), ("finished",))
    assert body["executed_by"] == "mix-1" and body["handoff"] is None
    assert body["output_token_ids"] == greedy(engine, PROMPTS[1], 40)


def test_without_a_decode_node_a_request_waits_then_expires_saying_why(api, splitwise_topic, node_processes):
    node_processes.start("mix-1", "default", "--role", "mixed")
    node_processes.start("pre-1", "default", "--role", "prefill")
    api.patch("/api/v1/topics/default", {"scheduler_ttl": 2})
    request_id = submit(api, "nobody decodes me")
    time.sleep(1.0)
    assert api.get(f"/api/v1/requests/{request_id}").json()["status"] == "queued"  # waiting, not lost
    body = wait_status(api, request_id, ("expired",), timeout=10)
    assert body["error"]["code"] == "expired" and "no decode node" in body["error"]["message"]


def test_a_decode_node_killed_after_the_handoff_loses_nothing(api, splitwise_topic, store, node_processes,
                                                              engine):
    from fdconsole.inference.models import Request

    slow = {"FD_TOKEN_DELAY_MS": "10"}
    node_processes.start("pre-1", "default", "--role", "prefill", **slow)
    # Slower still: dec-1 must still be generating once dec-2 has started (seconds, on a loaded machine).
    node_processes.start("dec-1", "default", "--role", "decode", FD_TOKEN_DELAY_MS="60")
    request_id = submit(api, PROMPTS[0], max_tokens=200)
    uid = Request.objects.get(request_id=request_id).uid
    deadline = time.monotonic() + 30
    while True:
        state = store.state("default", uid)
        if state.executed_by in ("dec-1",) and state.num_output_tokens >= 10:
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.02)
    node_processes.start("dec-2", "default", "--role", "decode", **slow)
    node_processes.kill("dec-1")
    state = store.state("default", uid)
    assert state.status == "running" and state.num_output_tokens < 200, "dec-1 finished first"
    body = wait_status(api, request_id, ("finished", "failed", "expired"), timeout=60)
    assert body["status"] == "finished" and body["executed_by"] == "dec-2" and body["decode_node"] == "dec-2"
    assert body["output_token_ids"] == greedy(engine, PROMPTS[0], 200)
    events = store.read_output("default", uid)
    assert [e.index for e in events if e.kind == "token"] == list(range(200))


def test_heartbeats_make_a_silent_node_stale_then_expired_and_its_work_moves(api, splitwise_topic, store,
                                                                             node_processes, engine):
    from scheduler import keys

    api.patch("/api/v1/topics/default", {"scheduler_expire_period": 4})
    node_processes.start("pre-1", "default", "--role", "prefill")
    node_processes.start("dec-1", "default", "--role", "decode")
    node = api.get("/api/v1/nodes/dec-1").json()
    assert node["state"] == "idle" and node["transfer"] == "redis"
    node_processes.kill("dec-1")
    killed = time.monotonic()
    request_id = submit(api, PROMPTS[0], max_tokens=20)  # placed on dec-1: not stale yet
    states = set()
    while time.monotonic() - killed < 8:
        states.add(api.get("/api/v1/nodes/dec-1").json()["state"])
        if "dead" in states:
            break
        time.sleep(0.1)
    assert {"stale", "dead"} <= states  # stale after three sync periods, expired after four seconds
    deadline = time.monotonic() + 3  # the next reaper pass (every 0.25 s) removes it from the registry
    while store.redis.hget(keys.roles("default"), "dec-1") is not None:
        assert time.monotonic() < deadline, "an expired node stayed in the registry"
        time.sleep(0.05)
    node_processes.start("dec-2", "default", "--role", "decode")
    body = wait_status(api, request_id, ("finished", "failed", "expired"), timeout=30)
    assert body["status"] == "finished" and body["decode_node"] == "dec-2"
    assert body["output_token_ids"] == greedy(engine, PROMPTS[0], 20)
    assert {int(v) for v in store.redis.hvals(keys.pd_load("default"))} == {0}  # every charge released
