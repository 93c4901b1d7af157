"""Secrets stay secret: the files holding them (.secret_key, .run/admin_password, .run/api_token) are
mode 0600 from their first byte whatever the umask; `make run` (fdcluster) says where its admin password
and API token are kept and prints the token only on the run that made it; /healthz names what failed and
nothing more, the detail going to the log with passwords masked; a Redis URL is shown as host:port and
db, never with its password."""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from django.test import Client
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.conftest import free_port
from tests.test_it_reports_health import closed_port

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "hunter2-secret"
START_TIMEOUT_S = 90
CLUSTER_DB = 7  # fdcluster's own Redis database here, emptied before and after


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- files holding secrets --------------------------------------------------------------------------
def test_the_generated_secret_key_is_owner_only_even_with_an_open_umask(tmp_path, monkeypatch):
    """Written whole into a file that was 0600 from the start: never created wider and chmod-ed after."""
    from fdconsole.env import secret_key

    def no_chmod(*args, **kwargs):
        raise AssertionError("a secret file was chmod-ed after it was written")

    monkeypatch.delenv("FD_SECRET_KEY", raising=False)
    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    previous = os.umask(0)
    try:
        key = secret_key(tmp_path / ".secret_key")
    finally:
        os.umask(previous)
    assert mode(tmp_path / ".secret_key") == 0o600
    assert len(key) >= 50 and secret_key(tmp_path / ".secret_key") == key
    assert [p.name for p in tmp_path.iterdir()] == [".secret_key"]  # no temporary file left behind


def test_processes_starting_together_agree_on_one_secret_key(tmp_path):
    code = ("import os, sys, pathlib; from fdconsole.env import secret_key; os.umask(0); "
            "print(secret_key(pathlib.Path(sys.argv[1])))")
    env = {k: v for k, v in os.environ.items() if k != "FD_SECRET_KEY"}
    starts = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / ".secret_key")], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, text=True) for _ in range(8)]
    keys = {process.communicate(timeout=60)[0].strip() for process in starts}
    assert len(keys) == 1 and len(keys.pop()) >= 50
    assert mode(tmp_path / ".secret_key") == 0o600


