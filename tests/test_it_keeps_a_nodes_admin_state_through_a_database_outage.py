"""A node fails closed when it cannot read its admin state: a disabled node stays disabled through a
database outage, even with a request queued for it, and a node that starts during one claims nothing
until it has read its state. The outage is logged once when it begins and once when it ends; then the
node follows what its record says.

The node runs in this process (its worker in a thread, the console's database hooks) and the outage is
real: new connections to the test database fail (SQLite's file is looked for in a directory that does
not exist; PostgreSQL on a port nothing listens on), and the node's connections are new at each read
because ``CONN_MAX_AGE`` is 0 (Django's default).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from contextlib import contextmanager

import pytest

from tests.conftest import free_port
from tests.nodes import wait_final

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgresql]
POLLS_S = 3.5  # three and a half admin-state polls (one a heartbeat interval)
FAILED, RECOVERED = "cannot read its admin state", "reads its admin state again"


@pytest.fixture
def fresh_connections(monkeypatch):
    """Every thread's connection closes after each use of it (Django's default CONN_MAX_AGE), so that the
    node meets the outage at its next read."""
    from django.db import connection

    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 0)


@contextmanager
def database_outage(tmp_path):
    """New connections to the test database fail for real while inside; connections already open (this
    thread's, the console's) stay up. The settings dict is the one every thread's connection reads."""
    from django.db import connection

    db = connection.settings_dict
    saved = dict(db)
    connection.ensure_connection()  # the console side (this thread) keeps its connection
    if connection.vendor == "sqlite":
        db["NAME"] = str(tmp_path / "no-such-directory" / "db.sqlite3")
    else:
        db["HOST"], db["PORT"] = "127.0.0.1", free_port()
    try:
        yield
    finally:
        db.update(saved)


class NodeThread:
    """node-a's worker (``NodeWorker.work``, as ``fdnode`` runs it) in a thread of this process."""

    def __init__(self, store, batch_engine) -> None:
        from fdconsole.cluster.hooks import database_hooks
        from gpu_worker.node import NodeWorker
        from gpu_worker.runtime import NodeRuntime

        self.runtime = NodeRuntime(topic="default", name="node-a", role="mixed", store=store,
                                   engine=batch_engine, hooks=database_hooks())
        self.worker = NodeWorker(self.runtime)
        self.worker._install_signal_handlers = lambda: None  # signals reach the main thread only
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._work, name="node-a", daemon=True)

    def _work(self) -> None:
        try:
            self.worker.work(logging_level="WARNING")
        except BaseException as exc:  # reported by stop()
            self.errors.append(exc)

    def start(self) -> NodeThread:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.worker._shutdown()  # what SIGTERM does: claim nothing more, finish what it holds
        self.thread.join(timeout=30)
        assert not self.thread.is_alive() and not self.errors, self.errors


@pytest.fixture
def node_thread(store, batch_engine, fresh_connections):
    started: list[NodeThread] = []

    def start() -> NodeThread:
        started.append(NodeThread(store, batch_engine).start())
        return started[-1]

    yield start
    for node in started:
        node.stop()
    # The node's threads are gone, but their database connections live on in reference cycles until a
    # collection: left open, they keep the test database from being dropped at the end of the run.
    gc.collect()


def submit(api) -> str:
    answer = api.post("/api/v1/topics/default/requests",
                      {"prompt": "Hold on", "max_tokens": 4, "node": "node-a"})
    assert answer.status_code == 202, answer.content
    return answer.json()["request_id"]


def logged(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gpu_worker.node" and text in r.getMessage()]


def wait_until(check, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def set_admin_state(state: str) -> None:
    from fdconsole.nodes.models import Node

    assert Node.objects.filter(name="node-a").update(admin_state=state) == 1


def test_a_disabled_node_stays_disabled_through_an_outage_then_follows_its_record(
        api, node, store, node_thread, caplog, tmp_path):
    caplog.set_level(logging.WARNING, logger="gpu_worker.node")
    request_id = submit(api)  # queued on node-a while it was enabled
    set_admin_state("disabled")
    node = node_thread()
    wait_until(lambda: node.runtime.admin_state == "disabled")
    time.sleep(POLLS_S)
    assert store.queue_length("default", "node-a") == 1, "a disabled node claims nothing"

    with database_outage(tmp_path):
        wait_until(lambda: logged(caplog, FAILED))
        set_admin_state("enabled")  # the console can write it; the node cannot read it
        time.sleep(POLLS_S)
        assert node.runtime.admin_state == "disabled"
        assert store.queue_length("default", "node-a") == 1 and not node.runtime.held
        assert store.read_heartbeats("default", ["node-a"])["node-a"]["admin_state"] == "disabled"
        [failed] = logged(caplog, FAILED)  # once per outage, not at every poll
        assert "keeps 'disabled' until it can, claiming nothing" in failed

    assert wait_final(api, request_id)["status"] == "finished"  # enabled again, as its record says
    assert node.runtime.admin_state == "enabled"
    assert len(logged(caplog, RECOVERED)) == 1 and len(logged(caplog, FAILED)) == 1


def test_a_node_that_starts_during_an_outage_claims_nothing_until_it_reads_its_state(
        api, node, store, node_thread, caplog, tmp_path):
    caplog.set_level(logging.WARNING, logger="gpu_worker.node")
    request_id = submit(api)
    with database_outage(tmp_path):
        node = node_thread()
        wait_until(lambda: logged(caplog, FAILED))
        time.sleep(POLLS_S)
        assert node.runtime.admin_state == "unknown"
        assert store.queue_length("default", "node-a") == 1 and not node.runtime.held
        beat = store.read_heartbeats("default", ["node-a"])["node-a"]
        assert beat["admin_state"] == "unknown" and beat["state"] == "idle"  # alive, taking nothing
        assert len(logged(caplog, FAILED)) == 1

    assert wait_final(api, request_id)["status"] == "finished"
    assert node.runtime.admin_state == "enabled"
    assert len(logged(caplog, RECOVERED)) == 1


def test_a_node_without_a_record_keeps_working(topic):
    """A missing row is not a failed read: the node is told "enabled" (fdnode makes the row before it
    starts; a row deleted under a running node does not stop it)."""
    from fdconsole.cluster.hooks import admin_state

    assert admin_state("no-such-node") == "enabled"
