"""End to end, as a new user would: ``fdcluster`` (the console, the reaper and a node) and a separate
``fdnode`` process, over real HTTP and SSE, against the test Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import E2E_DB, free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 90


class Cluster:
    def __init__(self, url: str, token: str, env: dict[str, str], process: subprocess.Popen, log: list[str]):
        self.url, self.token, self.env, self.process, self.log = url, token, env, process, log
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def submit(self, **body) -> httpx.Response:
        body = {"prompt": "Hi", "max_tokens": 8, **body}
        return self.http.post("/api/v1/topics/default/requests", json=body)

    def wait_for(self, request_id: str, statuses: tuple[str, ...], timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.http.get(f"/api/v1/requests/{request_id}").json()
            if body["status"] in statuses:
                return body
            time.sleep(0.1)
        raise AssertionError(f"{request_id} is {body['status']}, not {statuses}, after {timeout}s")

    def node_state(self, name: str) -> str:
        return self.http.get(f"/api/v1/nodes/{name}").json().get("state", "missing")

    def wait_for_node(self, name: str, states: tuple[str, ...], timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.node_state(name) in states:
                return
            time.sleep(0.2)
        raise AssertionError(f"node {name} is {self.node_state(name)}, not {states}")

    def start_node(self, name: str) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "fdnode", "--topic", "default", "--name", name],
            cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.wait_for_node(name, ("idle", "busy"))
        return process


def pump(stream, log: list[str]) -> None:
    for line in iter(stream.readline, ""):
        log.append(line.rstrip("\n"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from redis import Redis

    base = tmp_path_factory.mktemp("cluster")
    redis_url = os.environ["FD_TEST_REDIS_URL"].rsplit("/", 1)[0] + f"/{E2E_DB}"
    Redis.from_url(redis_url).flushdb()
    port = free_port()
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{base}/db.sqlite3", "FD_REDIS_URL": redis_url,
           "FD_RUN_DIR": str(base / "run"), "FD_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1",
           "FD_DEVICE": "cpu"}
    process = subprocess.Popen(
        [sys.executable, "manage.py", "fdcluster", "--nodes", "1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    log: list[str] = []
    threading.Thread(target=pump, args=(process.stdout, log), daemon=True).start()
    token = wait_for_banner(process, log)
    running = Cluster(f"http://127.0.0.1:{port}", token, env, process, log)
    try:
        wait_for_health(running)
        running.wait_for_node("node-1", ("idle", "busy"))
        yield running
    finally:
        stop_cluster(process)


def wait_for_banner(process: subprocess.Popen, log: list[str]) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for line in log:
            if "API token:" in line:
                return line.split("API token:", 1)[1].strip()
        if process.poll() is not None:
            raise AssertionError("fdcluster exited:\n" + "\n".join(log))
        time.sleep(0.1)
    process.kill()
    raise AssertionError("fdcluster printed no token:\n" + "\n".join(log))


def wait_for_health(cluster: Cluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(cluster.url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the console never answered /healthz:\n" + "\n".join(cluster.log))


def stop_cluster(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def stream_events(cluster: Cluster, request_id: str) -> list[tuple[str, dict]]:
    events, name = [], None
    with cluster.http.stream("GET", f"/api/v1/requests/{request_id}/stream") as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
                if name == "done":
                    break
    return events


def test_a_request_streams_every_token_over_sse_and_finishes(cluster):
    answer = cluster.submit(prompt="The cluster says: ", max_tokens=64, node="node-1")
    assert answer.status_code == 202, answer.text
    request_id = answer.json()["request_id"]
    events = stream_events(cluster, request_id)  # connected right after submitting
    tokens = [data for name, data in events if name == "token"]
    assert events[-1][0] == "done"
    done = events[-1][1]
    assert done["status"] == "finished" and done["executed_by"] == "node-1"
    assert [t["index"] for t in tokens] == list(range(len(done["output_token_ids"])))
    assert [t["token_id"] for t in tokens] == done["output_token_ids"]
    assert cluster.http.get(f"/api/v1/requests/{request_id}").json() == done
    assert stream_events(cluster, request_id) == events  # and again, after the fact


def test_queue_full_and_expiry_while_the_node_is_stopped_then_it_serves_again(cluster):
    node = cluster.start_node("e2e-1")
    node.send_signal(signal.SIGTERM)
    assert node.wait(timeout=30) == 0
    cluster.wait_for_node("e2e-1", ("dead",), timeout=10)

    patched = cluster.http.patch("/api/v1/topics/default", json={"scheduler_ttl": 2, "scheduler_max_size": 2})
    assert patched.status_code == 200
    first, second, third = (cluster.submit(node="e2e-1") for _ in range(3))
    assert (first.status_code, second.status_code, third.status_code) == (202, 202, 429)
    assert third.json()["error"]["code"] == "queue_full"
    for answer in (first, second):
        body = cluster.wait_for(answer.json()["request_id"], ("expired",), timeout=6)
        assert body["error"]["code"] == "expired"

    restarted = cluster.start_node("e2e-1")
    try:
        fresh = cluster.submit(node="e2e-1", max_tokens=4)
        assert fresh.status_code == 202
        assert cluster.wait_for(fresh.json()["request_id"], ("finished",))["executed_by"] == "e2e-1"
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(timeout=30) == 0
        cluster.http.patch("/api/v1/topics/default", json={"scheduler_ttl": 900, "scheduler_max_size": -1})


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ctrl_c_stops_every_process_it_started(cluster):
    children = children_of(cluster.process.pid)
    assert len(children) >= 2  # the console and node-1 (redis is the test suite's own)
    cluster.process.send_signal(signal.SIGINT)
    assert cluster.process.wait(timeout=40) == 0
    assert not [pid for pid in children if alive(pid)]
    assert any("Stopped." in line for line in cluster.log)
