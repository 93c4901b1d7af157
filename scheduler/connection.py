"""Which Redis a topic's scheduler uses, from its ``scheduler_host/port/db/password``.

Design note. FastDeploy's Global and Splitwise schedulers connect with host, port, db and password.
Here a base URL (the console's ``FD_REDIS_URL``) comes first, and each of the four parameters that a
topic sets to something other than its default replaces the base URL's part: a topic that sets
nothing shares the base Redis, one that sets only ``scheduler_db=5`` lives in database 5 of the same
server. With no base URL (the bare scheduler interface) the parameters alone say where to connect.
Passwords travel URL-quoted and never appear in what ``describe`` returns, which is what logs and
error messages show.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from redis import Redis

from scheduler.config import PARAMETERS_BY_NAME, SchedulerConfig

DEFAULT_BASE_URL = "redis://127.0.0.1:6379/0"
CONNECTION_FIELDS = ("scheduler_host", "scheduler_port", "scheduler_db", "scheduler_password")
CONNECT_TIMEOUT_S = 3  # a Redis that does not answer fails a request in seconds, not minutes


@dataclass(frozen=True)
class RedisEndpoint:
    """The parts of a Redis URL that a topic may replace, plus what it keeps from the base."""

    scheme: str  # redis, rediss or unix
    host: str  # for unix://, the socket path
    port: int
    db: int
    username: str
    password: str
    query: str  # the base URL's other options (timeouts, ssl), kept as they are

    @classmethod
    def parse(cls, url: str) -> RedisEndpoint:
        parts = urlsplit(url)
        options = dict(parse_qsl(parts.query))
        path_db = parts.path.lstrip("/") if parts.scheme != "unix" else ""
        db = int(path_db or options.pop("db", 0))
        host = parts.path if parts.scheme == "unix" else parts.hostname or "127.0.0.1"
        return cls(parts.scheme, host, parts.port or 6379, db, unquote(parts.username or ""),
                   unquote(parts.password or ""), urlencode(options))

    @property
    def url(self) -> str:
        auth = quote(self.username, safe="")
        if self.password:
            auth += ":" + quote(self.password, safe="")
        auth += "@" if auth else ""
        if self.scheme == "unix":
            return f"unix://{auth}{self.host}?" + urlencode([("db", self.db), *parse_qsl(self.query)])
        host = f"[{self.host}]" if ":" in self.host else self.host
        options = f"?{self.query}" if self.query else ""
        return f"{self.scheme}://{auth}{host}:{self.port}/{self.db}{options}"

    def describe(self) -> str:
        """Where it is, for logs and error messages: host:port and db, never the password."""
        where = self.host if self.scheme == "unix" else f"{self.host}:{self.port}"
        return f"{where} (db {self.db})"


def _overrides(config: SchedulerConfig) -> dict[str, str | int]:
    """The connection parameters the topic sets to something other than their defaults."""
    return {name: getattr(config, name) for name in CONNECTION_FIELDS
            if getattr(config, name) != PARAMETERS_BY_NAME[name].default}


def topic_redis_url(config: SchedulerConfig, base_url: str = DEFAULT_BASE_URL) -> str:
    """The URL of ``config``'s Redis: ``base_url`` with each connection parameter that the topic sets
    (differs from its default) put in. A topic that sets none gets ``base_url`` itself, so that it
    shares the base connection."""
    changes = _overrides(config)
    if not changes:
        return base_url
    endpoint = RedisEndpoint.parse(base_url)
    if endpoint.scheme == "unix" and ({"scheduler_host", "scheduler_port"} & changes.keys()):
        endpoint = replace(endpoint, scheme="redis", host="127.0.0.1", port=6379)  # a socket has no port
    return replace(endpoint, host=str(changes.get("scheduler_host", endpoint.host)),
                   port=int(changes.get("scheduler_port", endpoint.port)),
                   db=int(changes.get("scheduler_db", endpoint.db)),
                   password=str(changes.get("scheduler_password", endpoint.password))).url


def describe(url: str) -> str:
    """``url`` as logs and errors may show it: host:port and db, without any password."""
    return RedisEndpoint.parse(url).describe()


def connect(url: str) -> Redis:
    """A client for ``url`` (bytes replies, as rq needs) that gives up on a dead server quickly."""
    return Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S, health_check_interval=30)
