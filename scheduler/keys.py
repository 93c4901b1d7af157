"""Every Redis key name, built in one place (for Python here; the Lua scripts get the same suffixes).

All keys of a topic start with ``fd:{topic}:``; the ``{topic}`` hash tag puts them in one Redis Cluster
slot, so each script touches one slot. A node's queue is an rq queue named ``fd:{topic}:node:<name>``;
rq keeps it under ``rq:queue:<name>``, which carries the same hash tag.
"""

from __future__ import annotations

import bisect

PREFIX = "fd"
RQ_QUEUE_PREFIX = "rq:queue:"
TOPICS = f"{PREFIX}:topics"  # set of topic names known to the cluster (the reaper walks it)

# Suffixes after the topic prefix, shared by the Python builders and the Lua ones.
REQ, OUT, WAITING, CONFIG, RR, HB = "req:", "out:", "waiting", "config", "rr", "hb:"
NODE, LOAD, INFLIGHT, ALIVE, BELL, RESULTS = "node:", "load:", "inflight", "alive", "bell:", "results:"
IDS, CRC, KV, SCHED = "ids", "crc", "kv:", "sched"
ROLES, PDLOAD, PENDING, SEEN, CHARGES = "roles", "pdload", "pending", "seen", "charges"
EVENTS, STATS, SERIES, METRICS = "events", "stats", "series", "metrics"
EVENTS_KEPT = 1000  # the event stream is capped at about this many entries
RETENTION_S = 3600  # how long Redis keeps a finished request's hash and stream once the database has it


def topic_prefix(topic: str) -> str:
    return f"{PREFIX}:{{{topic}}}:"


def request(topic: str, uid: str) -> str:
    """Hash: the live state of one request (the authority while it is in flight)."""
    return topic_prefix(topic) + REQ + uid


def output(topic: str, uid: str) -> str:
    """Stream: the request's tokens, then one ``done`` entry; read by SSE clients from any point."""
    return topic_prefix(topic) + OUT + uid


def waiting(topic: str) -> str:
    """Sorted set: uid -> time it (last) entered a queue, for TTL eviction."""
    return topic_prefix(topic) + WAITING


def config(topic: str) -> str:
    """String: the topic's scheduler configuration as JSON, published on every save."""
    return topic_prefix(topic) + CONFIG


def scheduling_config(topic: str) -> str:
    """String: the few parameters the scripts read on every call, as small JSON (beside ``config``)."""
    return topic_prefix(topic) + SCHED


def round_robin(topic: str) -> str:
    """Counter for round-robin placement over the topic's enabled nodes."""
    return topic_prefix(topic) + RR


def heartbeat(topic: str, node: str) -> str:
    """Hash: a node's last heartbeat (host, pid, device, state, time)."""
    return topic_prefix(topic) + HB + node


def load_table(topic: str, shard: int) -> str:
    """Sorted set: node -> load score (requests waiting in its queue), one per shard."""
    return topic_prefix(topic) + LOAD + str(shard)


def inflight(topic: str) -> str:
    """Sorted set: uid -> lease deadline of every running request."""
    return topic_prefix(topic) + INFLIGHT


def alive(topic: str) -> str:
    """Sorted set: node -> time of its last heartbeat (live nodes for failover and re-homing)."""
    return topic_prefix(topic) + ALIVE


def bell(topic: str, node: str) -> str:
    """List of at most one element: rung when work lands in the node's queue, so it wakes at once."""
    return topic_prefix(topic) + BELL + node


def results(topic: str, origin: str) -> str:
    """List: result JSON for the requests an origin put through the scheduler interface."""
    return topic_prefix(topic) + RESULTS + origin


def request_ids(topic: str) -> str:
    """Hash: client request id -> uid of every request in flight (ids are unique per topic)."""
    return topic_prefix(topic) + IDS


def node_crcs(topic: str) -> str:
    """Hash: node -> CRC-16 of its name (one entry per node name; the scripts' shard lookup)."""
    return topic_prefix(topic) + CRC


def kv_handoff(topic: str, uid: str) -> str:
    """String: the KV cache a prefill node hands to a decode node (safetensors bytes, with a TTL)."""
    return topic_prefix(topic) + KV + uid


def roles(topic: str) -> str:
    """Hash: node -> role (prefill, decode, mixed), written by each node's heartbeat."""
    return topic_prefix(topic) + ROLES


def pd_load(topic: str) -> str:
    """Hash: node -> splitwise load (prompt tokens in flight on prefill and mixed nodes, requests in
    flight on decode nodes)."""
    return topic_prefix(topic) + PDLOAD


def pending(topic: str) -> str:
    """List: splitwise requests waiting for an eligible prefill or decode node (TTL still applies)."""
    return topic_prefix(topic) + PENDING


