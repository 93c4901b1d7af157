"""The reaper: TTL eviction, failover and each mode's upkeep, on a timer.

It runs in the console and in every node, so a request expires whether or not any worker is running,
and the work of a dead node moves on even when no console runs. Several reapers are harmless: each
step is one atomic script, and one pass over a topic is one round trip (``upkeep``). Each Redis is
reaped on a thread of its own, so one that does not answer delays only its own topics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from redis.exceptions import RedisError

from scheduler import failover, global_, scripts, splitwise
from scheduler.connection import describe_client
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
    """Reaps every store it is given, each on a thread of its own (``StoreReaper``): a topic Redis that
    does not answer holds up only its own topics' expiries and failovers, never another Redis's. This
    thread follows the stores (``stores()`` once per interval: topics come, go and move) and starts
    and stops their threads."""

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
        self.reapers: dict[RequestStore, StoreReaper] = {}  # by store (one per Redis): its thread

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.follow(list(self.stores()))
            except Exception:  # top-level loop: the list of stores (the database) may come back
                log.exception("reaper could not list its stores")
            self.stopped.wait(self.interval)
        self._stop_reapers(list(self.reapers))

    def follow(self, stores: list[RequestStore]) -> None:
        """A thread for each of ``stores`` that has none; the threads of stores no longer listed stop."""
        for store in stores:
            if store not in self.reapers and not self.stopped.is_set():
                reaper = self.reapers[store] = StoreReaper(store, self._reap_store, self.interval)
                reaper.start()
        self._stop_reapers([store for store in self.reapers if store not in stores])

    def _stop_reapers(self, stores: list[RequestStore]) -> None:
        for store in stores:
            self.reapers.pop(store).stop()  # not joined: one may be waiting out a read timeout

    def reap_once(self) -> dict[str, list[str]]:
        """One pass over every topic of every store, in this thread; returns the uids it expired, per
        topic. A store whose Redis does not answer is logged and passed over."""
        expired: dict[str, list[str]] = {}
        for store in self.stores():
            try:
                expired.update(self._reap_store(store))
            except RedisError as exc:
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
        """Stops this thread and every store's (at once: none is waited for)."""
        self.stopped.set()
        for reaper in list(self.reapers.values()):
            reaper.stop()


class StoreReaper(threading.Thread):
    """Reaps the topics of one store every interval. A call to a Redis that does not answer fails
    within the client's read timeout (``scheduler.connection``), and the next pass tries again; an
    outage is logged when it begins and when it ends, not at every pass."""

    def __init__(self, store: RequestStore, reap: Callable[[RequestStore], object], interval: float) -> None:
        super().__init__(name=f"fd-reaper {describe_client(store.redis)}", daemon=True)
        self.store, self.reap, self.interval = store, reap, interval
        self.stopped = threading.Event()
        self.failing_since: float | None = None  # monotonic time of the first failed pass of an outage

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.reap(self.store)
            except RedisError as exc:
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                    log.warning("reaper: the Redis at %s does not answer (%s); its topics wait until it does",
                                describe_client(self.store.redis), exc)
                continue
            except Exception:  # top-level loop: log and keep reaping (a hook's database may come back)
                log.exception("reaper pass failed")
                continue
            if self.failing_since is not None:
                log.warning("reaper: the Redis at %s answers again after %.0f s",
                            describe_client(self.store.redis), time.monotonic() - self.failing_since)
                self.failing_since = None

    def stop(self) -> None:
        self.stopped.set()
