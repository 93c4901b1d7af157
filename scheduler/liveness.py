"""Node liveness from heartbeats: idle, busy, stale, draining or dead.

A node writes a heartbeat every ``HEARTBEAT_INTERVAL_S``; it is stale after three missed beats (it gets
no new work placed on it by schedulers that look at liveness) and dead after ``DEAD_AFTER_S``.
"""

from __future__ import annotations

import time

HEARTBEAT_INTERVAL_S = 1.0
STALE_AFTER_S = 3 * HEARTBEAT_INTERVAL_S
DEAD_AFTER_S = 6.0  # also when the scheduler moves a dead node's queue to live nodes
HEARTBEAT_KEY_TTL_S = 3600  # the key outlives death so the console can say how long ago it died


def heartbeat_age(heartbeat: dict[str, str], now: float | None = None) -> float | None:
    """Seconds since the node's last heartbeat, or None when it never sent one (or it expired)."""
    if "ts" not in heartbeat:
        return None
    return max(0.0, (now or time.time()) - float(heartbeat["ts"]))


def node_state(heartbeat: dict[str, str], admin_state: str, now: float | None = None) -> str:
    """The state the console shows for a node."""
    age = heartbeat_age(heartbeat, now)
    if age is None or age > DEAD_AFTER_S or heartbeat.get("state") == "stopped":
        return "dead"
    if age > STALE_AFTER_S:
        return "stale"
    if admin_state != "enabled":
        return "draining"
    return "busy" if heartbeat.get("state") == "busy" else "idle"
