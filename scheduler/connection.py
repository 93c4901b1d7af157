"""Connections: which Redis a topic's scheduler uses, and how the scripts run on it.

Which Redis. FastDeploy's Global and Splitwise schedulers connect with host, port, db and password.
Here a base URL (the console's ``FD_REDIS_URL``) comes first, and each of the four parameters that a
topic sets to something other than its default replaces the base URL's part: a topic that sets
nothing shares the base Redis, one that sets only ``scheduler_db=5`` lives in database 5 of the same
server. With no base URL (the bare scheduler interface) the parameters alone say where to connect.
Passwords travel URL-quoted and never appear in what ``describe`` returns, which is what logs and
error messages show; ``redact`` takes them out of any other text (an exception's message) before it
is shown.

How long a call may take. Every client ``connect`` makes (and every client configured with
``client_options``) gives up on a server that stops answering: within ``CONNECT_TIMEOUT_S`` when it
does not accept the connection, within ``READ_TIMEOUT_S`` when it accepted but never replies (a
SIGSTOPped or frozen server, a firewall that drops packets after the handshake), so that no call
hangs and a Redis that does not answer holds up only what uses it. TCP keepalive finds a dead peer
under an idle pooled connection, and a health check PINGs one idle longer than ``HEALTH_CHECK_S``
before it is used. A blocking command (BLPOP, BLMPOP, XREAD BLOCK) blocks for at most
``MAX_BLOCK_S`` on such a client, so that its reply still comes within the read timeout. Options
in the URL's query (``?socket_timeout=10``) win over these.

How scripts run. ``ScriptRunner`` sends scripts (``scheduler.scripts``) with EVALSHA on a connection of
the calling thread's own, several calls in one round trip; see ``ScriptRunner.run_scripts``.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from redis import Redis
from redis.exceptions import NoScriptError, ResponseError

from scheduler.config import PARAMETERS_BY_NAME, SchedulerConfig
from scheduler.errors import ScriptError
from scheduler.scripts import ScriptCall

DEFAULT_BASE_URL = "redis://127.0.0.1:6379/0"
CONNECTION_FIELDS = ("scheduler_host", "scheduler_port", "scheduler_db", "scheduler_password")
CONNECT_TIMEOUT_S = 3  # a Redis that does not accept the connection fails a request in seconds, not minutes
# A Redis that accepted the connection but sends no reply this long is not answering (stopped, frozen,
# or packets dropped): the call fails. A live one answers our scripts and reads in milliseconds, and
# a persistence fork or a slow script stalls it for far less than this.
READ_TIMEOUT_S = 5.0
MAX_BLOCK_S = READ_TIMEOUT_S - 1.0  # a blocking command's longest block: its reply in time to spare
HEALTH_CHECK_S = 30  # a pooled connection idle this long is PINGed before its next command
# TCP keepalive on idle connections: the first probe after 15 s of silence, then every 5 s; a peer
# that misses 3 is dead (about 30 s), and a NAT or firewall on the way keeps the connection.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 15, 5, 3
LANE_CHECK_AFTER_S = 0.05  # a thread's connection unused this long is checked before its next call


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
        bare = self.host.removeprefix("[").removesuffix("]")  # an IPv6 address, given with brackets or not
        host = f"[{bare}]" if ":" in bare else bare
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


def describe_client(redis: Redis) -> str:
    """Where the client ``redis`` connects, as ``describe`` says it (never the password)."""
    kwargs = redis.connection_pool.connection_kwargs
    where = kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
    return f"{where} (db {kwargs.get('db', 0)})"


def redact(text: str, url: str) -> str:
    """``text`` (an exception's message, say) fit to show or log: ``url`` itself replaced by its
    ``describe``, and its password, as typed or URL-quoted, by ``***`` wherever else it appears."""
    endpoint = RedisEndpoint.parse(url)
    text = text.replace(url, endpoint.describe())
    secrets = {endpoint.password, quote(endpoint.password, safe="")} - {""}
    for secret in sorted(secrets, key=len, reverse=True):  # the longer first: one may contain the other
        text = text.replace(secret, "***")
    return text


def keepalive_options() -> dict[int, int]:
    """The socket options of ``KEEPALIVE_*`` that this platform has (Linux: all three; macOS names
    the idle time TCP_KEEPALIVE)."""
    idle = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)
    wanted = [(idle, KEEPALIVE_IDLE_S), (getattr(socket, "TCP_KEEPINTVL", None), KEEPALIVE_INTERVAL_S),
              (getattr(socket, "TCP_KEEPCNT", None), KEEPALIVE_PROBES)]
    return {option: value for option, value in wanted if option is not None}


def client_options(url: str, read_timeout_s: float = READ_TIMEOUT_S) -> dict[str, Any]:
    """The keyword arguments of redis-py's ``from_url`` (the plain and the asyncio client alike) that
    make a client for ``url`` give up on a server that does not answer: connect and read timeouts,
    keepalive (TCP only: a unix socket has none) and a health check. ``read_timeout_s``: longer for a
    client whose blocking commands block longer than ``MAX_BLOCK_S`` (it blocks that long, plus the
    usual ``READ_TIMEOUT_S``)."""
    options: dict[str, Any] = {"socket_connect_timeout": CONNECT_TIMEOUT_S, "socket_timeout": read_timeout_s,
                               "health_check_interval": HEALTH_CHECK_S}
    if urlsplit(url).scheme != "unix":
        options.update(socket_keepalive=True, socket_keepalive_options=keepalive_options())
    return options


def url_with_client_options(url: str, read_timeout_s: float = READ_TIMEOUT_S) -> str:
    """``url`` with ``client_options`` in its query, for a library that takes nothing but a URL
    (django-rq). Options the URL sets already stay as they are; the keepalive timings cannot travel in
    a URL (the system's defaults apply)."""
    base, _, given = url.partition("?")  # not urlsplit's geturl: it would drop unix://'s slashes
    query = dict(parse_qsl(given))
    for name, value in client_options(url, read_timeout_s).items():
        if name != "socket_keepalive_options":
            query.setdefault(name, "true" if value is True else str(value))
    return f"{base}?{urlencode(query)}"


def connect(url: str) -> Redis:
    """A client for ``url`` (bytes replies, as rq needs) that gives up on a server that does not
    answer (``client_options``)."""
    return Redis.from_url(url, **client_options(url))


_fork_generation = 0  # bumped in a forked child, so that no lane's connection is shared across a fork


def _after_fork() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork)


class _Lane(threading.local):
    """One thread's own connection for the scripts."""

    connection: Any = None
    generation = -1
    used = float("-inf")  # time.monotonic() of its last call


class ScriptRunner:
    """Runs scripts and plain commands on the calling thread's own connection to ``redis`` (made from
    the client's own pool class and settings: passwords, TLS and the retry policy carry over).
    Safe to share between threads and across a fork."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis  # the client: its pool serves everything that is not a script
        self._lane = _Lane()

    def run_scripts(self, calls: Sequence[ScriptCall], commands: Sequence[tuple[Any, ...]] = ()) -> list[Any]:
        """Run ``commands`` then ``calls`` in one round trip; the calls' replies, in order.

        The scheduler's hot paths are a script or a few per call: going through redis-py's pool and
        pipeline objects costs a lock, two getpid calls and a readiness poll per round trip, about a
        third of the client's CPU time per call. Scripts go by digest (EVALSHA): a script Redis lacks
        (after a restart or SCRIPT FLUSH) is loaded and only the calls it refused run again. An error
        reply raises after every reply was read, so the connection stays in step; a script's error
        is a ``ScriptError`` naming its file and line. Connection errors are retried as the client's
        own retry policy says.
        """
        sent = [*commands, *[("EVALSHA", c.script.sha, len(c.keys), *c.keys, *c.argv) for c in calls]]
        replies = self._round_trip(sent)
        if commands:
            _raise_errors(replies[:len(commands)])
            replies = replies[len(commands):]
        for reply in replies:  # the common case, on every call's path: no error reply at all
            if isinstance(reply, ResponseError):
                break
        else:
            return replies
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            for script in {calls[i].script.sha: calls[i].script for i in missing}.values():
                self.redis.script_load(script.source)
            again = self._round_trip([sent[len(commands) + i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return _raise_errors(replies, calls)

    def run_command(self, *args: Any) -> Any:
        """One plain command on this thread's own connection (a blocking pop, say)."""
        return self.run_commands([args])[0]

    def run_commands(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Plain commands in one round trip; their replies (an error reply raises, after all were read)."""
        return _raise_errors(self._round_trip(list(commands)))

    def _round_trip(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        lane = self._lane
        if lane.connection is None or lane.generation != _fork_generation:
            pool = self.redis.connection_pool
            lane.connection = pool.connection_class(**pool.connection_kwargs)
            lane.generation = _fork_generation
        conn = lane.connection
        # As redis-py's pool does before every command, but only after a pause: a connection the
        # server closed meanwhile (a restart, its idle timeout, a proxy reset) is replaced before
        # anything is sent on it, not found dead by the call. A socket with nothing sent on it has
        # nothing to read unless it was closed. On a busy thread the poll, a call that gives up the
        # GIL, cost 7% of the splitwise benchmark; a close within its pause fails one call, as one
        # in flight would. (redis-py keeps the socket in ``_sock``; one not connected yet connects
        # when the call sends.)
        now = time.monotonic()
        sock = conn._sock if now - lane.used > LANE_CHECK_AFTER_S else None
        lane.used = now
        if sock is not None:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            if poller.poll(0):
                conn.disconnect()  # closed, or bytes nobody asked for: either way not fit to use
        packed = conn.pack_commands(commands)

        def send_and_read() -> list[Any]:
            try:
                conn.send_packed_command(packed)
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(conn.read_response())
                    except ResponseError as exc:  # an error reply: the connection is still in step
                        replies.append(exc)
                return replies
            except BaseException:  # anything else (a signal's exception between two replies, say)
                conn.disconnect()  # leaves replies unread: never read them as the next call's
                raise

        return conn.retry.call_with_retry(send_and_read, lambda _: conn.disconnect())


def _raise_errors(replies: list[Any], calls: Sequence[ScriptCall] | None = None) -> list[Any]:
    """``replies`` when none is an error reply; else the first one raised: a script's (``calls``, in
    the order of the replies) as ``ScriptError``, naming the file and line. On every call's path: kept
    to one plain loop."""
    for i, reply in enumerate(replies):
        if isinstance(reply, ResponseError):
            if calls is None:
                raise reply
            script = calls[i].script
            raise ScriptError(script.name, script.locate(str(reply)), str(reply)) from reply
    return replies
