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

Each topic Redis is sampled on a thread of its own (``RedisSampler``), and a tick waits at most
``STALL_S`` for the samples: a Redis that does not answer delays only its own topics, whose pages (and
rows on the cluster page) say that it is not answering, and where it is, until it answers again; the
other topics keep their updates every tick. A sample of a Redis already known not to answer is not
waited for at all: its result, when it comes, goes out with a later tick.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property, partial
from typing import Any

from channels.layers import get_channel_layer
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from fdconsole.errors import TopicRedisUnavailable
from fdconsole.nodes.models import Node
from fdconsole.nodes.status import describe_nodes, engine_figures, exit_record
from fdconsole.redis_conn import get_store, get_topic_telemetry, topic_url
from fdconsole.topics.models import Topic
from scheduler.connection import describe, redact
from scheduler.lease import Lease
from scheduler.status import RequestStatus
from scheduler.telemetry import Telemetry

log = logging.getLogger(__name__)
TICK_S = 0.2  # a heartbeat reaches the browser within about this (plus the heartbeat's own period)
# How long a tick waits for a topic Redis's sample: one not in by then is not answering, for now. A
# live Redis answers a sample (a few reads) in milliseconds; the other topics' pages wait no longer
# than this, so they update within TICK_S + STALL_S even in the tick where one Redis stops answering.
STALL_S = 0.5
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


@dataclass
class Snapshot:
    """What the database says at one tick: the topics, and each topic's nodes."""

    now: float  # time.time() of the tick
    topics: list[Topic]
    members: dict[str, list[Node]]  # topic name -> its nodes

    @classmethod
    def read(cls) -> Snapshot:
        members: dict[str, list[Node]] = defaultdict(list)
        for node in Node.objects.select_related("topic").order_by("name"):
            members[node.topic.name].append(node)
        return cls(time.time(), list(Topic.objects.order_by("name")), members)

    @classmethod
    def of_topic(cls, name: str) -> Snapshot:
        topic = Topic.objects.get(name=name)
        nodes = list(Node.objects.filter(topic=topic).select_related("topic").order_by("name"))
        return cls(time.time(), [topic], {topic.name: nodes})

    def by_url(self) -> dict[str, list[Topic]]:
        """The topics grouped by their Redis."""
        groups: dict[str, list[Topic]] = defaultdict(list)
        for topic in self.topics:
            groups[topic_url(topic)].append(topic)
        return groups


