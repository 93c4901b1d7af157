"""The pulse: samples the cluster a few times a second and pushes it to the live pages over Channels.

Design note. One pulse broadcasts for the whole console: it holds a lease in the console's Redis (``SET
NX PX``, renewed every tick), so several console processes do not send everything twice, and another
takes over within ``LEASE_MS`` when the holder stops. Each tick reads, per topic, the nodes (database
rows joined with heartbeats and queue lengths), the events the scripts appended since the last tick, and
once a second a chart point (rates from the scripts' counters, queue depth, load per node, and the KV
blocks and batch size the live nodes' heartbeats report, summed) that it also appends to the topic's
series in Redis, so a page opened later, or after a restart, draws the last minutes. Node state changes
(joined, stale, died, stopped, draining) are noticed here, by comparing ticks, and written to the
topic's event stream like the scripts' events. Messages go to the channel layer groups ``cluster`` and
``topic.<name>``; the consumers forward them to browsers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from datetime import datetime
from functools import cached_property
from typing import Any

from channels.layers import get_channel_layer
from redis.exceptions import RedisError

from fdconsole.errors import TopicRedisUnavailable
from fdconsole.nodes.models import Node
from fdconsole.nodes.status import describe_nodes, engine_figures
from fdconsole.redis_conn import get_store, get_topic_telemetry, topic_url
from fdconsole.topics.models import Topic
from scheduler.lease import Lease
from scheduler.status import RequestStatus
from scheduler.telemetry import Telemetry

log = logging.getLogger(__name__)
TICK_S = 0.2  # a heartbeat reaches the browser within about this (plus the heartbeat's own period)
POINT_S = 1.0  # one chart point a second
LEASE_KEY = "fd:console:pulse"
LEASE_MS = 3000
SERIES_SENT = 300  # chart points a page gets when it connects: the last five minutes
EVENTS_SENT = 50
CLUSTER_GROUP = "cluster"
LIVE = {"idle", "busy", "draining"}


def topic_group(topic: str) -> str:
    """The channel layer group of one topic's page (topic names are valid group names by validation)."""
    return f"topic.{topic}"


def transition_event(before: str | None, after: str, heartbeat_age: float | None) -> str | None:
    """The event a node's state change is worth, if any (idle and busy alternate without one)."""
    if before is None or before == after:
        return None
    if after == "dead":
        # A node that said "stopped" on its way out is dead with a fresh heartbeat; a killed one fell silent.
        return "node_stopped" if heartbeat_age is not None and heartbeat_age < 2.0 else "node_died"
    if after == "stale":
        return "node_stale"
    if after == "draining":
        return "node_draining"
    if before in ("dead", "stale"):
        return "node_joined" if before == "dead" else "node_recovered"
    if before == "draining":
        return "node_enabled"
    return None


def browser_node(node: dict[str, Any]) -> dict[str, Any]:
    """A node as the pages show it: the API's fields plus the heartbeat's epoch time (the page ages it
    live), how many requests it runs and its prefix-cache hit rate in percent."""
    beat, running, hits = node.get("last_heartbeat"), node.get("running"), node.get("prefix_cache_hit_rate")
    return {**node, "heartbeat_ts": datetime.fromisoformat(beat).timestamp() if beat else None,
            "running_count": len(running.split(",")) if running else 0,
            "prefix_cache_hit_pct": round(100 * hits, 1) if hits is not None else None}


def engine_totals(nodes: list[dict[str, Any]]) -> dict[str, int | None]:
    """KV blocks in use and in all, and sequences running, summed over the live nodes that report them;
    None when none does (old engines). A dead node's last heartbeat lingers: it is not counted."""

    def total(field: str) -> int | None:
        values = [n[field] for n in nodes if n["state"] in LIVE and n.get(field) is not None]
        return sum(values) if values else None

    return {"kv_used": total("kv_blocks_used"), "kv_total": total("kv_blocks_total"),
            "batch": total("batch_size")}


