"""The reaper: evicts requests that waited longer than their topic's TTL, on a timer.

It runs in the console and in every node, so eviction happens whether or not any worker is running;
several reapers are harmless because each eviction is one atomic script.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from scheduler.store import RequestStore

log = logging.getLogger(__name__)
REAP_INTERVAL_S = 0.25  # expired requests get their final status within this of their deadline


class Reaper(threading.Thread):
    def __init__(self, store: RequestStore, on_expired: Callable[[str, list[str]], None] | None = None,
                 interval: float = REAP_INTERVAL_S) -> None:
        super().__init__(name="fd-reaper", daemon=True)
        self.store = store
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
        expired: dict[str, list[str]] = {}
        for topic in self.store.topics():
            uids = self.store.expire_due(topic)
            if uids:
                expired[topic] = uids
                log.info("expired %d request(s) of topic %s", len(uids), topic)
                if self.on_expired:
                    self.on_expired(topic, uids)
        return expired

    def stop(self) -> None:
        self.stopped.set()
