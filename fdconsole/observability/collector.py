"""The collector behind ``/metrics``: every topic's figures, read from its own Redis at each scrape.

Families are named ``fdconsole_*`` and labelled only by topic, node, role, status or reason (a fixed
set of values each, never a request id). A topic whose Redis does not answer shows
``fdconsole_redis_up 0`` and nothing else; the other topics are unaffected.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from redis.exceptions import RedisError

from fdconsole.nodes.models import Node
from fdconsole.nodes.status import engine_figures
from fdconsole.redis_conn import get_topic_store, get_topic_telemetry
from fdconsole.topics.models import Topic
from scheduler import keys
from scheduler.config import UNBOUNDED
from scheduler.liveness import heartbeat_age, limits, node_state
from scheduler.status import RequestStatus

NODE_STATES = ("idle", "busy", "stale", "draining", "dead", "stopped")
REJECTION_REASONS = ("queue_full", "no_node")  # what fdconsole.inference.submit counts
FAILOVER_REASONS = ("lease_expired", "reclaimed", "rehomed")  # what lua/failover.lua and rehome count
HISTOGRAMS = {  # the metrics hash's histograms (scheduler.keys.HISTOGRAM_BUCKETS): family, help
    "ttft": ("fdconsole_time_to_first_token_seconds",
             "Time from submission to the first token, of finished requests."),
    "itl": ("fdconsole_inter_token_latency_seconds",
            "Time between two tokens of a request on the node that generated them."),
    "e2e": ("fdconsole_e2e_request_latency_seconds",
            "Time from submission to the end, of finished requests."),
    "queue": ("fdconsole_request_queue_time_seconds",
              "Time from submission to the first claim by a node, of finished requests."),
    "handoff": ("fdconsole_kv_handoff_seconds",
                "Time a prefill node took to write a KV cache for its decode node (splitwise)."),
}
TOPIC = ["topic"]
NODE_LABELS = [*TOPIC, "node", "role"]


@dataclass(frozen=True)
class NodeReading:
    name: str
    role: str
    status: str  # one of NODE_STATES
    heartbeat: dict[str, str]
    queue_depth: int
    load_score: float

    @property
    def live(self) -> bool:
        """Its heartbeat's figures are current (a dead node's last heartbeat lingers for a while)."""
        return self.status not in ("dead", "stopped")


@dataclass(frozen=True)
class TopicReading:
    """What one scrape read of one topic, from the topic's Redis."""

    name: str
    capacity: float  # how many requests a node's queue takes (+Inf when unbounded)
    waiting: int
    nodes: list[NodeReading]
    stats: dict[str, int]  # the scripts' counters (scheduler.telemetry)
    metrics: dict[str, str]  # counters and histogram buckets (scheduler.keys.metrics)

    def counter(self, field: str) -> float:
        return _number(self.metrics.get(field))


def read_topic(topic: Topic, nodes: list[Node]) -> TopicReading:
    """One topic's live figures; raises RedisError when its Redis does not answer."""
    store, config = get_topic_store(topic), topic.config
    names = [node.name for node in nodes]
    beats = store.read_heartbeats(topic.name, names)
    depths = store.queue_lengths(topic.name, names)
    scores = store.load_scores(topic.name, names)
    stale_after, dead_after = limits(config)
    now = time.time()
    readings = [NodeReading(node.name, node.role,
                            node_status(beats[node.name], node.admin_state, now, stale_after, dead_after),
                            beats[node.name], depths[node.name], scores[node.name]) for node in nodes]
    telemetry = get_topic_telemetry(topic)
    bounded = config.scheduler_name == "local" and config.scheduler_max_size != UNBOUNDED
    return TopicReading(topic.name, config.scheduler_max_size if bounded else math.inf,
                        telemetry.waiting_count(topic.name), readings, telemetry.counters(topic.name),
                        store.metrics_fields(topic.name))


def node_status(heartbeat: dict[str, str], admin_state: str, now: float, stale_after: float,
                dead_after: float) -> str:
    """The node's state as the API computes it, with ``stopped`` for a dead node that said so on its way
    out (as the pulse tells a stopped node from one that died)."""
    state = node_state(heartbeat, admin_state, now, stale_after, dead_after)
    return "stopped" if state == "dead" and heartbeat.get("state") == "stopped" else state


class ClusterCollector(Collector):
    """Reads every topic of the console's database from its Redis, each time it is collected."""

    def collect(self) -> Iterator[Metric]:
        members: dict[str, list[Node]] = {}
        for node in Node.objects.select_related("topic").order_by("name"):
            members.setdefault(node.topic.name, []).append(node)
        families = Families()
        for topic in Topic.objects.order_by("name"):
            try:
                reading = read_topic(topic, members.get(topic.name, []))
            except RedisError:
                families.redis_up.add_metric([topic.name], 0)
                continue
            families.redis_up.add_metric([topic.name], 1)
            families.add(reading)
        yield from families.all()