class Pulse:
    """Samples and broadcasts; ``tick`` is synchronous (database, Redis), ``broadcast`` sends."""

    def __init__(self) -> None:
        self.states: dict[tuple[str, str], str] = {}
        self.after: dict[str, str] = {}  # the last event id sent, per topic
        self.counted: dict[str, tuple[float, dict[str, int]]] = {}  # per topic: when, counters then

    # -- the lease ------------------------------------------------------------------------------
    @cached_property
    def lease(self) -> Lease:
        return Lease(get_store().redis, LEASE_KEY, LEASE_MS)

    def hold_lease(self) -> bool:
        """Take the lease when free, renew it when ours (one atomic step: no two holders after a handover)."""
        return self.lease.hold()

    def release_lease(self) -> None:
        self.lease.release()

    # -- sampling -------------------------------------------------------------------------------
    def tick(self) -> list[tuple[str, dict[str, Any]]]:
        """One sample of every topic: the (group, message) pairs to send."""
        now = time.time()
        members: dict[str, list[Node]] = defaultdict(list)
        for node in Node.objects.select_related("topic").order_by("name"):
            members[node.topic.name].append(node)
        messages, summaries, every_node = [], [], []
        topics = list(Topic.objects.order_by("name"))
        for topic in topics:
            try:
                update = self.sample_topic(topic, members[topic.name], now)
            except (RedisError, TopicRedisUnavailable) as exc:  # one topic down must not blank the others
                update = unavailable(topic, members[topic.name], now, exc)
            messages.append((topic_group(topic.name), update))
            summaries.append(topic_summary(topic, update))
            every_node += update["nodes"]
        messages.append((CLUSTER_GROUP, {"type": "cluster", "at": now, "topics": summaries,
                                         "nodes": every_node}))
        self.forget_all_but({topic.name for topic in topics},
                            {(topic, node.name) for topic, nodes in members.items() for node in nodes})
        return messages

    def forget_all_but(self, topics: set[str], nodes: set[tuple[str, str]]) -> None:
        """Drop what it remembers of deleted nodes and topics (one made again later is seen afresh)."""
        self.states = {key: state for key, state in self.states.items() if key in nodes}
        self.after = {topic: eid for topic, eid in self.after.items() if topic in topics}
        self.counted = {topic: seen for topic, seen in self.counted.items() if topic in topics}

    def sample_topic(self, topic: Topic, nodes: list[Node], now: float) -> dict[str, Any]:
        telemetry = get_topic_telemetry(topic)
        described = describe_for_browser(nodes)
        self.note_transitions(telemetry, topic.name, described)
        waiting = telemetry.waiting_count(topic.name)
        point = self.maybe_point(telemetry, topic.name, described, waiting, now)
        after = self.after.get(topic.name)
        if after is None:  # first sight: the page's hello carries the recent ones
            events, self.after[topic.name] = [], telemetry.last_event_id(topic.name)
        else:
            events = telemetry.events(topic.name, after=after, count=200)
            if events:
                self.after[topic.name] = events[-1]["id"]
        return topic_message(topic, now, described, waiting, point, events)

    def note_transitions(self, telemetry: Telemetry, topic: str, nodes: list[dict[str, Any]]) -> None:
        for node in nodes:
            key = (topic, node["name"])
            before, after = self.states.get(key), node["state"]
            self.states[key] = after
            kind = transition_event(before, after, node.get("heartbeat_age_s"))
            if kind:
                telemetry.add_event(topic, kind, node=node["name"], role=node["role"], state=after,
                                was=before)

    def maybe_point(self, telemetry: Telemetry, topic: str, nodes: list[dict[str, Any]], waiting: int,
                    now: float) -> dict[str, Any] | None:
        """Once a second: requests and tokens per second since the last point, queue depth, load, KV
        blocks and batch size."""
        previous = self.counted.get(topic)
        if previous is not None and now - previous[0] < POINT_S:
            return None  # the counters are read once a second, not on every tick
        counters = telemetry.counters(topic)
        self.counted[topic] = (now, counters)
        if previous is None:
            return None  # a rate needs two readings
        seconds, before = now - previous[0], previous[1]

        def rate(*fields: str) -> float:
            return max(0, sum(counters.get(f, 0) - before.get(f, 0) for f in fields)) / seconds

        point = {"t": round(now, 3), "rps": round(rate(*RequestStatus.finals()), 2),
                 "submitted_ps": round(rate("submitted"), 2), "tps": round(rate("tokens"), 1),
                 "queue": waiting, "load": {n["name"]: n["load_score"] for n in nodes},
                 **engine_totals(nodes)}
        telemetry.record_point(topic, point)
        return point

    # -- running --------------------------------------------------------------------------------
    async def broadcast(self, layer=None) -> list[tuple[str, dict[str, Any]]]:
        """One tick, sent. Tests call this directly; the thread below calls it on a timer."""
        from channels.db import database_sync_to_async

        layer = layer or get_channel_layer()
        messages = await database_sync_to_async(self.tick)()
        for group, message in messages:
            await layer.group_send(group, {"type": "live.update", "message": message})
        return messages


