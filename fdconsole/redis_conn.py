"""The console's Redis connection (``FD_REDIS_URL``) and the request store built on it."""

from __future__ import annotations

import threading

from django.conf import settings
from redis import Redis

from scheduler.store import RequestStore

_lock = threading.Lock()
_cache: dict[str, RequestStore] = {}


def get_redis() -> Redis:
    return get_store().redis


def get_store() -> RequestStore:
    """One store per Redis URL per process (the URL is read each call so tests can point elsewhere)."""
    url = settings.FD_REDIS_URL
    with _lock:
        store = _cache.get(url)
        if store is None:
            store = RequestStore(Redis.from_url(url, socket_connect_timeout=3, health_check_interval=30))
            _cache[url] = store
        return store
