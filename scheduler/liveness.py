"""Node liveness from heartbeats: idle, busy, stale, draining or dead.

A node writes a heartbeat every ``HEARTBEAT_INTERVAL_S``; it is stale after three missed beats (it gets
no new work placed on it by schedulers that look at liveness) and dead after ``DEAD_AFTER_S``.
"""

from __future__ import annotations

import math
import time

from scheduler.config import SchedulerConfig

HEARTBEAT_INTERVAL_S = 1.0
STALE_AFTER_S = 3 * HEARTBEAT_INTERVAL_S
DEAD_AFTER_S = 6.0  # also when the scheduler moves a dead node's queue to live nodes
HEARTBEAT_KEY_TTL_S = 3600  # the key outlives death so the console can say how long ago it died


def limits(config: SchedulerConfig | None) -> tuple[float, float]:
    """(stale after, dead after) in seconds for a topic's published configuration (None: none yet)."""
    if config is not None and config.scheduler_name == "splitwise":
        return 3 * float(config.scheduler_sync_period), float(config.scheduler_expire_period)
    return STALE_AFTER_S, DEAD_AFTER_S


def heartbeat_time(heartbeat: dict[str, str]) -> float | None:
    """When the node last beat (Unix seconds), or None when it never did, or its time is unreadable:
    anyone who can write to Redis can write a heartbeat, and one bad hash must not fail every page, API
    call and scrape that reads the node (it reads as dead)."""
    try:
        ts = float(heartbeat["ts"])
    except (KeyError, TypeError, ValueError):
        return None
    return ts if math.isfinite(ts) else None


def heartbeat_age(heartbeat: dict[str, str], now: float | None = None) -> float | None:
    """Seconds since the node's last heartbeat, or None when it never sent one (or it expired)."""
    ts = heartbeat_time(heartbeat)
    return None if ts is None else max(0.0, (now or time.time()) - ts)


def node_state(heartbeat: dict[str, str], admin_state: str, now: float | None = None,
               stale_after: float = STALE_AFTER_S, dead_after: float = DEAD_AFTER_S) -> str:
    """The state the console shows for a node. Splitwise topics pass their own limits: stale after
    three ``scheduler_sync_period``, expired (shown dead) after ``scheduler_expire_period``."""
    age = heartbeat_age(heartbeat, now)
    if age is None or age > dead_after or heartbeat.get("state") == "stopped":
        return "dead"
    if age > stale_after:
        return "stale"
    if admin_state != "enabled":
        return "draining"
    return "busy" if heartbeat.get("state") == "busy" else "idle"
