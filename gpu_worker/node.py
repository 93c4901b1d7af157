"""A node process: one rq worker (no fork per job) with the model resident on its device.

``NodeWorker`` is rq's ``SimpleWorker`` with the JSON serializer, listening on the node's own queue.
Beside the job loop run two daemon threads: the heartbeat (liveness for the console) and the reaper
(TTL eviction). SIGTERM is rq's warm shutdown: the current request finishes, then the process exits 0.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from scheduler.liveness import HEARTBEAT_INTERVAL_S, HEARTBEAT_KEY_TTL_S
from scheduler.reaper import Reaper
from scheduler.store import RequestStore

log = logging.getLogger(__name__)


@dataclass
class NodeHooks:
    """What the node tells its host application (the console's database) about its work."""

    on_change: Callable[[str, str], None] = lambda topic, uid: None  # a request's state moved
    on_finished: Callable[[str], None] = lambda node: None  # this node finished running a request
    on_expired: Callable[[str, list[str]], None] = lambda topic, uids: None  # the reaper evicted these


@dataclass
class NodeRuntime:
    topic: str
    name: str
    role: str
    store: RequestStore
    engine: Any  # gpu_worker.engine.Engine, loaded once
    hooks: NodeHooks = field(default_factory=NodeHooks)
    running: str = ""  # uid of the request being generated, "" when idle


_runtime: NodeRuntime | None = None


def install_runtime(runtime: NodeRuntime) -> None:
    global _runtime
    _runtime = runtime


def current_runtime() -> NodeRuntime:
    if _runtime is None:
        raise RuntimeError("no node runtime installed: jobs run only inside `manage.py fdnode`")
    return _runtime


class Heartbeat(threading.Thread):
    def __init__(self, runtime: NodeRuntime) -> None:
        super().__init__(name="fd-heartbeat", daemon=True)
        self.runtime = runtime
        self.stopped = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self.beat("busy" if self.runtime.running else "idle")
            except Exception:  # top-level loop: a Redis hiccup must not kill the heartbeat
                log.exception("heartbeat failed")
            if self.stopped.wait(HEARTBEAT_INTERVAL_S):
                return

    def beat(self, state: str) -> None:
        rt = self.runtime
        rt.store.write_heartbeat(rt.topic, rt.name, {
            "state": state, "role": rt.role, "host": socket.gethostname(), "pid": os.getpid(),
            "device": str(rt.engine.device), "running": rt.running,
        }, ttl_s=HEARTBEAT_KEY_TTL_S)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)
        try:
            self.beat("stopped")
        except Exception:
            log.warning("could not write the final heartbeat")


class NodeWorker(SimpleWorker):
    """rq's in-process worker bound to one node's queue."""

    def __init__(self, runtime: NodeRuntime, **kwargs: Any) -> None:
        queue = runtime.store.node_queue(runtime.topic, runtime.name)
        super().__init__(
            [queue], connection=runtime.store.redis, serializer=JSONSerializer,
            name=f"fdnode.{runtime.name}.{uuid.uuid4().hex[:8]}", **kwargs,
        )
        self.runtime = runtime

    def work(self, burst: bool = False, **kwargs: Any) -> bool:
        install_runtime(self.runtime)
        heartbeat = Heartbeat(self.runtime)
        reaper = Reaper(self.runtime.store, self.runtime.hooks.on_expired)
        heartbeat.start()
        reaper.start()
        try:
            return super().work(burst=burst, **kwargs)
        finally:
            reaper.stop()
            heartbeat.stop()