# -- make run's banner ------------------------------------------------------------------------------
class Run:
    """One ``manage.py fdcluster --nodes 0`` (or ``nodes``) under umask 000, its output collected."""

    def __init__(self, env: dict[str, str], port: int, nodes: int = 0) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "fdcluster", "--nodes", str(nodes), "--port", str(port)], cwd=ROOT,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, umask=0)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in iter(self.process.stdout.readline, ""):
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_banner(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if any("Ctrl-C stops everything." in line for line in self.lines):
                return self.output
            if self.process.poll() is not None:
                raise AssertionError(f"fdcluster exited with {self.process.returncode}:\n{self.output}")
            time.sleep(0.1)
        raise AssertionError(f"no banner within {START_TIMEOUT_S}s:\n{self.output}")

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.output


@pytest.fixture
def cluster_env(tmp_path, redis_url):
    from redis import Redis

    url = redis_url.rsplit("/", 1)[0] + f"/{CLUSTER_DB}"
    Redis.from_url(url).flushdb()
    env = {k: v for k, v in os.environ.items() if k not in ("FD_ASGI", "FD_ADMIN_PASSWORD")}
    env.update(FD_REDIS_URL=url, DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
               FD_RUN_DIR=str(tmp_path / "run"), FD_SECRET_KEY="s" * 50, FD_LOG_LEVEL="WARNING",
               FD_DEVICE="cpu", PYTHONUNBUFFERED="1")
    yield env
    Redis.from_url(url).flushdb()


def wait_for_health(base: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the console never answered /healthz")


@pytest.mark.e2e
def test_make_run_keeps_its_secrets_in_owner_only_files_and_prints_the_token_once(cluster_env):
    run_dir, port = Path(cluster_env["FD_RUN_DIR"]), free_port()
    first = Run(cluster_env, port)
    try:
        banner = first.wait_for_banner()
    finally:
        said_first = first.stop()
    password = (run_dir / "admin_password").read_text().strip()
    token = (run_dir / "api_token").read_text().strip()
    assert mode(run_dir) == 0o700
    assert mode(run_dir / "admin_password") == mode(run_dir / "api_token") == 0o600
    assert sorted(p.name for p in run_dir.iterdir()) == ["admin_password", "api_token"]
    assert f"password in {run_dir / 'admin_password'}" in banner
    assert f"API token:  {token}" in banner and said_first.count(token) == 1  # this once: it is new
    assert f"kept in {run_dir / 'api_token'}" in banner
    assert password not in said_first

    second = Run(cluster_env, port)
    try:
        banner = second.wait_for_banner()
        base = f"http://127.0.0.1:{port}"
        wait_for_health(base)
        kept = httpx.get(base + "/api/v1/topics", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert kept.status_code == 200, kept.text  # the token in the file is the live one
    finally:
        said_second = second.stop()
    assert f"API token   kept in {run_dir / 'api_token'}" in banner
    assert "API token:" not in said_second  # what scripts read the token from
    assert token not in said_second and password not in said_second
    assert (run_dir / "api_token").read_text().strip() == token


@pytest.mark.e2e
def test_the_embedded_redis_of_make_run_asks_for_a_password_kept_owner_only(cluster_env):
    from redis import Redis
    from redis.exceptions import AuthenticationError, ResponseError

    run_dir, port, redis_port = Path(cluster_env["FD_RUN_DIR"]), free_port(), free_port()
    env = {**cluster_env, "FD_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}  # nothing answers there
    run = Run(env, port)
    try:
        banner = run.wait_for_banner()
        password = (run_dir / "redis_password").read_text().strip()
        assert mode(run_dir / "redis_password") == 0o600 and len(password) >= 24
        assert f"asks for the password in {run_dir / 'redis_password'}" in banner
        with pytest.raises((AuthenticationError, ResponseError), match="(?i)auth"):
            Redis(port=redis_port).ping()  # another user of the machine: refused
        assert Redis(port=redis_port, password=password).ping()
        wait_for_health(f"http://127.0.0.1:{port}")  # the console was given the password
    finally:
        said = run.stop()
    assert password not in said
    with pytest.raises(RedisConnectionError):
        Redis(port=redis_port, password=password, socket_connect_timeout=1).ping()  # stopped with the run


def test_make_run_names_a_redis_it_cannot_reach_without_its_password(cluster_env):
    env = {**cluster_env, "FD_REDIS_URL": f"redis://:{PASSWORD}@192.0.2.1:6379/0"}  # TEST-NET: no one there
    done = subprocess.run([sys.executable, "manage.py", "fdcluster", "--nodes", "0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "nothing answers at 192.0.2.1:6379 (db 0)" in done.stderr
    assert PASSWORD not in done.stdout + done.stderr


# -- /healthz ---------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_healthz_names_the_failing_redis_and_logs_where_without_the_password(settings, store, caplog):
    from fdconsole import redis_conn

    port = closed_port()
    redis_conn._cache.clear()
    settings.FD_REDIS_URL = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    try:
        with caplog.at_level(logging.WARNING):
            answer = Client().get("/healthz")
    finally:
        redis_conn._cache.clear()
    assert answer.status_code == 503
    assert answer.json() == {"status": "unavailable", "failed": ["redis"]}
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert f"127.0.0.1:{port} (db 0)" in logged and "Connection refused" in logged
    assert PASSWORD not in logged and PASSWORD not in answer.content.decode()


@pytest.mark.django_db
def test_healthz_names_the_failing_database_and_masks_its_password_in_the_log(store, monkeypatch, caplog):
    from django.db import connection

    def refuse():
        raise Exception(f"connection to server failed: password={PASSWORD} was refused")

    monkeypatch.setitem(connection.settings_dict, "PASSWORD", PASSWORD)
    monkeypatch.setattr(connection, "cursor", refuse)
    with caplog.at_level(logging.WARNING):
        answer = Client().get("/healthz")
    assert answer.status_code == 503
    assert answer.json() == {"status": "unavailable", "failed": ["database"]}
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "connection to server failed: password=*** was refused" in logged
    assert PASSWORD not in logged


# -- Redis URLs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("password", [PASSWORD, "p@ss:w/rd #1"])
def test_an_error_that_quotes_a_redis_url_shows_it_without_the_password(password):
    from fdconsole.errors import TopicRedisUnavailable
    from scheduler.config import parse_config
    from scheduler.connection import topic_redis_url

    url = topic_redis_url(parse_config({"scheduler_password": password, "scheduler_port": 6390}),
                          "redis://127.0.0.1:6379/0")
    failure = RedisConnectionError(f"Error connecting to {url} (AUTH {password} refused)")
    message = TopicRedisUnavailable.of("default", url, failure).message
    assert message == ("the Redis of topic 'default' at 127.0.0.1:6390 (db 0) is unavailable: "
                       "Error connecting to 127.0.0.1:6390 (db 0) (AUTH *** refused)")


@pytest.mark.django_db
def test_the_topic_page_says_where_its_redis_is_without_the_password(admin, node):
    from fdconsole.topics.models import Topic

    port = closed_port()
    Topic.objects.filter(name="default").update(scheduler_port=port, scheduler_password=PASSWORD)
    page = admin.get("/topics/default/").content.decode()
    assert f"127.0.0.1:{port} (db 0)" in page and PASSWORD not in page