def seen(topic: str) -> str:
    """Sorted set: node -> time of its last heartbeat, whatever its admin state (splitwise expiry)."""
    return topic_prefix(topic) + SEEN


def charges(topic: str) -> str:
    """Sorted set: uid -> when its splitwise load charge was last confirmed (the leak guard)."""
    return topic_prefix(topic) + CHARGES


def events(topic: str) -> str:
    """Stream, capped: what the console's event feed shows (steals, expiries, failovers, node changes)."""
    return topic_prefix(topic) + EVENTS


def stats(topic: str) -> str:
    """Hash: running counters (requests submitted, tokens streamed, requests ended by status)."""
    return topic_prefix(topic) + STATS


def metrics(topic: str) -> str:
    """Hash: what ``/metrics`` reads beside ``stats``. Counters (``steals``, ``prompt_tokens``,
    ``preemptions``, ``handoff_bytes``, ``failovers:<reason>``, ``rejections:<reason>``) and, per
    histogram of ``HISTOGRAM_BUCKETS``, one count per bucket (``<name>:<le>``, not cumulative: the
    console sums them when scraped) and the sum of what it observed (``<name>:sum``, seconds). A fixed
    set of fields: it needs no TTL."""
    return topic_prefix(topic) + METRICS


def series(topic: str) -> str:
    """List, trimmed: one JSON point per second (rates, queue depth, load per node) for the charts."""
    return topic_prefix(topic) + SERIES


def node_queue_name(topic: str, node: str) -> str:
    """The rq queue name of a node (rq stores it under ``rq:queue:<name>``)."""
    return topic_prefix(topic) + NODE + node


def rq_queue(queue_name: str) -> str:
    """rq's list key for a queue name."""
    return RQ_QUEUE_PREFIX + queue_name


# Histogram bucket upper bounds in seconds, per histogram of the ``metrics`` hash (after vLLM's, for
# LLM serving): time to first token, inter-token latency, end-to-end latency, time queued before the
# first claim, and the KV cache's handoff from a prefill node. Past the last bound is ``+Inf``.
HISTOGRAM_BUCKETS: dict[str, tuple[float, ...]] = {
    "ttft": (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40,
             80),
    "itl": (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5,
            10),
    "e2e": (0.05, 0.1, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960),
    "queue": (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640),
    "handoff": (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
}
OVERFLOW = "+Inf"  # the bucket past the last bound
SUM = "sum"


def bucket_labels(name: str) -> list[str]:
    """The ``le`` of each bucket of histogram ``name`` as its field names spell it, ``+Inf`` last."""
    return [f"{bound:g}" for bound in HISTOGRAM_BUCKETS[name]] + [OVERFLOW]


def histogram_field(name: str, le: str) -> str:
    """The ``metrics`` field of bucket ``le`` (a ``bucket_labels`` entry, or ``SUM``) of histogram
    ``name``."""
    return f"{name}:{le}"


def bucket_field(name: str, seconds: float) -> str:
    """The ``metrics`` field of the one bucket an observation of ``seconds`` goes to (as the Lua's
    ``observe`` picks it: the first bound at or above it)."""
    bounds = HISTOGRAM_BUCKETS[name]
    index = bisect.bisect_left(bounds, seconds)
    return histogram_field(name, f"{bounds[index]:g}" if index < len(bounds) else OVERFLOW)


def lua_constants() -> dict[str, str | int]:
    """The suffixes and limits the Lua scripts build keys from (``KEY_REQ``, ``RQ_QUEUE_PREFIX``...);
    ``lua/helpers.lua`` turns them into key names as the builders above do."""
    suffixes = {"REQ": REQ, "OUT": OUT, "NODE": NODE, "LOAD": LOAD, "BELL": BELL, "RESULTS": RESULTS,
                "WAITING": WAITING, "INFLIGHT": INFLIGHT, "ALIVE": ALIVE, "IDS": IDS, "CRC": CRC,
                "SCHED": SCHED, "ROLES": ROLES, "PDLOAD": PDLOAD, "PENDING": PENDING, "SEEN": SEEN,
                "CHARGES": CHARGES, "EVENTS": EVENTS, "STATS": STATS, "METRICS": METRICS}
    # Each histogram's bounds as one string, "0.001:0.005:...": the Lua walks it with gmatch.
    buckets = {f"BUCKETS_{name.upper()}": ":".join(bucket_labels(name)[:-1]) for name in HISTOGRAM_BUCKETS}
    return {**{f"KEY_{name}": value for name, value in suffixes.items()},
            "RQ_QUEUE_PREFIX": RQ_QUEUE_PREFIX, "EVENTS_KEPT": EVENTS_KEPT, **buckets}