class RedisSampler:
    """Samples the topics of one Redis on a thread of its own, one sample at a time, so that a Redis
    that does not answer holds up only its own topics. Each call fails within the client's read
    timeout (``scheduler.connection.READ_TIMEOUT_S``); the next sample tries again."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fd-pulse-sample")
        self.pending: Future | None = None
        self.started = 0.0  # time.monotonic() the pending sample started at
        self.down_since: float | None = None  # time.time() it stopped answering; None while it answers
        self.errors: dict[str, str] = {}  # per topic: why its last sample failed

    def start(self, sample: Callable[[], dict[str, dict[str, Any]]]) -> Future | None:
        """Starts ``sample`` unless one is under way; the future to wait for, None when there is none
        worth waiting for (one under way, or a Redis known not to answer)."""
        if self.pending is None:
            self.pending, self.started = self.executor.submit(sample), time.monotonic()
            return self.pending if self.down_since is None else None
        return None

    def updates(self, topics: list[Topic], snapshot: Snapshot) -> dict[str, dict[str, Any]]:
        """Each of ``topics``' message: the sample's when it is in, else one saying where its Redis is
        and that it is not answering (the last error again while a new try is young)."""
        now = snapshot.now
        if self.pending is not None and self.pending.done():
            done, self.pending = self.pending, None
            result = done.result() if done.exception() is None else failed(topics, snapshot, done.exception())
            self.errors = {name: update["error"] for name, update in result.items() if update.get("error")}
            self.note_down(now, next(iter(self.errors.values()), None))
            return {t.name: result.get(t.name) or topic_message(t, now, known_rows(snapshot.members[t.name]))
                    for t in topics}
        waited = time.monotonic() - self.started if self.pending is not None else 0.0
        updates = {}
        for topic in topics:
            error = self.errors.get(topic.name) if waited < STALL_S else None
            if error is None:
                error = not_answering(topic, f"no reply for {now - (self.down_since or now - waited):.1f} s")
            updates[topic.name] = topic_message(topic, now, known_rows(snapshot.members[topic.name]),
                                                error=error)
        self.note_down(now - waited, updates[topics[0].name]["error"])  # a Redis's topics: never none
        return updates

    def note_down(self, since: float, error: str | None) -> None:
        """Whether it answers (``error`` None) or not; logged when that changes, not at every tick."""
        if error is not None and self.down_since is None:
            self.down_since = since
            log.warning("pulse: %s", error)
        elif error is None and self.down_since is not None:
            log.warning("pulse: the Redis at %s answers again after %.0f s", describe(self.url),
                        time.time() - self.down_since)
            self.down_since = None

    def close(self) -> None:
        """Lets its thread go (one waiting on a Redis that does not answer ends within the read timeout)."""
        self.executor.shutdown(wait=False, cancel_futures=True)


class Pulse:
    """Samples and broadcasts; ``tick`` is synchronous (database, Redis), ``broadcast`` sends."""

    def __init__(self) -> None:
        # Written by the samplers' threads, one topic's entries by one thread at a time.
        self.states: dict[tuple[str, str], str] = {}
        self.after: dict[str, str] = {}  # the last event id sent, per topic
        self.counted: dict[str, tuple[float, dict[str, int]]] = {}  # per topic: when, counters then
        self.samplers: dict[str, RedisSampler] = {}  # by topic Redis URL

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
        """One sample of every topic: the (group, message) pairs to send (waits up to ``STALL_S``)."""
        snapshot = Snapshot.read()
        wait(self.start_samples(snapshot), timeout=STALL_S)
        return self.messages(snapshot)

    def start_samples(self, snapshot: Snapshot) -> list[Future]:
        """Starts a sample of each topic Redis that has none under way; the ones worth waiting for."""
        groups = snapshot.by_url()
        for url in [url for url in self.samplers if url not in groups]:
            self.samplers.pop(url).close()
        futures = []
        for url, topics in groups.items():
            sampler = self.samplers.get(url)
            if sampler is None:
                sampler = self.samplers[url] = RedisSampler(url)
            future = sampler.start(partial(self.sample_topics, topics, snapshot))
            if future is not None:
                futures.append(future)
        return futures

    def sample_topics(self, topics: list[Topic], snapshot: Snapshot) -> dict[str, dict[str, Any]]:
        """The message of each of ``topics`` (all in one Redis), read on its sampler's thread."""
        updates = {}
        for topic in topics:
            nodes = snapshot.members[topic.name]
            try:
                updates[topic.name] = self.sample_topic(topic, nodes, snapshot.now)
            except (RedisError, TopicRedisUnavailable) as exc:  # one topic down must not blank the others
                updates[topic.name] = unavailable(topic, nodes, snapshot.now, exc)
        return updates

    def messages(self, snapshot: Snapshot) -> list[tuple[str, dict[str, Any]]]:
        """The tick's messages: each topic's page, then the cluster page (no database, no Redis)."""
        updates: dict[str, dict[str, Any]] = {}
        for url, topics in snapshot.by_url().items():
            updates.update(self.samplers[url].updates(topics, snapshot))
        messages, summaries, every_node = [], [], []
        for topic in snapshot.topics:
            update = updates[topic.name]
            messages.append((topic_group(topic.name), update))
            summaries.append(topic_summary(topic, update))
            every_node += update["nodes"]
        messages.append((CLUSTER_GROUP, {"type": "cluster", "at": snapshot.now, "topics": summaries,
                                         "nodes": every_node}))
        self.forget_all_but({topic.name for topic in snapshot.topics},
                            {(name, node.name) for name, nodes in snapshot.members.items() for node in nodes})
        return messages

    def forget_all_but(self, topics: set[str], nodes: set[tuple[str, str]]) -> None:
        """Drop what it remembers of deleted nodes and topics (one made again later is seen afresh).
        In place: the samplers' threads write to these."""
        for key in [key for key in list(self.states) if key not in nodes]:
            self.states.pop(key, None)
        for remembered in (self.after, self.counted):
            for topic in [topic for topic in list(remembered) if topic not in topics]:
                remembered.pop(topic, None)

    def close(self) -> None:
        for sampler in self.samplers.values():
            sampler.close()
        self.samplers.clear()

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

    async def sample(self, snapshot: Snapshot) -> list[tuple[str, dict[str, Any]]]:
        """``tick`` after its database read, waiting for the samples on a thread of the loop's own
        executor rather than the one that database calls share (``database_sync_to_async``'s): a
        Redis that does not answer never holds up the consumers' database calls."""
        await wait_off_loop(self.start_samples(snapshot))
        return self.messages(snapshot)

    # -- running --------------------------------------------------------------------------------
    async def broadcast(self, layer=None) -> list[tuple[str, dict[str, Any]]]:
        """One tick, sent. Tests call this directly; the thread below calls it on a timer."""
        from channels.db import database_sync_to_async

        layer = layer or get_channel_layer()
        messages = await self.sample(await database_sync_to_async(Snapshot.read)())
        for group, message in messages:
            await layer.group_send(group, {"type": "live.update", "message": message})
        return messages


