"""The embedded Redis that ``make run`` starts keeps its data (an append-only file synced every second,
in .run/redis), never evicts (noeviction: a full server refuses writes instead of dropping queued
requests), and is started again by fdcluster when it dies. Any Redis whose eviction policy could drop
queue keys is reported, at start-up and in /healthz."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from redis import Redis

from fdconsole.embedded_redis import EmbeddedRedis, eviction_risk, server_pid
from tests.conftest import free_port
from tests.test_it_keeps_secrets import Run, cluster_env, wait_for_health  # noqa: F401 (a fixture)


def test_its_data_survives_a_kill_and_it_never_evicts(tmp_path):
    server = EmbeddedRedis(free_port(), password="pw-test", data_dir=tmp_path / "redis", maxmemory="64mb")
    server.start()
    try:
        client = Redis.from_url(server.url)
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert eviction_risk(client) is None
        client.rpush("fd:queue", *[f"request-{i}" for i in range(100)])
        time.sleep(1.5)  # appendfsync everysec: on disk within a second
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
        assert not server.alive
        server.restart()
        assert Redis.from_url(server.url).lrange("fd:queue", 0, -1)[-1] == b"request-99"
    finally:
        server.stop()
    assert (tmp_path / "redis").exists()  # the data stays for the next run


def test_a_policy_that_evicts_is_reported_by_healthz(client, db, store):
    store.redis.config_set("maxmemory-policy", "allkeys-lru")
    try:
        assert "allkeys-lru" in eviction_risk(store.redis)
        answer = client.get("/healthz")
        assert answer.status_code == 200 and "allkeys-lru" in answer.json()["warnings"][0]
    finally:
        store.redis.config_set("maxmemory-policy", "noeviction")
    assert "warnings" not in client.get("/healthz").json()


@pytest.mark.e2e
def test_fdcluster_starts_its_redis_again_when_it_dies_with_what_it_held(cluster_env):  # noqa: F811
    run_dir, port, redis_port = Path(cluster_env["FD_RUN_DIR"]), free_port(), free_port()
    env = {**cluster_env, "FD_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
    run = Run(env, port)
    try:
        banner = run.wait_for_banner()
        assert f"its data in {run_dir / 'redis'}" in banner
        base = f"http://127.0.0.1:{port}"
        wait_for_health(base)
        time.sleep(1.5)  # what it holds (the topic's published configuration) is on disk by now
        os.kill(server_pid(redis_port), signal.SIGKILL)
        deadline = time.monotonic() + 30
        password = (run_dir / "redis_password").read_text().strip()
        while time.monotonic() < deadline:
            try:
                if Redis(port=redis_port, password=password, socket_connect_timeout=1).ping():
                    break
            except Exception:  # noqa: BLE001 (not up yet)
                time.sleep(0.2)
        else:
            raise AssertionError("the embedded Redis was not started again")
        kept = Redis(port=redis_port, password=password)
        assert kept.sismember("fd:topics", "default")  # what it held before it died
        assert httpx.get(base + "/healthz", timeout=10).status_code == 200
    finally:
        said = run.stop()
    assert "The embedded Redis exited" in said and "starting it again" in said
