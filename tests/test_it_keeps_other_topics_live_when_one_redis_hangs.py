"""A topic Redis that accepts connections and never answers (a stopped server, a frozen VM, a firewall
that drops packets after the handshake) holds up only its own topic: every call to it fails within the
read timeout, the reaper keeps expiring the other topics' requests on time, and the pulse keeps sending
the other topics' pages (and the cluster page) an update every tick, while the stuck topic's page and
its row on the cluster page say that its Redis, at host:port, is not answering. Blocking commands of
their normal length still work with the timeouts."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from channels_redis.core import RedisChannelLayer
from redis.exceptions import TimeoutError as RedisTimeoutError

from scheduler.connection import MAX_BLOCK_S, READ_TIMEOUT_S, ScriptRunner, connect
from tests.nodes import wait_row_status

pytestmark = pytest.mark.django_db(transaction=True)
WATCH_S = 6.5  # longer than READ_TIMEOUT_S: the stuck sample times out and the next one starts meanwhile
PAGES = {"default": "/ws/topics/default/", "cluster": "/ws/cluster/", "far": "/ws/topics/far/"}
SLACK_S = 0.3  # per tick, what a busy test machine may add (for the least number of updates expected)


class Blackhole:
    """A TCP listener on 127.0.0.1 that accepts every connection, holds it open and never replies."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.held: list[socket.socket] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, name="blackhole", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.held.append(conn)  # read nothing, answer nothing

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=2)
        for conn in [*self.held, self.listener]:
            conn.close()


@pytest.fixture
def blackhole():
    hole = Blackhole()
    yield hole
    hole.close()


@pytest.fixture
def stuck_topic(db, blackhole):
    """Topic ``far``, whose Redis is the blackhole, with a node (rows made directly: the API would check
    the Redis first, and wait out its timeout)."""
    from fdconsole.nodes.models import Node
    from fdconsole.topics.models import Topic

    far = Topic.objects.create(name="far", scheduler_topic="far", scheduler_port=blackhole.port)
    Node.objects.create(name="far-1", topic=far)
    return far


def timed(call) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        call()
    except Exception as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


def test_a_call_to_a_redis_that_never_answers_fails_within_the_read_timeout(blackhole, redis_url):
    client = connect(blackhole.url)
    seconds, error = timed(client.ping)
    assert isinstance(error, RedisTimeoutError), error
    assert READ_TIMEOUT_S - 0.5 <= seconds <= READ_TIMEOUT_S + 1.5, seconds
    assert f"127.0.0.1:{blackhole.port}" in str(error)
    # A thread's own lane for the scripts is made from the same options, keepalive included.
    lane = ScriptRunner(client)._lane
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == READ_TIMEOUT_S and kwargs["socket_keepalive"]
    assert kwargs["socket_connect_timeout"] and kwargs["health_check_interval"]
    assert lane.connection is None  # made on first use, from those kwargs (scheduler.connection)


def test_blocking_calls_of_their_normal_length_still_work(redis_conn, redis_url, store):
    """The longest block a client of ``connect`` may make, and the channel layer's receive, which blocks
    in BZPOPMIN for its own 5 s at a time: neither trips the read timeout."""
    client = connect(redis_url)
    blocked: list[tuple[float, BaseException | None]] = []
    pop = threading.Thread(target=lambda: blocked.append(timed(
        lambda: client.blpop(["fd:test:never"], timeout=MAX_BLOCK_S))))
    pop.start()  # meanwhile, the channel layer
    assert store.wait_for_work("default", "node-a", 0.05) is False

    layer = get_channel_layer()
    assert isinstance(layer, RedisChannelLayer)
    assert layer.hosts[0]["socket_timeout"] > layer.brpop_timeout

    async def receive_after_a_long_wait():
        channel = await layer.new_channel()

        async def send_later():
            await asyncio.sleep(layer.brpop_timeout + 1)  # the receive's BZPOPMIN timed out once meanwhile
            await layer.send(channel, {"type": "hello"})

        sender = asyncio.create_task(send_later())
        message = await asyncio.wait_for(layer.receive(channel), timeout=layer.brpop_timeout + 5)
        await sender
        return message

    assert async_to_sync(receive_after_a_long_wait)() == {"type": "hello"}
    pop.join(timeout=MAX_BLOCK_S + 2)
    [(seconds, error)] = blocked
    assert error is None and seconds >= MAX_BLOCK_S - 0.1


