"""A storm of concurrent puts, steals and SIGKILLs against real node processes: afterwards every
request has exactly one final result with each token once, and every load score equals its queue."""

import random
import threading
import time

import pytest

from scheduler.messages import Request, SamplingParams
from scheduler.store import new_uid

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]
NODES = ("node-a", "node-b", "node-c")
REQUESTS_PER_THREAD = 50


def test_a_storm_leaves_every_request_done_once_and_every_score_exact(global_topic, store, node_processes):
    from fdconsole.topics.services import ensure_node
    from scheduler import keys

    for name in NODES:
        ensure_node(name, global_topic)
        node_processes.start(name, "default", "--fixed-work-ms", "20")
    uids: list[str] = []
    lock = threading.Lock()

    def put_many(seed: int) -> None:
        rng = random.Random(seed)
        for i in range(REQUESTS_PER_THREAD):
            uid = new_uid()
            request = Request(f"storm-{seed}-{i}", [1, 2, 3], SamplingParams(max_tokens=4))
            home = NODES[0] if rng.random() < 0.7 else rng.choice(NODES)  # skewed: thieves get busy
            store.submit("default", uid, request, home, global_topic.config)
            with lock:
                uids.append(uid)
            time.sleep(rng.random() * 0.01)

    putters = [threading.Thread(target=put_many, args=(seed,)) for seed in range(4)]
    for putter in putters:
        putter.start()
    time.sleep(0.3)
    node_processes.kill("node-b")  # mid-storm, twice, no warning
    node_processes.start("node-b", "default", "--fixed-work-ms", "20", wait=False)
    time.sleep(0.3)
    node_processes.kill("node-a")
    samples = 0
    while any(putter.is_alive() for putter in putters) or samples < 3:
        assert_scores_equal_queues(store, keys)  # mid-storm, in one atomic snapshot
        samples += 1
        time.sleep(0.05)
    for putter in putters:
        putter.join(timeout=60)
    node_processes.start("node-a", "default", "--fixed-work-ms", "20")

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        statuses = [store.state("default", uid).status for uid in uids]
        if all(status == "finished" for status in statuses):
            break
        time.sleep(0.25)
    assert len(uids) == 4 * REQUESTS_PER_THREAD
    assert statuses.count("finished") == len(uids), {s: statuses.count(s) for s in set(statuses)}
    for uid in uids:
        events = store.read_output("default", uid)
        assert [e.index for e in events if e.kind == "token"] == [0, 1, 2, 3]
        assert [e.kind for e in events].count("done") == 1
    lengths = store.queue_lengths("default", list(NODES))
    scores = store.load_scores("default", list(NODES))
    assert scores == {n: float(lengths[n]) for n in NODES} == dict.fromkeys(NODES, 0.0)
    assert store.redis.zcard(keys.inflight("default")) == 0
    assert store.redis.zcard(keys.waiting("default")) == 0


def assert_scores_equal_queues(store, keys) -> None:
    from scheduler.loadtable import shard_of

    with store.redis.pipeline(transaction=True) as pipe:  # MULTI: one consistent moment
        for name in NODES:
            pipe.llen(keys.rq_queue(keys.node_queue_name("default", name)))
            pipe.zscore(keys.load_table("default", shard_of(name, 1)), name)
        replies = pipe.execute()
    for name, length, score in zip(NODES, replies[::2], replies[1::2], strict=True):
        assert float(score or 0) == length, (name, score, length)
