"""Shared fixtures: a real Redis server started for the session on a free port, API clients, and an
in-process node for tests that need requests to run without a separate process."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

from fdconsole.embedded_redis import EmbeddedRedis

_redis: EmbeddedRedis | None = None
E2E_DB = 1  # end-to-end clusters use their own Redis database, untouched by per-test flushes
LOCKED_PASSWORDS = ("s3cret", "hunter2-secret", "pa55word")  # what the ``locked_redis`` server takes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pytest_configure(config) -> None:
    global _redis
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # pytest-xdist's controller: it runs no test, each of its workers configures itself
    _redis = EmbeddedRedis(free_port()).start()
    os.environ["FD_TEST_REDIS_URL"] = _redis.url
    # The suite serves the seeded byte-level model unless a test is about real models; node and console
    # processes that tests start inherit it.
    os.environ["FD_MODEL"] = "tiny"
    from django.conf import settings

    settings.FD_MODEL = "tiny"

    settings.FD_REDIS_URL = _redis.url
    # The same client options as fdconsole.settings gives them (timeouts, keepalive), on the test server.
    from scheduler.connection import client_options, url_with_client_options

    layer_host = {"address": _redis.url, **client_options(_redis.url, settings.CHANNEL_LAYER_READ_TIMEOUT_S)}
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [layer_host]}}
    }
    settings.RQ_QUEUES = {"default": {"URL": url_with_client_options(_redis.url),
                                      "SERIALIZER": "rq.serializers.JSONSerializer"}}
    # Neither password hashing nor static files are what the tests are about: a cheap hasher, and
    # WhiteNoise looking files up per request instead of scanning STATIC_ROOT for each test client.
    if settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"):
        # A file, not shared-cache memory: threads of a test (SSE readers, a node) then wait on the
        # busy timeout instead of failing with "database table is locked".
        test_db = Path(tempfile.mkdtemp(prefix="fd-test-db-")) / "test.sqlite3"
        settings.DATABASES["default"]["TEST"]["NAME"] = str(test_db)
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.WHITENOISE_AUTOREFRESH = True


def pytest_unconfigure(config) -> None:
    if _redis is not None:
        _redis.stop()


@pytest.fixture
def redis_url() -> str:
    return os.environ["FD_TEST_REDIS_URL"]


@pytest.fixture
def redis_conn(redis_url):
    """A raw connection to the test server's database 0, emptied before each test."""
    from redis import Redis

    conn = Redis.from_url(redis_url)
    conn.flushdb()
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def locked_redis():
    """A second Redis server that takes any of ``LOCKED_PASSWORDS`` and refuses clients without one,
    for topics that set their own scheduler_port and scheduler_password."""
    from redis import Redis

    server = EmbeddedRedis(free_port()).start()
    with Redis.from_url(server.url) as conn:
        conn.execute_command("ACL", "SETUSER", "default", "on", "resetpass",
                             *(f">{password}" for password in LOCKED_PASSWORDS))
    yield server
    server.stop()


@pytest.fixture
def store(redis_conn):
    from fdconsole.redis_conn import get_store

    return get_store()


@pytest.fixture
def api_user(db, store):
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    # An operator: may create topics, change them and point them at another Redis (topics.access).
    user = get_user_model().objects.create_user("alice", password="pw-alice-123", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(
        content_type__app_label="topics", codename__in=["add_topic", "change_topic", "change_topic_redis"]))
    return user


@pytest.fixture
def api_token(api_user) -> str:
    from fdconsole.api.models import ApiToken

    _, plain = ApiToken.issue(api_user, "tests")
    return plain


@pytest.fixture
def api(api_token):
    """A Django test client that sends the bearer token and JSON helpers."""
    from django.test import Client

    return ApiClient(Client(HTTP_AUTHORIZATION=f"Bearer {api_token}"))


class ApiClient:
    def __init__(self, client) -> None:
        self.client = client

    def get(self, path: str):
        return self.client.get(path)

    def delete(self, path: str):
        return self.client.delete(path)

    def post(self, path: str, body=None, raw: str | bytes | None = None):
        import json

        data = raw if raw is not None else json.dumps(body)
        return self.client.post(path, data=data, content_type="application/json")

    def patch(self, path: str, body=None, raw: str | bytes | None = None):
        import json

        data = raw if raw is not None else json.dumps(body)
        return self.client.patch(path, data=data, content_type="application/json")


