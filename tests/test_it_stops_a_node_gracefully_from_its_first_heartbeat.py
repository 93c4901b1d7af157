"""A node told to stop (SIGTERM, Ctrl-C) as soon as it shows itself alive stops gracefully: its loop ends,
its last heartbeat says "stopped". Before, the first heartbeat came before rq's loop installed its signal
handlers, so a signal in between killed the node outright (seen as a flaky exit status -15 in the
end-to-end test that stops a node right after it starts).

The node runs in this process's main thread (signal handlers can only be set there). A fallback handler
stands in for the signal's default action, which would kill the test run: if it is the one that gets
the signal, the node had not taken over its signals yet, and the fallback stops the node so that the
test ends and fails.
"""

from __future__ import annotations

import os
import signal

import pytest

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_node_stopped_at_its_first_heartbeat_stops_gracefully(signum, store, batch_engine, node,
                                                                 monkeypatch):
    from fdconsole.cluster.hooks import database_hooks
    from gpu_worker import node as node_module
    from gpu_worker.node import NodeWorker
    from gpu_worker.runtime import NodeRuntime

    runtime = NodeRuntime(topic="default", name="node-a", role="mixed", store=store, engine=batch_engine,
                          hooks=database_hooks())
    worker = NodeWorker(runtime)
    beat = node_module.Heartbeat.beat
    beats: list[str] = []

    def beat_then_signal(self, state: str) -> None:
        beat(self, state)
        beats.append(state)
        if len(beats) == 1:  # the node shows itself alive: the signal comes at once
            os.kill(os.getpid(), signum)

    fallback: list[int] = []

    def default_action(received, frame) -> None:
        fallback.append(received)
        worker._shutdown()

    monkeypatch.setattr(node_module.Heartbeat, "beat", beat_then_signal)
    saved = {sig: signal.signal(sig, default_action) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker.work(logging_level="WARNING")
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)

    assert fallback == [], "the signal came before the node handled its signals: it would have died of it"
    assert beats[0] == "idle" and beats[-1] == "stopped"
    assert store.read_heartbeats("default", ["node-a"])["node-a"]["state"] == "stopped"
