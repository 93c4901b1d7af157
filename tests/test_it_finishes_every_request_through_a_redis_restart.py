"""Redis dies under load: killed and started again with its data (the append-only file), every accepted
request finishes, each token index streamed once; started again empty, every accepted request still
finishes, queued again from its row by the reconciler, none lost."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from fdconsole.embedded_redis import EmbeddedRedis
from fdconsole.inference.models import Request
from tests.conftest import free_port
from tests.nodes import NodeProcesses

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e, pytest.mark.postgresql]
PROMPTS = ("a request that outlives its Redis", "and another one")
MAX_TOKENS = 32


@pytest.fixture
def own_redis(settings, tmp_path):
    """A Redis of the test's own that keeps its data in an append-only file, as make run's does; the
    console (this process) and the nodes use it."""
    server = EmbeddedRedis(free_port(), data_dir=tmp_path / "redis").start()
    settings.FD_REDIS_URL = server.url
    yield server
    server.stop()


@pytest.fixture
def nodes(own_redis):
    processes = NodeProcesses(own_redis.url)
    yield processes
    processes.stop_all()


def submit_load(api) -> list[Request]:
    rows = []
    for i in range(8):
        answer = api.post("/api/v1/topics/default/requests",
                          {"prompt": PROMPTS[i % 2], "max_tokens": MAX_TOKENS})
        assert answer.status_code == 202, answer.content
        rows.append(Request.objects.get(request_id=answer.json()["request_id"]))
    return rows


def wait_streaming(store, rows) -> None:
    """Until some tokens are out and no request is done yet: Redis dies mid-generation."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = [store.state("default", row.uid) for row in rows]
        if any(s is not None and s.num_output_tokens >= 3 for s in states):
            assert not any(s.is_final for s in states if s is not None), "too late: one already ended"
            return
        time.sleep(0.02)
    raise AssertionError("no token within 60 s")


def kill(server: EmbeddedRedis) -> None:
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()


def wait_rows_final(rows, timeout: float = 90) -> list[Request]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Request.objects.filter(pk__in=[r.pk for r in rows], status__in=["queued", "running"]).exists():
            break
        time.sleep(0.2)
    for row in rows:
        row.refresh_from_db()
    return rows


def assert_each_finished_once(rows, store) -> None:
    assert [r.status for r in rows] == ["finished"] * len(rows), [(r.status, r.error_message) for r in rows]
    outputs = {p: {tuple(r.output_token_ids) for r in rows if r.prompt_token_ids == list(p.encode())}
               for p in PROMPTS}
    for prompt, seen in outputs.items():
        assert len(seen) == 1, f"{prompt!r}: the resumed runs differ from the others"  # greedy: all equal
        assert len(next(iter(seen))) == MAX_TOKENS
    for row in rows:
        indexes = [e.index for e in store.read_output("default", row.uid, count=10_000) if e.kind == "token"]
        assert indexes == list(range(MAX_TOKENS)), row.request_id  # each index streamed once, in order


def test_redis_killed_and_started_again_with_its_data_every_request_finishes_once(own_redis, node, api,
                                                                                   store, nodes):
    nodes.start("node-a", FD_TOKEN_DELAY_MS="40")
    rows = submit_load(api)
    wait_streaming(store, rows)
    time.sleep(1.1)  # appendfsync everysec: what was streamed by now is on disk
    kill(own_redis)
    time.sleep(0.5)
    own_redis.restart()
    assert_each_finished_once(wait_rows_final(rows), store)


def test_redis_started_again_empty_every_request_still_finishes(own_redis, node, api, store, nodes):
    nodes.start("node-a", FD_TOKEN_DELAY_MS="40")
    rows = submit_load(api)
    wait_streaming(store, rows)
    kill(own_redis)
    shutil.rmtree(own_redis.data_dir)  # restarted without its data
    own_redis.restart()
    # After the reconciler's grace (a submission may still be on its way), each is queued again from its row.
    assert_each_finished_once(wait_rows_final(rows), store)
