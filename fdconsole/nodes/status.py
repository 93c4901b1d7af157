"""Node records joined with their live state (heartbeat, queue length) for the API and pages."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from fdconsole.nodes.models import Node
from fdconsole.redis_conn import get_store
from scheduler.liveness import heartbeat_age, limits, node_state


def describe_nodes(nodes: list[Node]) -> list[dict[str, Any]]:
    """The API's node objects, reading Redis once per topic."""
    store = get_store()
    by_topic: dict[str, list[Node]] = defaultdict(list)
    for node in nodes:
        by_topic[node.topic.name].append(node)
    live: dict[str, tuple[dict[str, str], int, tuple[float, float]]] = {}
    for topic, members in by_topic.items():
        names = [n.name for n in members]
        beats = store.read_heartbeats(topic, names)
        lengths = store.queue_lengths(topic, names)
        topic_limits = limits(store.config_of(topic))
        live.update({name: (beats[name], lengths[name], topic_limits) for name in names})
    return [_describe(node, *live[node.name]) for node in nodes]


def _describe(node: Node, heartbeat: dict[str, str], queue_length: int,
              topic_limits: tuple[float, float]) -> dict[str, Any]:
    age = heartbeat_age(heartbeat)
    return {
        "name": node.name,
        "topic": node.topic.name,
        "role": node.role,
        "device": heartbeat.get("device") or node.device,
        "admin_state": node.admin_state,
        "state": node_state(heartbeat, node.admin_state, None, *topic_limits),
        "splitwise_load": int(heartbeat["load"]) if heartbeat.get("load") else None,
        "transfer": heartbeat.get("transfer") or None,
        "load_score": queue_length,
        "queue_length": queue_length,
        "running": heartbeat.get("running") or None,
        "host": heartbeat.get("host") or node.host or None,
        "last_heartbeat": _iso(float(heartbeat["ts"])) if "ts" in heartbeat else None,
        "heartbeat_age_s": round(age, 3) if age is not None else None,
        "requests_run": node.requests_run,
        "requests_stolen": node.requests_stolen,
        "max_num_seqs": node.max_num_seqs,
        "max_num_batched_tokens": node.max_num_batched_tokens,
    }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")