@pytest.fixture
def admin(db):
    """A test client logged in as superuser ``root``."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    client = Client()
    client.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "pw-root-123"))
    return client


@pytest.fixture
def topic(db, store):
    from fdconsole.topics.services import ensure_topic

    return ensure_topic("default")


@pytest.fixture
def node(topic):
    from fdconsole.topics.services import ensure_node

    return ensure_node("node-a", topic)


@pytest.fixture(scope="session")
def engine():
    """The model, built once for the session (what a node keeps resident)."""
    from gpu_worker.engine import Engine

    return Engine(device="cpu")


@pytest.fixture
def batch_engine(engine):
    """A node's batching engine over the session's model, with a small KV cache (quick to allocate)."""
    from gpu_worker.batch_engine import BatchEngine
    from gpu_worker.capacity import EngineCapacity

    return BatchEngine(engine, EngineCapacity(num_kv_blocks=512))


@pytest.fixture
def run_node(batch_engine, store):
    """Run a node's queued work in this process (rq's burst mode), as ``fdnode --burst`` does."""
    from fdconsole.cluster.hooks import database_hooks
    from gpu_worker.node import NodeWorker
    from gpu_worker.runtime import NodeRuntime

    def run(node_name: str = "node-a", topic: str = "default") -> None:
        runtime = NodeRuntime(topic=topic, name=node_name, role="mixed", store=store, engine=batch_engine,
                              hooks=database_hooks())
        NodeWorker(runtime).work(burst=True, logging_level="WARNING")

    return run


@pytest.fixture
def node_processes(store, redis_url):
    """Real ``fdnode`` processes (see tests/nodes.py); use with ``django_db(transaction=True)``."""
    from tests.nodes import NodeProcesses

    processes = NodeProcesses(redis_url)
    yield processes
    processes.stop_all()


@pytest.fixture
def global_topic(db, store):
    """Topic ``default`` with the Global scheduler."""
    from fdconsole.topics.services import change_topic, ensure_topic

    return change_topic(ensure_topic("default"), {"scheduler_name": "global"})


# -- browser tests (tests/browser.py) ----------------------------------------------------------------
@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"report_{report.when}", report)  # lets browser_page screenshot a failed test
    return report


@pytest.fixture(scope="module")
def console_process(request, django_db_setup, tmp_path_factory):
    """The real console (``fdcluster --nodes 0``) on a free port, shared by a module's tests and stopped
    at its end, so that its reaper and pulse never run beside other tests' Redis state."""
    from tests.browser import Console, require_browser
    from tests.nodes import children_database_url

    module_items = (item for item in request.session.items if item.module is request.module)
    if any(item.get_closest_marker("browser") for item in module_items):
        require_browser()  # no point starting a console for tests that will skip
    running = Console(tmp_path_factory.mktemp("console"), os.environ["FD_TEST_REDIS_URL"],
                      children_database_url(), free_port())
    yield running
    running.stop()


@pytest.fixture
def console(console_process, transactional_db, store, settings):
    """The module's console, running, with topic ``default``; ``.url``, ``.stop()``, ``.start()``.

    Users the test creates get password hashes the console can check (it has no test-only MD5)."""
    from fdconsole.topics.services import ensure_topic
    from tests.browser import console_password_hashers

    settings.PASSWORD_HASHERS = console_password_hashers()
    if not console_process.running:  # the first test, or one that stopped it and failed
        console_process.start()
    ensure_topic("default")  # fdcluster made it, but each test's flush took it (and Redis) away
    return console_process


@pytest.fixture
def shot(request):
    """``shot(page, name)`` saves tests/artifacts/<test name>-<name>.png and returns its path."""
    from tests.browser import screenshot_path

    def save(page, name: str) -> Path:
        path = screenshot_path(request.node.name, name)
        page.screenshot(path=str(path), full_page=True)
        return path

    return save


@pytest.fixture
def browser_page(request, transactional_db, monkeypatch, shot):
    """A fresh 1366x800 page in headless Chromium; a failed test leaves a ``-failure`` screenshot."""
    from tests.browser import TIMEOUT_MS, VIEWPORT, expect, launch, require_browser, sync_playwright

    require_browser()
    # Playwright's sync API keeps an event loop running in this thread, which Django's ORM takes for
    # async code; the test's own queries are plain synchronous ones.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = launch(playwright)
        context = browser.new_context(viewport=VIEWPORT)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        yield page
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            shot(page, "failure")
        browser.close()
