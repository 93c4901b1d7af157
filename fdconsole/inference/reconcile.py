"""The reconciler: the database is the record, Redis the working state.

Design note. A request accepted with 202 has a row; while it is in flight Redis holds its live state,
and the nodes' hooks copy each change to the row as it happens. A hook can fail (the database was
down), and Redis can lose everything (restarted without its data). So every ``RECONCILE_S`` one
process of the cluster (``fdcluster`` and every node run one; a lease in the console's Redis picks who
works) walks the unfinished rows, oldest first, and brings each up to date from its topic's Redis
(``sync.sync_rows``): a final state Redis holds is written to the row (and Redis, which keeps it until
then, is told it may let go); a request Redis no longer knows is queued again from its row while its
TTL runs, or expires (``sync.recover_lost``). One topic's Redis failing holds up only its own rows.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from django.db import DatabaseError, close_old_connections
from redis.exceptions import RedisError

from fdconsole.errors import TopicRedisUnavailable
from fdconsole.inference.models import Request
from fdconsole.inference.sync import sync_rows
from fdconsole.redis_conn import get_store, get_topic_store, topic_redis_errors
from scheduler.lease import Lease
from scheduler.status import RequestStatus

log = logging.getLogger(__name__)
RECONCILE_S = 2.0  # how often unfinished rows are compared with Redis: well within keys.RETENTION_S
ROWS_PER_TOPIC = 500  # per pass, oldest first (the rest wait for the next): one topic cannot starve another
LEASE_KEY = "fd:console:reconciler"
LEASE_MS = 10_000  # another process takes over this long after the holder stops


@dataclass
class Reconciled:
    """What one pass did."""

    checked: int = 0  # unfinished rows compared with Redis
    finished: int = 0  # rows that reached their final state in this pass
    unreachable: dict[str, str] = field(default_factory=dict)  # topic -> why its Redis did not answer


def reconcile_once(per_topic: int = ROWS_PER_TOPIC) -> Reconciled:
    """One pass over the unfinished rows, topic by topic (at most ``per_topic`` of each, oldest first)."""
    unfinished = Request.objects.select_related("topic").filter(
        status__in=(RequestStatus.QUEUED, RequestStatus.RUNNING))
    done = Reconciled()
    for topic_id in unfinished.values_list("topic_id", flat=True).distinct().order_by():
        rows = list(unfinished.filter(topic_id=topic_id).order_by("created_at")[:per_topic])
        if not rows:
            continue  # they all ended since the first query
        topic = rows[0].topic
        done.checked += len(rows)
        try:
            with topic_redis_errors(topic):
                done.finished += len(sync_rows(rows, get_topic_store(topic)))
        except TopicRedisUnavailable as exc:
            done.unreachable[topic.name] = exc.message
    return done


class Reconciler(threading.Thread):
    """``reconcile_once`` every ``interval`` seconds while this process holds the cluster's lease."""

    def __init__(self, interval: float = RECONCILE_S) -> None:
        super().__init__(name="fd-reconciler", daemon=True)
        self.interval = interval
        self.stopped = threading.Event()
        self.lease: Lease | None = None
        self.unreachable: set[str] = set()  # topics whose Redis did not answer at the last pass

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            close_old_connections()  # a connection an outage broke is dropped, the next query reconnects
            try:
                if self._hold_lease():
                    self._note(reconcile_once().unreachable)
            except (DatabaseError, RedisError) as exc:  # top-level loop: the next pass tries again
                log.warning("reconciler pass failed: %s", exc)
            except Exception:
                log.exception("reconciler pass failed")
        close_old_connections()

    def _note(self, unreachable: dict[str, str]) -> None:
        """Logs a topic's Redis not answering when that begins and when it ends, not at every pass."""
        for name in unreachable.keys() - self.unreachable:
            log.warning("reconciler: %s; its rows wait until it answers", unreachable[name])
        for name in self.unreachable - unreachable.keys():
            log.warning("reconciler: the Redis of topic '%s' answers again", name)
        self.unreachable = set(unreachable)

    def _hold_lease(self) -> bool:
        if self.lease is None:
            self.lease = Lease(get_store().redis, LEASE_KEY, LEASE_MS)
        return self.lease.hold()

    def stop(self) -> None:
        self.stopped.set()
        if self.lease is not None:
            try:
                self.lease.release()
            except RedisError:
                pass  # it runs out by itself