def test_rq_keeps_the_nodes_read_timeout(store, batch_engine):
    """rq would raise the shared pool's socket timeout to minutes for a BLPOP the node never makes."""
    from gpu_worker.node import IDLE_WAIT_S, NodeWorker
    from gpu_worker.runtime import NodeRuntime

    runtime = NodeRuntime(topic="default", name="node-a", role="mixed", store=store, engine=batch_engine)
    worker = NodeWorker(runtime)
    assert worker.connection.connection_pool.connection_kwargs["socket_timeout"] == READ_TIMEOUT_S
    assert IDLE_WAIT_S < MAX_BLOCK_S


def test_the_rq_pages_client_has_the_timeouts(settings):
    from django_rq.queues import get_connection

    kwargs = get_connection("default").connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == READ_TIMEOUT_S and kwargs["socket_keepalive"]


def test_the_reaper_keeps_expiring_the_other_topics_requests(api, node, stuck_topic, store):
    from fdconsole.cluster.hooks import sync_many
    from fdconsole.inference.models import Request
    from fdconsole.topics.services import topic_stores
    from scheduler.reaper import Reaper

    api.patch("/api/v1/topics/default", {"scheduler_ttl": 1})
    answer = api.post("/api/v1/topics/default/requests", {"prompt": "hi", "max_tokens": 4})
    assert answer.status_code == 202, answer.content
    reaper = Reaper(topic_stores, sync_many)  # as the console runs it: every topic's Redis
    reaper.start()
    try:
        row = Request.objects.get()
        wait_row_status(row, "expired")
        assert len(reaper.reapers) == 2  # one thread for the test Redis, one for the blackhole
    finally:
        reaper.stop()
        reaper.join(timeout=2)
    assert row.status == "expired"
    waited = (row.finished_at - row.created_at).total_seconds()
    assert 1.0 <= waited <= 2.0, waited  # on time, though the blackhole's pass hangs for seconds


@pytest.fixture
def ops(db):
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user("ops")


def communicator(path: str, user) -> WebsocketCommunicator:
    from fdconsole.dashboard.routing import websocket_urlpatterns

    talk = WebsocketCommunicator(URLRouter(websocket_urlpatterns), path)
    talk.scope["user"] = user
    return talk


async def collect(talk: WebsocketCommunicator, until: float) -> list[tuple[float, dict]]:
    """Every message the page gets until ``until`` (monotonic), with when it came. Never times out a
    receive (that would cancel the consumer): it looks, and waits a little, until the end."""
    got = []
    while time.monotonic() < until:
        if not await talk.receive_nothing(timeout=0.02):
            got.append((time.monotonic(), await talk.receive_json_from()))
    return got


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]