def unavailable(topic: Topic, nodes: list[Node], now: float, exc: Exception) -> dict[str, Any]:
    """What the pages get for a topic whose Redis does not answer: its nodes as the database knows them
    (state unknown) and the error, naming where its Redis is (never its password)."""
    timeout = exc if isinstance(exc, RedisTimeoutError) else exc.__cause__
    if isinstance(timeout, RedisTimeoutError):  # it accepted (or not) and never replied
        error = not_answering(topic, redact(str(timeout), topic_url(topic)))
    else:
        if not isinstance(exc, TopicRedisUnavailable):
            exc = TopicRedisUnavailable.of(topic.name, topic_url(topic), exc)
        error = exc.message
    return topic_message(topic, now, known_rows(nodes), error=error)


def failed(topics: list[Topic], snapshot: Snapshot, exc: BaseException) -> dict[str, dict[str, Any]]:
    """The messages of a sample that raised what no Redis failure raises (a defect): logged, and said."""
    log.error("pulse: sampling %s failed", ", ".join(t.name for t in topics), exc_info=exc)
    return {t.name: topic_message(t, snapshot.now, known_rows(snapshot.members[t.name]),
                                  error=f"the console could not sample topic '{t.name}' (see its log)")
            for t in topics}


def not_answering(topic: Topic, why: str) -> str:
    """The pages' notice for a topic whose Redis does not reply: where it is (never its password)."""
    return f"the Redis of topic '{topic.name}' at {describe(topic_url(topic))} is not answering ({why})"


def topic_message(topic: Topic, now: float, nodes: list[dict[str, Any]], waiting: int | None = None,
                  point: dict[str, Any] | None = None, events: list[dict[str, str]] | None = None,
                  **extra: Any) -> dict[str, Any]:
    """The one shape of a topic page's messages (the pulse's updates and the hello)."""
    return {"type": "topic", "topic": topic.name, "scheduler": topic.scheduler_name, "at": now,
            "nodes": nodes, "waiting": waiting, "point": point, "events": events or [], **extra}


def describe_live(topics: list[Topic], members: dict[str, list[Node]]) -> dict[str, dict[str, Any]]:
    """Each topic's nodes as the pages show them, per topic name: a message with ``nodes`` and, when
    its Redis did not answer within ``STALL_S`` (each Redis is read on a thread of its own), the nodes
    as the database knows them and an ``error`` saying so (what a page renders before its feed)."""
    snapshot = Snapshot(time.time(), topics, members)
    groups = snapshot.by_url()
    samplers = {url: RedisSampler(url) for url in groups}
    try:
        wait([samplers[url].start(partial(nodes_of, group, snapshot)) for url, group in groups.items()],
             timeout=STALL_S)
        return {name: update for url, group in groups.items()
                for name, update in samplers[url].updates(group, snapshot).items()}
    finally:
        for sampler in samplers.values():
            sampler.close()