def unavailable(topic: Topic, nodes: list[Node], now: float, exc: Exception) -> dict[str, Any]:
    """What the pages get for a topic whose Redis does not answer: its nodes as the database knows them
    (state unknown) and the error, naming where its Redis is (never its password)."""
    if not isinstance(exc, TopicRedisUnavailable):
        exc = TopicRedisUnavailable.of(topic.name, topic_url(topic), exc)
    error = exc.message
    log.warning("pulse: %s", error)
    return topic_message(topic, now, known_rows(nodes), error=error)


def topic_message(topic: Topic, now: float, nodes: list[dict[str, Any]], waiting: int | None = None,
                  point: dict[str, Any] | None = None, events: list[dict[str, str]] | None = None,
                  **extra: Any) -> dict[str, Any]:
    """The one shape of a topic page's messages (the pulse's updates and the hello)."""
    return {"type": "topic", "topic": topic.name, "scheduler": topic.scheduler_name, "at": now,
            "nodes": nodes, "waiting": waiting, "point": point, "events": events or [], **extra}


def describe_for_browser(nodes: list[Node]) -> list[dict[str, Any]]:
    """The nodes with their live state (heartbeats, queues: the topic's Redis) as the pages show them."""
    return [browser_node(n) for n in describe_nodes(nodes)] if nodes else []


def known_rows(nodes: list[Node]) -> list[dict[str, Any]]:
    """The nodes as the database alone knows them, for when their topic's Redis does not answer."""
    return [{"name": n.name, "topic": n.topic.name, "role": n.role, "state": "unknown",
             "admin_state": n.admin_state, "requests_run": n.requests_run,
             "requests_stolen": n.requests_stolen, "heartbeat_ts": None, "running_count": 0,
             "prefix_cache_hit_pct": None, **engine_figures({})} for n in nodes]


def topic_summary(topic: Topic, update: dict[str, Any]) -> dict[str, Any]:
    nodes = update["nodes"]
    return {"name": topic.name, "scheduler": topic.scheduler_name, "nodes": len(nodes),
            "live_nodes": sum(1 for n in nodes if n["state"] in LIVE),
            "waiting": update["waiting"], "point": update["point"]}


def hello(topic_name: str | None) -> dict[str, Any]:
    """What a page gets the moment it connects: the same shape as the pulse's updates, plus the recent
    chart points and events of its topic, so a page (re)connecting never starts blank."""
    pulse = Pulse()
    now = time.time()
    if topic_name is None:
        return next(m for g, m in pulse.tick() if g == CLUSTER_GROUP)
    topic = Topic.objects.get(name=topic_name)
    nodes = list(Node.objects.filter(topic=topic).select_related("topic").order_by("name"))
    try:
        telemetry = get_topic_telemetry(topic)
        return topic_message(topic, now, describe_for_browser(nodes), telemetry.waiting_count(topic.name),
                             events=telemetry.events(topic.name, count=EVENTS_SENT),
                             series=telemetry.series(topic.name, SERIES_SENT), hello=True)
    except (RedisError, TopicRedisUnavailable) as exc:
        return {**unavailable(topic, nodes, now, exc), "series": [], "hello": True}


class PulseThread(threading.Thread):
    """Runs the pulse on its own event loop (one long-lived loop keeps the channel layer's connections)."""

    def __init__(self, interval: float = TICK_S) -> None:
        super().__init__(name="fd-pulse", daemon=True)
        self.interval = interval
        self.stopped = threading.Event()
        self.pulse = Pulse()

    def run(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        layer = get_channel_layer()
        while not self.stopped.is_set():
            started = time.monotonic()
            try:
                if self.pulse.hold_lease():
                    await self.pulse.broadcast(layer)
            except Exception:  # top-level loop: Redis or the database may come back
                log.exception("pulse tick failed")
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))
        try:
            self.pulse.release_lease()
        except Exception:
            log.exception("could not release the pulse lease")

    def stop(self) -> None:
        self.stopped.set()
