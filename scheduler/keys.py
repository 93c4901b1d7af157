"""Every Redis key name, built in one place.

All keys of a topic carry the Redis Cluster hash tag ``{topic}`` so that each Lua script touches one
slot. rq's own keys are ``rq:queue:<queue name>``; a node's queue name embeds the same hash tag, so its
list lands in the topic's slot too.
"""

from __future__ import annotations

PREFIX = "fd"
RQ_QUEUE_PREFIX = "rq:queue:"
TOPICS = f"{PREFIX}:topics"  # set of topic names known to the cluster (the reaper walks it)


def _topic(topic: str) -> str:
    return f"{PREFIX}:{{{topic}}}"


def request(topic: str, uid: str) -> str:
    """Hash: the live state of one request (the authority while it is in flight)."""
    return f"{_topic(topic)}:req:{uid}"


def output(topic: str, uid: str) -> str:
    """Stream: the request's tokens, then one ``done`` entry; read by SSE clients from any point."""
    return f"{_topic(topic)}:out:{uid}"


def waiting(topic: str) -> str:
    """Sorted set: uid -> enqueue time of every request still waiting (for TTL eviction)."""
    return f"{_topic(topic)}:waiting"


def config(topic: str) -> str:
    """String: the topic's scheduler configuration as JSON, published on every save."""
    return f"{_topic(topic)}:config"


def round_robin(topic: str) -> str:
    """Counter for round-robin placement over the topic's enabled nodes."""
    return f"{_topic(topic)}:rr"


def heartbeat(topic: str, node: str) -> str:
    """Hash: a node's last heartbeat (host, pid, device, state, time); expires when the node is silent."""
    return f"{_topic(topic)}:hb:{node}"


def node_queue_name(topic: str, node: str) -> str:
    """The rq queue name of a node (rq stores it under ``rq:queue:<name>``)."""
    return f"{_topic(topic)}:node:{node}"


def rq_queue(queue_name: str) -> str:
    """rq's list key for a queue name."""
    return RQ_QUEUE_PREFIX + queue_name
