"""The console's Redis (``FD_REDIS_URL``), each topic's Redis, and the stores built on them.

A topic's Redis is ``FD_REDIS_URL`` with the topic's own ``scheduler_host/port/db/password`` put in
where they differ from their defaults (``scheduler.connection.topic_redis_url``): everything about a
topic's requests (queues, streams, heartbeats, rq jobs) lives there. One store per resolved URL per
process, so topics that share a Redis share its connection pool. A topic is given as its row (any
object with ``name`` and ``config``, such as ``fdconsole.topics.models.Topic``) or its configuration.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from django.conf import settings
from redis import Redis
from redis.exceptions import RedisError

from fdconsole.errors import TopicRedisUnavailable
from scheduler.config import SchedulerConfig
from scheduler.connection import connect, describe, redact, topic_redis_url
from scheduler.store import RequestStore
from scheduler.telemetry import Telemetry

log = logging.getLogger(__name__)
_lock = threading.Lock()
_cache: dict[str, RequestStore] = {}  # by URL, least recently used first
STORES_KEPT = 32


class TopicRow(Protocol):
    name: str

    @property
    def config(self) -> SchedulerConfig: ...


TopicRef = TopicRow | SchedulerConfig


def store_for_url(url: str) -> RequestStore:
    """The one store of this process for ``url``. The last ``STORES_KEPT`` URLs used are kept, so that
    moved topics and changed passwords do not leave a pool each for the life of the process; whoever
    still holds a dropped store keeps it until done, then its connections close."""
    with _lock:
        store = _cache.pop(url, None)
        if store is None:
            store = RequestStore(connect(url))
        _cache[url] = store  # most recently used last
        while len(_cache) > STORES_KEPT:
            del _cache[next(iter(_cache))]
        return store


def get_store() -> RequestStore:
    """The console's store (the URL is read each call so tests can point elsewhere)."""
    return store_for_url(settings.FD_REDIS_URL)


def get_redis() -> Redis:
    return get_store().redis


def console_redis_answers() -> bool:
    """Whether the console's Redis answers a PING; why not is logged here, never shown, and with the
    password masked."""
    try:
        get_redis().ping()
    except RedisError as exc:
        url = settings.FD_REDIS_URL
        log.warning("the console's Redis at %s did not answer: %s", describe(url), redact(str(exc), url))
        return False
    return True


def _config_of(topic: TopicRef) -> SchedulerConfig:
    return topic if isinstance(topic, SchedulerConfig) else topic.config


def _name_of(topic: TopicRef) -> str:
    return topic.scheduler_topic if isinstance(topic, SchedulerConfig) else topic.name


def topic_url(topic: TopicRef) -> str:
    """The URL of the topic's Redis (it may hold a password: never show it; see ``describe``)."""
    return topic_redis_url(_config_of(topic), settings.FD_REDIS_URL)


def get_topic_store(topic: TopicRef) -> RequestStore:
    """The store of the topic's Redis: where its requests, nodes and configuration live."""
    return store_for_url(topic_url(topic))


def get_topic_telemetry(topic: TopicRef) -> Telemetry:
    """The topic's event feed, counters and chart series, in the topic's Redis."""
    return Telemetry(get_topic_store(topic).redis)


@contextmanager
def topic_redis_errors(topic: TopicRef) -> Iterator[None]:
    """Within the block, a Redis failure becomes ``TopicRedisUnavailable`` naming the topic and where
    its Redis is, so that the caller answers 503 with a message an operator can act on."""
    try:
        yield
    except RedisError as exc:
        raise TopicRedisUnavailable.of(_name_of(topic), topic_url(topic), exc) from exc
