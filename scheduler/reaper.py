"""The reaper: TTL eviction, failover and each mode's upkeep, on a timer.

It runs in the console and in every node, so a request expires whether or not any worker is running,
and the work of a dead node moves on even when no console runs. Several reapers are harmless: each
step is one atomic script, and one pass over a topic is one round trip (``upkeep``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from redis.exceptions import RedisError

from scheduler import failover, global_, scripts, splitwise
from scheduler.store import RequestStore

log = logging.getLogger(__name__)
REAP_INTERVAL_S = 0.25  # expired requests get their final status within this of their deadline


@dataclass(frozen=True)
class Upkeep:
    """What one reaper pass did to a topic."""

    recovered: list[tuple[str, str]]  # (uid, node it went to) of work whose lease ran out
    off_expired: int  # splitwise: requests moved off expired nodes
    placed: int  # splitwise: waiting requests placed
    rehomed: int  # global: requests moved from dead nodes' queues
    expired: list[str]  # uids evicted by their TTL


def upkeep(store: RequestStore, topic: str) -> Upkeep:
    """One pass over ``topic`` in one round trip: failover of expired leases, splitwise upkeep and
    pending placement, global re-homing, then TTL eviction (in that order). Each script does nothing
    in the modes it is not for."""
    recovered, off_expired, placed, rehomed, expired = store.runner.run_scripts([
        failover.recover_call(topic, 500),
        splitwise.upkeep_call(topic, 1000),
        splitwise.place_pending_call(topic, 500),
        global_.rehome_call(topic, 1000),
        scripts.EXPIRE_DUE.call(topic, limit=500),
    ])
    return Upkeep(failover.recovered(recovered), int(off_expired), int(placed), int(rehomed),
                  [uid.decode() for uid in expired])


class Reaper(threading.Thread):
    def __init__(self, stores: RequestStore | Callable[[], Iterable[RequestStore]],
                 on_expired: Callable[[str, list[str]], None] | None = None,
                 interval: float = REAP_INTERVAL_S) -> None:
        """``stores``: a node's one store, or a function giving the stores to walk on each pass (the
        console's: one per distinct topic Redis, as topics come, go and move)."""
        super().__init__(name="fd-reaper", daemon=True)
        self.stores = stores if callable(stores) else lambda: (stores,)
        self.on_expired = on_expired
        self.interval = interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.reap_once()
            except Exception:  # top-level loop: log and keep reaping (Redis may come back)
                log.exception("reaper pass failed")

    def reap_once(self) -> dict[str, list[str]]:
        """One pass over every topic of every store; returns the uids it expired, per topic."""
        expired: dict[str, list[str]] = {}
        for store in self.stores():
            try:
                expired.update(self._reap_store(store))
            except RedisError as exc:  # one topic Redis being down must not hold up the others
                log.warning("reaper pass failed: %s", exc)
        return expired

    def _reap_store(self, store: RequestStore) -> dict[str, list[str]]:
        expired: dict[str, list[str]] = {}
        for topic in store.topics():
            done = upkeep(store, topic)
            for uid, node in done.recovered:
                log.warning("request %s of %s lost its node; requeued on %s", uid, topic, node)
            if done.off_expired:
                log.warning("moved %d request(s) of %s off expired nodes", done.off_expired, topic)
            if done.placed:
                log.info("placed %d waiting request(s) of %s", done.placed, topic)
            if done.rehomed:
                log.warning("moved %d request(s) of %s from dead nodes to live ones", done.rehomed, topic)
            uids = done.expired
            if uids:
                expired[topic] = uids
                log.info("expired %d request(s) of topic %s", len(uids), topic)
                if self.on_expired:
                    self.on_expired(topic, uids)
        return expired

    def stop(self) -> None:
        self.stopped.set()
