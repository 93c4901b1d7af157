"""A topic's Redis is the base URL (FD_REDIS_URL) with each of scheduler_host/port/db/password that the
topic sets put in; the bare scheduler interface connects from the configuration alone."""

from __future__ import annotations

import pytest
from redis.connection import parse_url

from scheduler.config import parse_config
from scheduler.connection import describe, topic_redis_url

BASE = "redis://ops:base-pw@10.0.0.7:6380/2?socket_timeout=5"


def url_for(base: str = BASE, **changes) -> str:
    return topic_redis_url(parse_config(changes), base)


def test_a_topic_that_sets_nothing_uses_the_base_url_itself():
    assert url_for() == BASE
    assert url_for(scheduler_host="127.0.0.1", scheduler_port=6379, scheduler_db=0,
                   scheduler_password="") == BASE


BASE_PARTS = {"host": "10.0.0.7", "port": 6380, "db": 2, "password": "base-pw"}


@pytest.mark.parametrize(
    "changes, replaced",
    [
        pytest.param({"scheduler_host": "redis.internal"}, {"host": "redis.internal"}, id="host"),
        pytest.param({"scheduler_port": 7000}, {"port": 7000}, id="port"),
        pytest.param({"scheduler_db": 5}, {"db": 5}, id="db"),
        pytest.param({"scheduler_password": "own"}, {"password": "own"}, id="password"),
        pytest.param({"scheduler_host": "::1", "scheduler_db": 3}, {"host": "::1", "db": 3}, id="ipv6"),
    ],
)
def test_each_parameter_the_topic_sets_replaces_that_part_alone(changes, replaced):
    parsed = parse_url(url_for(**changes))
    assert {key: parsed[key] for key in BASE_PARTS} == {**BASE_PARTS, **replaced}
    assert parsed["username"] == "ops" and parsed["socket_timeout"] == 5.0  # the rest of the base is kept


@pytest.mark.parametrize("password", ["p@ss:w/rd", "#?&= %41", "ünï-çødé", "a" * 512])
def test_a_password_is_quoted_and_comes_back_exactly(password):
    url = url_for("redis://127.0.0.1:6379/0", scheduler_password=password)
    assert parse_url(url)["password"] == password
    assert password not in describe(url)


def test_the_description_for_logs_names_host_port_and_db_but_never_the_password():
    url = url_for(scheduler_db=5, scheduler_password="hunter2")
    assert describe(url) == "10.0.0.7:6380 (db 5)"


def test_the_default_base_is_where_fastdeploy_would_connect():
    url = topic_redis_url(parse_config({"scheduler_db": 4}))
    assert parse_url(url) == {"host": "127.0.0.1", "port": 6379, "db": 4}


def test_a_bare_global_scheduler_connects_where_its_config_says(redis_url, redis_conn):
    from redis import Redis

    from scheduler.interface import create_scheduler
    from scheduler.messages import Request

    port = parse_url(redis_url)["port"]
    config = parse_config({"scheduler_name": "global", "scheduler_topic": "bare", "scheduler_port": port,
                           "scheduler_db": 3})
    db3 = Redis(port=port, db=3)
    db3.flushdb()
    scheduler = create_scheduler(config)  # no client passed: host, port and db come from the config
    try:
        assert scheduler.put_requests([Request("r1", [1, 2, 3])]) == [("r1", None)]
        assert [r.request_id for r in scheduler.get_requests(100, 64, 1, 1024)] == ["r1"]
        assert db3.exists("fd:{bare}:config") and not redis_conn.keys("*bare*")
    finally:
        scheduler.close()
        db3.flushdb()
        db3.close()
