"""``fdcluster`` (what ``make run`` runs) keeps its processes running and stops them cleanly.

A node process that dies is started again after a backoff: fdcluster says so on stdout, the node's
record (its page, the API, the admin) shows how it ended and how often it was restarted, and the topic's
event feed holds a ``node_restarted`` event. The console (daphne) is started again the same way. Ctrl-C
stops the nodes, the console, the threads and the embedded Redis in that order, quietly: exit status 0,
no traceback, no process left behind. One fdcluster run checks it all (each start costs seconds)."""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from fdconsole.cluster.supervision import BACKOFF_FIRST_S, BACKOFF_MAX_S, STABLE_S, Child, exit_status
from scheduler.telemetry import Telemetry
from tests.conftest import free_port
from tests.test_it_keeps_secrets import Run, cluster_env, wait_for_health  # noqa: F401 (a fixture)
from tests.test_it_serves_a_cluster_end_to_end import alive, children_of

RESTART_TIMEOUT_S = 90  # a node's restart: the backoff, then loading its model
STOP_TIMEOUT_S = 40


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``: children, grandchildren and so on."""
    found, todo = [], [pid]
    while todo:
        for child in children_of(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def child_pid(run: Run, *words: str) -> int | None:
    """The pid of fdcluster's live child whose command line holds ``words``, if any."""
    for pid in children_of(run.process.pid):
        if alive(pid) and all(word in cmdline(pid) for word in words):
            return pid
    return None


def logged_in(base: str, password: str) -> httpx.Client:
    """A browser-like client with the admin's session."""
    client = httpx.Client(base_url=base, timeout=10)
    client.get("/login/")
    answer = client.post("/login/", data={"username": "admin", "password": password,
                                          "csrfmiddlewaretoken": client.cookies["csrftoken"]})
    assert answer.status_code == 302, answer.text
    return client


def wait_until(what: str, check, timeout: float, run: Run):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if run.process.poll() is not None:
            raise AssertionError(f"fdcluster exited with {run.process.returncode}:\n{run.output}")
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout}s:\n{run.output}")