class Families:
    """The metric families of one scrape, filled topic by topic."""

    def __init__(self) -> None:
        self.redis_up = _gauge("redis_up", "1 when the topic's Redis answered this scrape.", TOPIC)
        self.gauges = {
            "queue_depth": _gauge("queue_depth", "Requests waiting in the node's queue.", NODE_LABELS),
            "queue_capacity": _gauge("queue_capacity", "Requests a node's queue takes (scheduler_max_size; "
                                     "+Inf when unbounded).", TOPIC),
            "waiting": _gauge("requests_waiting", "Requests waiting anywhere in the topic (node queues and "
                              "the splitwise pending list).", TOPIC),
            "running": _gauge("requests_running", "Requests the node holds (its heartbeat).", NODE_LABELS),
            "load": _gauge("load_score", "The node's score in its topic's load table.", NODE_LABELS),
            "kv_used": _gauge("kv_blocks_used", "KV cache blocks in use on the node.", NODE_LABELS),
            "kv_total": _gauge("kv_blocks_total", "KV cache blocks of the node.", NODE_LABELS),
            "state": _gauge("node_state", "1 for the node's current state (the status label), else 0.",
                            [*NODE_LABELS, "status"]),
            "age": _gauge("heartbeat_age_seconds", "Seconds since the node's last heartbeat.", NODE_LABELS),
        }
        self.counters = {
            "requests": _counter("requests", "Requests that ended, by final status.", [*TOPIC, "status"]),
            "submitted": _counter("requests_submitted", "Requests accepted into a queue.", TOPIC),
            "rejections": _counter("rejections", "Submissions the console refused, by reason.",
                                   [*TOPIC, "reason"]),
            "steals": _counter("steals", "Requests moved by work stealing (global).", TOPIC),
            "failovers": _counter("failovers", "Requests moved off a dead node (lease_expired: running; "
                                  "reclaimed: taken back by its restarted node; rehomed: queued).",
                                  [*TOPIC, "reason"]),
            "preemptions": _counter("preemptions", "Sequences preempted by recompute on the nodes.", TOPIC),
            "prompt_tokens": _counter("prompt_tokens", "Prompt tokens of the requests nodes started.", TOPIC),
            "tokens": _counter("generated_tokens", "Tokens streamed to clients.", TOPIC),
            "handoffs": _counter("kv_handoffs", "KV caches handed from a prefill to a decode node.", TOPIC),
            "handoff_bytes": _counter("kv_handoff_bytes", "Bytes of the KV caches handed over.", TOPIC),
        }
        self.histograms = {name: HistogramMetricFamily(family, help_text, labels=TOPIC)
                           for name, (family, help_text) in HISTOGRAMS.items()}

    def all(self) -> list[Metric]:
        return [self.redis_up, *self.gauges.values(), *self.counters.values(), *self.histograms.values()]

    def add(self, topic: TopicReading) -> None:
        self._add_nodes(topic)
        t, g, c = [topic.name], self.gauges, self.counters
        g["queue_capacity"].add_metric(t, topic.capacity)
        g["waiting"].add_metric(t, topic.waiting)
        for status in RequestStatus.finals():
            c["requests"].add_metric([topic.name, status.value], topic.stats.get(status.value, 0))
        c["submitted"].add_metric(t, topic.stats.get("submitted", 0))
        c["tokens"].add_metric(t, topic.stats.get("tokens", 0))
        for reason in REJECTION_REASONS:
            c["rejections"].add_metric([topic.name, reason], topic.counter(f"rejections:{reason}"))
        for reason in FAILOVER_REASONS:
            c["failovers"].add_metric([topic.name, reason], topic.counter(f"failovers:{reason}"))
        for field in ("steals", "preemptions", "prompt_tokens", "handoff_bytes"):
            c[field].add_metric(t, topic.counter(field))
        for name, family in self.histograms.items():
            buckets, total = cumulative(topic.metrics, name)
            family.add_metric(t, buckets, total)
            if name == "handoff":
                c["handoffs"].add_metric(t, buckets[-1][1])  # each handoff is one observation

    def _add_nodes(self, topic: TopicReading) -> None:
        g = self.gauges
        for node in topic.nodes:
            labels = [topic.name, node.name, node.role]
            g["queue_depth"].add_metric(labels, node.queue_depth)
            g["load"].add_metric(labels, node.load_score)
            for state in NODE_STATES:
                g["state"].add_metric([*labels, state], 1 if node.status == state else 0)
            age = heartbeat_age(node.heartbeat)
            if age is not None:
                g["age"].add_metric(labels, age)
            if not node.live:
                continue
            running = node.heartbeat.get("running")
            g["running"].add_metric(labels, len(running.split(",")) if running else 0)
            figures = engine_figures(node.heartbeat)
            for gauge, field in (("kv_used", "kv_blocks_used"), ("kv_total", "kv_blocks_total")):
                if figures[field] is not None:
                    g[gauge].add_metric(labels, figures[field])


def cumulative(fields: dict[str, str], name: str) -> tuple[list[tuple[str, float]], float]:
    """Histogram ``name``'s buckets, cumulative (``le`` as Prometheus writes it, ``+Inf`` last), and its
    sum, from the metrics hash's per-bucket counts."""
    buckets, seen = [], 0.0
    for le in keys.bucket_labels(name):
        seen += _number(fields.get(keys.histogram_field(name, le)))
        buckets.append((floatToGoString(le), seen))
    return buckets, _number(fields.get(keys.histogram_field(name, keys.SUM)))


def _gauge(name: str, help_text: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"fdconsole_{name}", help_text, labels=labels)


def _counter(name: str, help_text: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(f"fdconsole_{name}", help_text, labels=labels)  # exposed as ..._total


def _number(text: str | None) -> float:
    """A count or sum from Redis; 0 for one missing or unreadable (never a failed scrape)."""
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) and value >= 0 else 0.0
