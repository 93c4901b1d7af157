"""The splitwise (PD-separated) scheduler behind FastDeploy's four calls.

Design note. Placement, handoff and failover live in the Lua scripts (``scheduler.scripts``: a prefill
or mixed node and a decode node by load, from the live nodes' roles); this class is one node of a
topic with its role, and the origin of what it puts. What it adds to the Global interface is how
results travel: ``put_results`` hands them to ``scheduler_writer_parallel`` writer threads, each
writing batches of up to ``scheduler_writer_batch_size`` in one round trip, and
``scheduler_reader_parallel`` reader threads take batches of up to ``scheduler_reader_batch_size``
from the origin's result lists. A request's results always go through the same writer and the same
list (chosen by its id), so they arrive in order, first token first.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict

from redis import Redis

from scheduler.config import SchedulerConfig
from scheduler.global_ import GlobalScheduler
from scheduler.messages import Result
from scheduler.store import result_shard

log = logging.getLogger(__name__)
IDLE_S = 0.1  # the longest a reader blocks on an empty list before it checks whether to stop
GATHER_S = 0.002  # a writer gathers results this long for one round trip (a token's latency cost); it
# sleeps rather than waking for each result that arrives meanwhile: one wake-up per batch


class SplitwiseScheduler(GlobalScheduler):
    name = "splitwise"

    def __init__(self, config: SchedulerConfig, redis: Redis | None = None, node: str = "node-0",
                 origin: str | None = None, liveness: bool = True, role: str = "mixed") -> None:
        self.result_shards = config.scheduler_reader_parallel
        super().__init__(config, redis, node, origin, liveness, role)
        self._outbox: list[queue.SimpleQueue[list[Result]]] = [
            queue.SimpleQueue() for _ in range(config.scheduler_writer_parallel)]
        self._inbox: dict[str, list[Result]] = defaultdict(list)
        self._inbox_lock = threading.Lock()
        self._workers = [threading.Thread(target=self._write, args=(box,), daemon=True, name=f"fd-writer-{i}")
                         for i, box in enumerate(self._outbox)]
        self._workers += [threading.Thread(target=self._read, args=(shard,), daemon=True,
                                           name=f"fd-reader-{shard}") for shard in range(self.result_shards)]
        for worker in self._workers:
            worker.start()

    def put_results(self, results: list[Result]) -> None:
        """Queue results for the writers; a request's results always go through the same one."""
        shares: dict[int, list[Result]] = defaultdict(list)
        for result in results:
            shares[result_shard(result.request_id, len(self._outbox))].append(result)
        for writer, share in shares.items():
            self._outbox[writer].put(share)

    def get_results(self) -> dict[str, list[Result]]:
        with self._inbox_lock:
            taken, self._inbox = self._inbox, defaultdict(list)
        with self._lock:
            for request_id, results in taken.items():
                if results[-1].finished:
                    self.uids.pop(request_id, None)
        return dict(taken)

    def close(self) -> None:
        super().close()
        for worker in self._workers:
            worker.join(timeout=2)

    def _write(self, box: queue.SimpleQueue[list[Result]]) -> None:
        limit = self.config.scheduler_writer_batch_size
        while not self._stopped.is_set():
            try:
                pending = box.get(timeout=0.1)
            except queue.Empty:
                continue
            if len(pending) < limit:
                time.sleep(GATHER_S)
            while len(pending) < limit:
                try:
                    pending.extend(box.get_nowait())
                except queue.Empty:
                    break
            for start in range(0, len(pending), limit):
                batch = pending[start:start + limit]
                try:
                    GlobalScheduler.put_results(self, batch)
                except Exception:  # top-level loop: log, keep writing the next batches
                    log.exception("writing %d result(s) failed", len(batch))

    def _read(self, shard: int) -> None:
        limit = self.config.scheduler_reader_batch_size
        while not self._stopped.is_set():
            try:
                raw = self.store.wait_for_results(self.topic, f"{self.origin}:{shard}", limit, IDLE_S)
            except Exception:  # top-level loop: Redis may come back
                log.exception("reading results failed")
                time.sleep(IDLE_S)
                continue
            if not raw:
                continue
            with self._inbox_lock:
                for item in raw:
                    result = Result.from_dict(item)
                    self._inbox[result.request_id].append(result)
