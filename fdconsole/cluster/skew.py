"""``fdbench skew``: real node processes, every request placed on one node, each a fixed amount of
work; the figure is the makespan over the ideal (total work / nodes), which is what stealing buys.

Design note: the nodes run the fixed-work stand-in engine (``fdnode --fixed-work-ms``), so the figure
measures the scheduler's balancing, not the model or how many cores the machine has. The topic, its
nodes and every key they made are removed afterwards.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from django.conf import settings

from fdconsole.nodes.models import Node
from fdconsole.redis_conn import get_topic_store
from fdconsole.topics.models import Topic
from fdconsole.topics.services import create_topic, ensure_node
from scheduler.bench import delete_topic_keys
from scheduler.messages import Request, SamplingParams
from scheduler.status import RequestStatus
from scheduler.store import new_uid

START_TIMEOUT_S = 60
RUN_TIMEOUT_S = 300


def bench_skew(nodes: int, requests: int, work_ms: float, log) -> dict[str, Any]:
    topic_name = f"bench-skew-{uuid.uuid4().hex[:6]}"
    topic = create_topic(topic_name, {"scheduler_name": "global"})
    store = get_topic_store(topic)
    names = [f"{topic_name}-{i}" for i in range(1, nodes + 1)]
    processes = []
    try:
        for name in names:
            ensure_node(name, topic)
            processes.append(_start_node(topic_name, name, work_ms))
        _wait_alive(store, topic_name, names, processes)
        log(f"{nodes} nodes up; placing {requests} requests on {names[0]}")
        makespan = _run(store, topic, names[0], requests)
    finally:
        _stop(processes)
        delete_topic_keys(store.redis, topic_name)
        Node.objects.filter(topic__name=topic_name).delete()
        Topic.objects.filter(name=topic_name).delete()
    ideal = requests * work_ms / 1000 / nodes
    return {"bench": "skew", "nodes": nodes, "requests": requests, "work_ms": work_ms,
            "makespan_s": round(makespan, 3), "ideal_s": round(ideal, 3), "ratio": round(makespan / ideal, 3)}


def _start_node(topic: str, name: str, work_ms: float) -> subprocess.Popen:
    manage = Path(settings.BASE_DIR) / "manage.py"
    argv = [sys.executable, str(manage), "fdnode", "--topic", topic, "--name", name, "--fixed-work-ms",
            str(work_ms)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_alive(store, topic: str, names: list[str], processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        beats = store.read_heartbeats(topic, names)
        if all(beats[name].get("state") in ("idle", "busy") for name in names):
            return
        if any(p.poll() is not None for p in processes):
            raise RuntimeError("a node process exited during start-up")
        time.sleep(0.1)
    raise RuntimeError(f"the nodes did not start within {START_TIMEOUT_S}s")


def _run(store, topic: Topic, home: str, requests: int) -> float:
    items = [(new_uid(), Request(f"skew-{i}", [1, 2, 3], SamplingParams(max_tokens=4)), home)
             for i in range(requests)]
    started = time.monotonic()
    for start in range(0, requests, 100):
        store.submit_many(topic.name, items[start:start + 100], topic.config)
    uids = [uid for uid, _, _ in items]
    deadline = started + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        states = store.states(topic.name, uids, ["status"])
        if all(state is not None and state.status == RequestStatus.FINISHED for state in states):
            return time.monotonic() - started
        time.sleep(0.02)
    raise RuntimeError(f"the requests did not finish within {RUN_TIMEOUT_S}s")


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