@pytest.mark.e2e
def test_it_restarts_a_killed_node_and_console_and_ctrl_c_leaves_nothing(cluster_env):  # noqa: F811
    run_dir, port, redis_port = Path(cluster_env["FD_RUN_DIR"]), free_port(), free_port()
    env = {**cluster_env, "FD_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}  # nothing there: embedded
    run = Run(env, port, nodes=1)
    seen: set[int] = set()
    try:
        run.wait_for_banner()
        base = f"http://127.0.0.1:{port}"
        wait_for_health(base)
        api = httpx.Client(base_url=base, timeout=10,
                           headers={"Authorization": f"Bearer {(run_dir / 'api_token').read_text().strip()}"})

        def node_after(since: float) -> dict | None:
            """node-1 as the API has it, once it beat after ``since`` (its process is up)."""
            node = api.get("/api/v1/nodes/node-1").json()
            beat = node.get("last_heartbeat")
            fresh = beat is not None and datetime.fromisoformat(beat).timestamp() > since
            return node if fresh and node["state"] in ("idle", "busy") else None

        first = wait_until("node-1 beats", lambda: node_after(0), RESTART_TIMEOUT_S, run)
        assert first["restarts"] == 0 and first["last_exit_status"] is None
        seen.update(descendants(run.process.pid))

        # A node killed: started again, its record and its topic's events say how it ended.
        old_node = child_pid(run, "fdnode", "node-1")
        killed_at = time.time()
        os.kill(old_node, signal.SIGKILL)
        node = wait_until("node-1 beats again", lambda: node_after(killed_at), RESTART_TIMEOUT_S, run)
        new_node = child_pid(run, "fdnode", "node-1")
        assert new_node not in (None, old_node)
        assert node["restarts"] == 1 and node["last_exit_status"] == "killed by SIGKILL"
        assert node["last_exit_at"] is not None
        assert "node-1 was killed by SIGKILL; starting it again in 1 s." in run.output
        password = (run_dir / "redis_password").read_text().strip()
        events = Telemetry(Redis(port=redis_port, password=password)).events("default", count=200)
        restarted = [e for e in events if e["kind"] == "node_restarted"]
        assert [(e["node"], e["status"]) for e in restarted] == [("node-1", "killed by SIGKILL")]
        admin = logged_in(base, (run_dir / "admin_password").read_text().strip())
        assert "1 · killed by SIGKILL" in admin.get("/topics/default/").text  # node-1's row
        assert "killed by SIGKILL" in admin.get("/admin/nodes/node/").text

        # The console killed: started again, it answers.
        old_console = child_pid(run, "daphne")
        os.kill(old_console, signal.SIGKILL)
        wait_until("the console is started again",
                   lambda: child_pid(run, "daphne") not in (None, old_console), RESTART_TIMEOUT_S, run)
        wait_for_health(base)
        assert "console was killed by SIGKILL; starting it again in 1 s." in run.output
        seen.update(descendants(run.process.pid))

        # Ctrl-C: in order, quietly, nothing left.
        run.process.send_signal(signal.SIGINT)
        assert run.process.wait(timeout=STOP_TIMEOUT_S) == 0
        time.sleep(0.5)  # the output's last lines
        assert "Traceback" not in run.output, run.output
        assert "Stopped." in run.output
        assert not [pid for pid in seen if alive(pid)], run.output
        with pytest.raises(RedisConnectionError):
            Redis(port=redis_port, password=password, socket_connect_timeout=1).ping()
    finally:
        run.stop()
        for pid in seen:  # what a failed run left: by pid, only the processes this test saw
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# -- the backoff, without processes ------------------------------------------------------------------
class Ended:
    """A stand-in for a Popen that ended with ``returncode``."""

    def __init__(self, returncode: int) -> None:
        self.returncode = returncode

    def poll(self) -> int:
        return self.returncode

    def wait(self) -> int:
        return self.returncode


def test_exit_statuses_read_as_words():
    assert exit_status(1) == "exit code 1"
    assert exit_status(0) == "exit code 0"
    assert exit_status(-signal.SIGKILL) == "killed by SIGKILL"
    assert exit_status(-signal.SIGTERM) == "killed by SIGTERM"


def test_the_backoff_doubles_to_its_cap_and_starts_over_after_a_stable_run():
    child = Child("node-1", ["true"], ".")
    delays, now = [], 1000.0
    for _ in range(7):
        child.process, child.started_at = Ended(-signal.SIGKILL), now  # died at once
        child.group_killed = True  # no process group to kill here
        death = child.check(now)
        assert death is not None and child.check(now) is None  # one report per death
        assert not child.due(now + death.delay_s - 0.01) and child.due(now + death.delay_s)
        delays.append(death.delay_s)
        child.restart_at = None  # as a start does
        now += death.delay_s
    assert delays == [BACKOFF_FIRST_S, 2, 4, 8, 16, BACKOFF_MAX_S, BACKOFF_MAX_S]
    child.process, child.started_at = Ended(1), now - STABLE_S
    death = child.check(now)
    assert death.delay_s == BACKOFF_FIRST_S  # it had stayed up: healthy again
    assert str(death) == "node-1 exited with code 1; starting it again in 1 s."


def test_a_database_that_is_down_does_not_stop_the_supervisor(redis_conn, monkeypatch, caplog):
    """How a node ended and its restart are reports, written off the supervisor's loop: with the
    database down each is a warning, and the event still reaches the topic's feed (through the topic as
    it was at start-up)."""
    from django.db import OperationalError, close_old_connections

    from fdconsole.cluster.management.commands.fdcluster import Command
    from fdconsole.cluster.supervision import Death, Recorder
    from fdconsole.nodes.models import Node
    from fdconsole.topics.models import Topic

    def refuse(*args, **kwargs):
        raise OperationalError("could not connect to server")

    monkeypatch.setattr(Node.objects, "filter", refuse)
    monkeypatch.setattr(Topic.objects, "get", refuse)
    command = Command()
    command.topic, command.topic_record = "default", Topic(name="default")
    command.recorder = Recorder(tidy=close_old_connections)
    command.recorder.start()
    command.record_exit(Death("node-1", -signal.SIGKILL, 1.0))
    command.record_restart("node-1", "killed by SIGKILL")
    command.recorder.stop()
    command.recorder.join(timeout=10)
    assert not command.recorder.is_alive()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == ["could not record how node-1 ended: could not connect to server",
                      "could not count the restart of node-1: could not connect to server"]
    events = Telemetry(redis_conn).events("default")
    assert [(e["kind"], e["node"], e["status"]) for e in events] == [
        ("node_restarted", "node-1", "killed by SIGKILL")]