def test_the_pulse_keeps_other_pages_live_and_says_which_redis_is_not_answering(
        topic, node, stuck_topic, store, ops, blackhole):
    from fdconsole.dashboard.pulse import TICK_S, PulseThread

    store.write_heartbeat("default", "node-a", {"state": "idle", "role": "mixed"})
    where = f"127.0.0.1:{blackhole.port}"

    async def beat_midway(pages: dict) -> None:
        """A heartbeat half-way through, to be seen on the healthy topic's page within a second."""
        await asyncio.sleep(WATCH_S / 2)
        pages["beat"] = time.monotonic()
        store.write_heartbeat("default", "node-a", {"state": "busy", "role": "mixed"})

    async def watch():
        pages = {}
        for name in PAGES:
            talk = pages[name] = communicator(PAGES[name], ops)
            started = time.monotonic()
            assert (await talk.connect(timeout=5))[0]
            pages[name, "hello"] = await talk.receive_json_from(timeout=5)
            pages[name, "hello_s"] = time.monotonic() - started
        pulse = PulseThread()
        pulse.start()
        try:
            until = time.monotonic() + WATCH_S
            *received, _ = await asyncio.gather(*(collect(pages[name], until) for name in PAGES),
                                                beat_midway(pages))
        finally:
            pulse.stop()
            await asyncio.get_running_loop().run_in_executor(None, pulse.join, 5)
        for name in PAGES:
            await pages[name].disconnect()
        return pages, dict(zip(PAGES, received, strict=True))

    pages, received = async_to_sync(watch)()

    # Greeted at once, the stuck page included, which says where its Redis is and that it does not answer.
    assert all(pages[name, "hello_s"] < 2.5 for name in PAGES)
    far_hello = pages["far", "hello"]
    assert "not answering" in far_hello["error"] and where in far_hello["error"]
    assert [(n["name"], n["state"]) for n in far_hello["nodes"]] == [("far-1", "unknown")]
    healthy = pages["default", "hello"]
    assert healthy["nodes"][0]["state"] == "idle" and "error" not in healthy

    # The healthy topic's page and the cluster page: an update every tick, none more than a second apart.
    for name in ("default", "cluster"):
        times = [at for at, _ in received[name]]
        assert len(times) >= WATCH_S / (TICK_S + SLACK_S), (name, len(times))
        assert max(gaps(times)) < 1.0, (name, max(gaps(times)))
    assert all("error" not in message for _, message in received["default"])

    # What changed on the healthy topic mid-way reached its page within a second.
    beat_at = pages["beat"]
    busy = [at for at, m in received["default"] if at > beat_at and m["nodes"][0]["state"] == "busy"]
    assert busy and busy[0] - beat_at < 1.0

    # The stuck topic's page and its row on the cluster page say so, every tick, until it answers.
    far_updates = [message for _, message in received["far"]]
    assert far_updates and all("not answering" in m["error"] and where in m["error"] for m in far_updates)
    for _, message in received["cluster"]:
        rows = {row["name"]: row for row in message["topics"]}
        assert rows["default"]["error"] is None
        assert "not answering" in rows["far"]["error"] and rows["far"]["redis"] == f"{where} (db 0)"


def test_the_pages_render_at_once_naming_the_stuck_redis(topic, node, stuck_topic, store, ops, blackhole):
    from django.test import Client

    store.write_heartbeat("default", "node-a", {"state": "idle", "role": "mixed"})
    browser = Client()
    browser.force_login(ops)
    for path in ("/", "/topics/far/", "/topics/default/"):
        seconds, page = timed_get(browser, path)
        assert page.status_code == 200 and seconds < 2.5, (path, seconds)
        text = page.content.decode()
        if path == "/topics/default/":
            assert "not answering" not in text
        else:
            assert "not answering" in text and f"127.0.0.1:{blackhole.port}" in text


def timed_get(browser, path: str):
    started = time.monotonic()
    page = browser.get(path)
    return time.monotonic() - started, page


def test_a_topic_whose_redis_answers_again_is_live_again(topic, store):
    """A real redis-server, stopped (SIGSTOP) and continued: its topic's page says it is not answering
    while it is stopped, and carries no error once it answers again."""
    from fdconsole.dashboard.pulse import TICK_S, Pulse
    from fdconsole.embedded_redis import EmbeddedRedis
    from fdconsole.topics.models import Topic
    from tests.conftest import free_port

    server = EmbeddedRedis(free_port()).start()
    pulse = Pulse()
    try:
        Topic.objects.create(name="paused", scheduler_topic="paused", scheduler_port=server.port)
        server.process.send_signal(signal.SIGSTOP)
        try:
            messages = dict(pulse.tick())
            assert "error" not in messages["topic.default"]
            assert "not answering" in messages["topic.paused"]["error"]
            assert f"127.0.0.1:{server.port}" in messages["topic.paused"]["error"]
        finally:
            server.process.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + READ_TIMEOUT_S + 2
        while "error" in (paused := dict(pulse.tick())["topic.paused"]) and time.monotonic() < deadline:
            time.sleep(TICK_S)
        assert "error" not in paused
    finally:
        pulse.close()
        server.stop()
