"""The console's Redis (``FD_REDIS_URL``), each topic's Redis, and the request stores built on them.

A topic's Redis is ``FD_REDIS_URL`` with the topic's own ``scheduler_host/port/db/password`` put in
where they differ from their defaults (``scheduler.connection.topic_redis_url``): everything about a
topic's requests (queues, streams, heartbeats, rq jobs) lives there. One store per resolved URL per
process, so topics that share a Redis share its connection pool.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from django.conf import settings
from redis import Redis
from redis.exceptions import RedisError

from fdconsole.topics.models import Topic
from scheduler.config import SchedulerConfig
from scheduler.connection import connect, describe, topic_redis_url
from scheduler.errors import SchedulerError
from scheduler.store import RequestStore

_lock = threading.Lock()
_cache: dict[str, RequestStore] = {}  # by URL, least recently used first
STORES_KEPT = 32
TopicRef = Topic | str | SchedulerConfig  # a topic row, a topic name, or a topic's configuration


class TopicRedisUnavailable(SchedulerError):
    """A topic's Redis did not answer (HTTP 503); the message says where, never with the password."""

    code = "redis_unavailable"

    @classmethod
    def of(cls, topic: str, url: str, exc: Exception) -> TopicRedisUnavailable:
        return cls(f"the Redis of topic '{topic}' at {describe(url)} is unavailable: {exc}")


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


def _config_of(topic: TopicRef) -> SchedulerConfig:
    if isinstance(topic, SchedulerConfig):
        return topic
    if isinstance(topic, Topic):
        return topic.config
    row = Topic.objects.filter(name=topic).first()
    # A topic the database does not know yet has the default configuration (as fdnode creates it).
    return row.config if row else SchedulerConfig(scheduler_topic=topic)


def _name_of(topic: TopicRef) -> str:
    if isinstance(topic, SchedulerConfig):
        return topic.scheduler_topic
    return topic.name if isinstance(topic, Topic) else topic


def topic_url(topic: TopicRef) -> str:
    """The URL of the topic's Redis (it may hold a password: never show it; see ``describe``)."""
    return topic_redis_url(_config_of(topic), settings.FD_REDIS_URL)


def get_topic_store(topic: TopicRef) -> RequestStore:
    """The store of the topic's Redis: where its requests, nodes and configuration live."""
    return store_for_url(topic_url(topic))


def topic_stores() -> list[RequestStore]:
    """The console's store and one per distinct topic Redis (what the console's reaper walks)."""
    urls = {settings.FD_REDIS_URL} | {topic_url(topic) for topic in Topic.objects.all()}
    return [store_for_url(url) for url in sorted(urls)]


@contextmanager
def topic_redis_errors(topic: TopicRef) -> Iterator[None]:
    """Within the block, a Redis failure becomes ``TopicRedisUnavailable`` naming the topic and where
    its Redis is, so that the caller answers 503 with a message an operator can act on."""
    try:
        yield
    except RedisError as exc:
        raise TopicRedisUnavailable.of(_name_of(topic), topic_url(topic), exc) from exc
