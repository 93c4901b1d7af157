"""A topic that sets scheduler_db (or its own port and password) lives in that Redis: the console queues
its requests there, its node process runs them from there, and no key of it lands in the console's
database 0. While its node runs, the topic cannot be moved elsewhere."""

from __future__ import annotations

import signal

import pytest
from redis import Redis

from tests.api_errors import assert_error
from tests.nodes import wait_final
from tests.test_it_streams_tokens_over_sse import check_stream, read_events

pytestmark = pytest.mark.django_db(transaction=True)
TOPIC_DB = 5
MOVED_DB = 6


def database(redis_url: str, index: int) -> Redis:
    """A client of database ``index`` of the test Redis."""
    return Redis.from_url(redis_url.rsplit("/", 1)[0] + f"/{index}")


@pytest.fixture
def topic_dbs(redis_url):
    """Databases 5 and 6 of the test Redis, empty before and after."""
    conns = database(redis_url, TOPIC_DB), database(redis_url, MOVED_DB)
    for conn in conns:
        conn.flushdb()
    yield conns
    for conn in conns:
        conn.flushdb()
        conn.close()


def all_keys(conn: Redis) -> list[str]:
    return [key.decode() for key in conn.scan_iter(count=1000)]


@pytest.mark.e2e
def test_a_topic_on_db_5_runs_on_a_real_node_with_every_key_in_db_5(api, redis_conn, topic_dbs,
                                                                    node_processes):
    from fdconsole.inference.models import Request

    topic_db, moved_db = topic_dbs
    body = {"name": "five", "scheduler_name": "global", "scheduler_db": TOPIC_DB}
    created = api.post("/api/v1/topics", body)
    assert created.status_code == 201, created.content
    node_processes.start("five-a", "five")
    answer = api.post("/api/v1/topics/five/requests", {"prompt": "Hello", "max_tokens": 6})
    assert answer.status_code == 202, answer.content
    request_id = answer.json()["request_id"]

    done = wait_final(api, request_id)
    assert done["status"] == "finished" and done["executed_by"] == "five-a"
    check_stream(read_events(api, request_id))  # SSE reads the output stream from db 5
    assert api.get("/api/v1/nodes/five-a").json()["state"] in ("idle", "busy")

    uid = Request.objects.get(request_id=request_id).uid
    in_topic_db, in_db0 = all_keys(topic_db), all_keys(redis_conn)
    assert {"fd:{five}:config", f"fd:{{five}}:req:{uid}", f"fd:{{five}}:out:{uid}", f"rq:job:{uid}",
            "rq:queues"} <= set(in_topic_db)
    assert any(key.startswith("rq:worker:fdnode.five-a.") for key in in_topic_db)  # the node's rq worker
    assert [key for key in in_db0 if "five" in key or uid in key] == []
    assert b"five" not in redis_conn.smembers("fd:topics")

    # While its node runs, the topic stays where it is; once the node has stopped, it may move.
    refused = assert_error(api.patch("/api/v1/topics/five", {"scheduler_db": MOVED_DB}), 409, "scheduler_db")
    assert "five-a" in refused["message"] and "stop" in refused["message"]
    assert node_processes.kill("five-a", signal.SIGTERM) == 0
    moved = api.patch("/api/v1/topics/five", {"scheduler_db": MOVED_DB})
    assert moved.status_code == 200, moved.content
    assert moved_db.exists("fd:{five}:config")
    assert not topic_db.exists("fd:{five}:config") and b"five" not in topic_db.smembers("fd:topics")


def test_a_topic_with_its_own_port_and_password_runs_there(api, store, batch_engine, locked_redis):
    from fdconsole.cluster.hooks import database_hooks
    from fdconsole.topics.models import Topic
    from fdconsole.topics.services import ensure_node, topic_store
    from gpu_worker.node import NodeWorker
    from gpu_worker.runtime import NodeRuntime

    body = {"name": "locked", "scheduler_port": locked_redis.port, "scheduler_password": "pa55word"}
    assert api.post("/api/v1/topics", body).status_code == 201
    ensure_node("locked-a", Topic.objects.get(name="locked"))
    answer = api.post("/api/v1/topics/locked/requests", {"prompt": "Hi", "max_tokens": 4})
    assert answer.status_code == 202, answer.content

    locked_store = topic_store("locked")
    runtime = NodeRuntime(topic="locked", name="locked-a", role="mixed", store=locked_store,
                          engine=batch_engine, hooks=database_hooks())
    NodeWorker(runtime).work(burst=True, logging_level="WARNING")

    assert wait_final(api, answer.json()["request_id"])["status"] == "finished"
    assert locked_store.redis.connection_pool.connection_kwargs["password"] == "pa55word"
    assert not store.redis.keys("*locked*")


def test_the_reapers_stores_follow_the_topics(topic, store):
    from fdconsole.topics import services
    from fdconsole.topics.models import Topic

    def dbs(stores) -> set[int]:
        return {s.redis.connection_pool.connection_kwargs["db"] for s in stores}

    moved = Topic.objects.create(name="moving", scheduler_topic="moving", scheduler_db=TOPIC_DB)
    assert dbs(services.topic_stores()) == {0, TOPIC_DB}
    Topic.objects.filter(pk=moved.pk).update(scheduler_db=MOVED_DB)  # as a move with nothing in flight
    assert dbs(services.topic_stores()) == {0, MOVED_DB}


def test_a_process_keeps_the_stores_it_used_last_and_no_more(redis_url):
    from fdconsole import redis_conn

    def url(i: int) -> str:  # as many distinct URLs as a topic moved again and again would leave
        return f"{redis_url.rsplit('/', 1)[0]}/0?client_name=fd-test-{i}"

    first = redis_conn.store_for_url(url(0))
    for i in range(1, 1 + redis_conn.STORES_KEPT):
        assert redis_conn.store_for_url(url(i)) is redis_conn.store_for_url(url(i))
    assert len(redis_conn._cache) == redis_conn.STORES_KEPT
    assert url(0) not in redis_conn._cache  # the least recently used went
    assert first.redis.ping()  # whoever still holds it can finish with it
    assert redis_conn.store_for_url(url(0)) is not first
