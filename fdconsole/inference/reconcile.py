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
from collections import defaultdict
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
ROWS_PER_PASS = 2000  # oldest first; the rest wait for the next pass
LEASE_KEY = "fd:console:reconciler"
LEASE_MS = 10_000  # another process takes over this long after the holder stops


@dataclass
class Reconciled:
    """What one pass did."""

    checked: int = 0  # unfinished rows compared with Redis
    finished: int = 0  # rows that reached their final state in this pass
    unreachable: list[str] = field(default_factory=list)  # topics whose Redis did not answer


def reconcile_once(limit: int = ROWS_PER_PASS) -> Reconciled:
    """One pass over the unfinished rows (at most ``limit``, oldest first), topic by topic."""
    rows = list(Request.objects.select_related("topic")
                .filter(status__in=(RequestStatus.QUEUED, RequestStatus.RUNNING))
                .order_by("created_at")[:limit])
    by_topic: dict[str, list[Request]] = defaultdict(list)
    for row in rows:
        by_topic[row.topic.name].append(row)
    done = Reconciled(checked=len(rows))
    for name, topic_rows in by_topic.items():
        topic = topic_rows[0].topic
        try:
            with topic_redis_errors(topic):
                done.finished += len(sync_rows(topic_rows, get_topic_store(topic)))
        except TopicRedisUnavailable as exc:
            log.warning("reconciler: %s", exc.message)
            done.unreachable.append(name)
    return done


class Reconciler(threading.Thread):
    """``reconcile_once`` every ``interval`` seconds while this process holds the cluster's lease."""

    def __init__(self, interval: float = RECONCILE_S) -> None:
        super().__init__(name="fd-reconciler", daemon=True)
        self.interval = interval
        self.stopped = threading.Event()
        self.lease: Lease | None = None

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            close_old_connections()  # a connection an outage broke is dropped, the next query reconnects
            try:
                if self._hold_lease():
                    reconcile_once()
            except (DatabaseError, RedisError) as exc:  # top-level loop: the next pass tries again
                log.warning("reconciler pass failed: %s", exc)
            except Exception:
                log.exception("reconciler pass failed")
        close_old_connections()

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
