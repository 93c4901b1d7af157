"""Node records joined with their live state (heartbeat, queue length) for the API and pages.

A heartbeat is whatever the node wrote, as strings: an old node or a stand-in engine leaves out the
engine's figures (batch, KV blocks, prefix-cache hits, preemptions, tokens/s), and a value that does not
parse is shown as unknown (None) rather than failing the whole node list.
"""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fdconsole.nodes.models import CAPACITY_FIELDS, Node
from fdconsole.redis_conn import get_topic_store, topic_redis_errors
from scheduler.liveness import heartbeat_age, heartbeat_time, limits, node_state

if TYPE_CHECKING:
    from fdconsole.topics.models import Topic


def describe_nodes(nodes: list[Node]) -> list[dict[str, Any]]:
    """The API's node objects, reading each topic's Redis once. Raises ``TopicRedisUnavailable``
    naming the first topic whose Redis does not answer."""
    by_topic: dict[str, list[Node]] = defaultdict(list)
    topics: dict[str, Topic] = {}
    for node in nodes:
        by_topic[node.topic.name].append(node)
        topics[node.topic.name] = node.topic
    live: dict[str, tuple[dict[str, str], int, tuple[float, float]]] = {}
    for name, members in by_topic.items():
        with topic_redis_errors(topics[name]):
            live.update(_live_state(topics[name], [n.name for n in members]))
    return [_describe(node, *live[node.name]) for node in nodes]


def _live_state(topic: Topic, names: list[str]) -> dict[str, tuple[dict[str, str], int, tuple[float, float]]]:
    """Heartbeat, queue length and the topic's liveness limits of each node, from the topic's Redis."""
    store = get_topic_store(topic)
    beats = store.read_heartbeats(topic.name, names)
    lengths = store.queue_lengths(topic.name, names)
    topic_limits = limits(store.config_of(topic.name))
    return {name: (beats[name], lengths[name], topic_limits) for name in names}


def _describe(node: Node, heartbeat: dict[str, str], queue_length: int,
              topic_limits: tuple[float, float]) -> dict[str, Any]:
    age, beat = heartbeat_age(heartbeat), heartbeat_time(heartbeat)
    return {
        "name": node.name,
        "topic": node.topic.name,
        "role": node.role,
        "device": heartbeat.get("device") or node.device,
        "admin_state": node.admin_state,
        "state": node_state(heartbeat, node.admin_state, None, *topic_limits),
        "splitwise_load": _integer(heartbeat.get("load")),
        "transfer": heartbeat.get("transfer") or None,
        "load_score": queue_length,
        "queue_length": queue_length,
        "running": heartbeat.get("running") or None,
        "host": heartbeat.get("host") or node.host or None,
        "last_heartbeat": _iso(beat) if beat is not None else None,
        "heartbeat_age_s": round(age, 3) if age is not None else None,
        "requests_run": node.requests_run,
        "requests_stolen": node.requests_stolen,
        **exit_record(node),
        "max_num_seqs": node.max_num_seqs,
        "max_num_batched_tokens": node.max_num_batched_tokens,
        # The record's settings; a running node keeps those it started with until it restarts.
        "capacity": {name: getattr(node, name) for name in CAPACITY_FIELDS},
        **engine_figures(heartbeat),
    }


def exit_record(node: Node) -> dict[str, Any]:
    """What ``fdcluster`` saw of the node's process: how it last ended (null when it never died under
    fdcluster) and how often it was started again."""
    return {"restarts": node.restarts, "last_exit_status": node.last_exit_status or None,
            "last_exit_at": _iso(node.last_exit_at.timestamp()) if node.last_exit_at else None}


def engine_figures(heartbeat: dict[str, str]) -> dict[str, int | float | None]:
    """The node engine's figures from its heartbeat; each None when absent or unparseable."""
    return {
        "batch_size": _count(heartbeat.get("batch")),
        "waiting": _count(heartbeat.get("waiting")),
        "kv_blocks_used": _count(heartbeat.get("kv_blocks_used")),
        "kv_blocks_total": _count(heartbeat.get("kv_blocks_total")),
        "prefix_cache_hit_rate": _fraction(heartbeat.get("prefix_hit_rate")),
        "preemptions": _count(heartbeat.get("preemptions")),
        "tokens_per_s": _rate(heartbeat.get("tokens_per_s")),
    }


def _integer(text: str | None) -> int | None:
    try:
        return int(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _count(text: str | None) -> int | None:
    """A non-negative integer, or None."""
    value = _integer(text)
    return value if value is not None and value >= 0 else None


def _rate(text: str | None) -> float | None:
    """A finite non-negative number, or None (NaN and infinities are not JSON)."""
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _fraction(text: str | None) -> float | None:
    """A number in [0, 1], or None (empty while nothing was looked up yet)."""
    value = _rate(text)
    return value if value is not None and value <= 1 else None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")
