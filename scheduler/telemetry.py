"""What the console watches of a topic: its event feed, its counters and its chart series.

The scripts write events (steals, expiries, failovers, node expiry) and counters (submitted, tokens,
one per final status) as they go; the console's pulse adds the node changes it notices and keeps one
chart point a second. All three are bounded: the event stream is capped, the series trimmed.
"""

from __future__ import annotations

import json
import time
from typing import Any

from redis import Redis

from scheduler import keys

SERIES_KEPT = 900  # chart points, one a second: the last 15 minutes


class Telemetry:
    """Reads and writes a topic's feed, counters and series in the topic's Redis."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def add_event(self, topic: str, kind: str, **fields: Any) -> None:
        """An event the console noticed itself (a node joined, went stale, died), beside the scripts'."""
        entry = {"kind": kind, "at": f"{time.time():.6f}", **{k: str(v) for k, v in fields.items()}}
        self.redis.xadd(keys.events(topic), entry, maxlen=keys.EVENTS_KEPT, approximate=True)

    def events(self, topic: str, after: str | None = None, count: int = 50) -> list[dict[str, str]]:
        """Events after the id ``after``, oldest first; without it the latest ``count``."""
        if after is None:
            raw = list(reversed(self.redis.xrevrange(keys.events(topic), count=count)))
        else:
            raw = self.redis.xrange(keys.events(topic), min=f"({after}", count=count)
        return [{"id": eid.decode(), **{k.decode(): v.decode() for k, v in fields.items()}}
                for eid, fields in raw]

    def last_event_id(self, topic: str) -> str:
        raw = self.redis.xrevrange(keys.events(topic), count=1)
        return raw[0][0].decode() if raw else "0-0"

    def counters(self, topic: str) -> dict[str, int]:
        """Running totals the scripts keep: submitted, tokens, and one per final status."""
        return {k.decode(): int(v) for k, v in self.redis.hgetall(keys.stats(topic)).items()}

    def record_point(self, topic: str, point: dict[str, Any], keep: int = SERIES_KEPT) -> None:
        """Append one chart point (newest first in Redis), keeping the last ``keep``."""
        key = keys.series(topic)
        with self.redis.pipeline() as pipe:
            pipe.lpush(key, json.dumps(point, separators=(",", ":")))
            pipe.ltrim(key, 0, keep - 1)
            pipe.execute()

    def series(self, topic: str, count: int = SERIES_KEPT) -> list[dict[str, Any]]:
        """The last ``count`` chart points, oldest first."""
        return [json.loads(item) for item in reversed(self.redis.lrange(keys.series(topic), 0, count - 1))]

    def waiting_count(self, topic: str) -> int:
        """Requests waiting anywhere in the topic: node queues and the splitwise pending list."""
        return int(self.redis.zcard(keys.waiting(topic)))