def nodes_of(topics: list[Topic], snapshot: Snapshot) -> dict[str, dict[str, Any]]:
    """The nodes of ``topics`` (all in one Redis) with their live state (a sample, for ``describe_live``)."""
    updates = {}
    for topic in topics:
        nodes = snapshot.members[topic.name]
        try:
            updates[topic.name] = topic_message(topic, snapshot.now, describe_for_browser(nodes))
        except (RedisError, TopicRedisUnavailable) as exc:
            updates[topic.name] = unavailable(topic, nodes, snapshot.now, exc)
    return updates


def describe_for_browser(nodes: list[Node]) -> list[dict[str, Any]]:
    """The nodes with their live state (heartbeats, queues: the topic's Redis) as the pages show them."""
    return [browser_node(n) for n in describe_nodes(nodes)] if nodes else []


def known_rows(nodes: list[Node]) -> list[dict[str, Any]]:
    """The nodes as the database alone knows them, for when their topic's Redis does not answer."""
    return [{"name": n.name, "topic": n.topic.name, "role": n.role, "state": "unknown",
             "admin_state": n.admin_state, "requests_run": n.requests_run,
             "requests_stolen": n.requests_stolen, "heartbeat_ts": None, "running_count": 0,
             "prefix_cache_hit_pct": None, **exit_record(n), **engine_figures({})} for n in nodes]


def topic_summary(topic: Topic, update: dict[str, Any]) -> dict[str, Any]:
    nodes = update["nodes"]
    return {"name": topic.name, "scheduler": topic.scheduler_name, "nodes": len(nodes),
            "live_nodes": sum(1 for n in nodes if n["state"] in LIVE),
            "waiting": update["waiting"], "point": update["point"],
            "redis": describe(topic_url(topic)), "error": update.get("error")}


async def hello(topic_name: str | None) -> dict[str, Any]:
    """What a page gets the moment it connects: the same shape as the pulse's updates, plus the recent
    chart points and events of its topic, so a page (re)connecting never starts blank. Waits at most
    ``STALL_S`` for a topic Redis, as a tick does."""
    from channels.db import database_sync_to_async

    if topic_name is None:
        pulse = Pulse()
        try:
            messages = await pulse.sample(await database_sync_to_async(Snapshot.read)())
        finally:
            pulse.close()
        return next(message for group, message in messages if group == CLUSTER_GROUP)
    snapshot = await database_sync_to_async(Snapshot.of_topic)(topic_name)
    [topic] = snapshot.topics
    sampler = RedisSampler(topic_url(topic))
    try:
        await wait_off_loop([sampler.start(partial(topic_hello, topic, snapshot.members[topic.name],
                                                   snapshot.now))])
        return {"series": [], **sampler.updates([topic], snapshot)[topic.name], "hello": True}
    finally:
        sampler.close()


async def wait_off_loop(futures: list[Future]) -> None:
    """Waits up to ``STALL_S`` for ``futures`` (samples) on a thread of the loop's default executor."""
    if futures:
        await asyncio.get_running_loop().run_in_executor(None, partial(wait, futures, timeout=STALL_S))


def topic_hello(topic: Topic, nodes: list[Node], now: float) -> dict[str, dict[str, Any]]:
    """A topic page's hello, read from its Redis (a sample, as ``RedisSampler`` runs them)."""
    try:
        telemetry = get_topic_telemetry(topic)
        message = topic_message(topic, now, describe_for_browser(nodes), telemetry.waiting_count(topic.name),
                                events=telemetry.events(topic.name, count=EVENTS_SENT),
                                series=telemetry.series(topic.name, SERIES_SENT))
    except (RedisError, TopicRedisUnavailable) as exc:
        message = unavailable(topic, nodes, now, exc)
    return {topic.name: message}


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
        self.pulse.close()
        try:
            self.pulse.release_lease()
        except Exception:
            log.exception("could not release the pulse lease")

    def stop(self) -> None:
        self.stopped.set()
