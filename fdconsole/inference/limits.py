"""What one API token may take of the cluster: requests per minute, requests in flight, open streams.

Design note. Every limit is checked before the work starts and answered with 429, a ``Retry-After``
and a message naming the limit (``RateLimited``).

- Requests per minute (``ApiToken.rpm``) count submissions in a moving window of 60 seconds, kept in
  the console's Redis with the ``limits`` library (the one Flask-Limiter and slowapi use), so that
  every console process behind a load balancer counts together.
- Requests in flight (``ApiToken.max_in_flight``) are the token's requests not yet final, counted in
  the database. Rows are brought up to date from Redis lazily, so a count at the limit syncs the
  token's unfinished rows first: a request that ended but nobody has read since never holds a place.
  Submissions of one token are serialised on its row, so two at once cannot both take the last place.
- Open streams (``FD_MAX_STREAMS_PER_TOKEN``) are Server-Sent Event streams and whole OpenAI answers
  (both hold a connection until the request ends), per token, and the pages' streams per user: each
  holds a slot in a sorted set of the console's Redis, scored by when its lease ends; an open stream
  renews it (and ends once its token is revoked or expired, or its user deactivated), a closed one
  removes it, and a process that died leaves slots that lapse within ``STREAM_LEASE_S``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Self, TypeVar

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import DatabaseError, transaction
from limits import RateLimitItemPerMinute
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter
from redis.exceptions import RedisError

from fdconsole.inference.models import Request
from fdconsole.redis_conn import get_redis
from scheduler.errors import FdError
from scheduler.status import RequestStatus

log = logging.getLogger(__name__)
STREAM_LEASE_S = 60.0  # a slot of a stream whose process died lapses after this
STREAM_RENEW_S = 15.0  # an open stream renews its slot this often (at least: each keep-alive)
UNFINISHED = (RequestStatus.QUEUED, RequestStatus.RUNNING)

T = TypeVar("T")

if TYPE_CHECKING:
    from fdconsole.api.models import ApiToken  # the api app depends on this one, not the reverse


class RateLimited(FdError):
    """A token's limit is reached; ``retry_after`` (seconds) says when to try again."""

    code = "rate_limited"
    status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)


# -- requests per minute ------------------------------------------------------------------------------
_limiters: dict[int, MovingWindowRateLimiter] = {}


def _limiter() -> MovingWindowRateLimiter:
    redis = get_redis()  # the console's Redis: one pool per URL per process (fdconsole.redis_conn)
    pool = redis.connection_pool
    limiter = _limiters.get(id(pool))
    if limiter is None:
        storage = RedisStorage(settings.FD_REDIS_URL, connection_pool=pool, key_prefix="fd:limits")
        limiter = _limiters[id(pool)] = MovingWindowRateLimiter(storage)
    return limiter


def take_rate(token: ApiToken) -> None:
    """Counts one submission of ``token``; ``RateLimited`` when it already made ``rpm`` in the last
    60 seconds (that one is not counted)."""
    if token.rpm is None:
        return
    item, limiter = RateLimitItemPerMinute(token.rpm), _limiter()
    if limiter.hit(item, "token", str(token.pk)):
        return
    reset = limiter.get_window_stats(item, "token", str(token.pk)).reset_time
    raise RateLimited(f"this API token may submit {token.rpm} requests per minute (its rpm limit) and "
                      "has: try again later", retry_after=math.ceil(reset - time.time()))


# -- requests in flight -----------------------------------------------------------------------------
def take_in_flight(token: ApiToken) -> None:
    """Inside the submission's transaction, before its row is made: ``RateLimited`` when ``token``
    already has ``max_in_flight`` unfinished requests. Holds the token's row until the transaction
    ends, so that concurrent submissions of one token count one after the other."""
    if token.max_in_flight is None:
        return
    assert transaction.get_connection().in_atomic_block, "take_in_flight belongs inside the submission"
    type(token).objects.select_for_update().filter(pk=token.pk).first()
    if _unfinished(token) < token.max_in_flight:
        return
    from fdconsole.inference.sync import sync_request  # brings ended requests' rows up to date

    for row in Request.objects.select_related("topic").filter(api_token=token, status__in=UNFINISHED):
        sync_request(row)
    unfinished = _unfinished(token)
    if unfinished >= token.max_in_flight:
        raise RateLimited(f"this API token may have {token.max_in_flight} unfinished requests at once (its "
                          f"max_in_flight limit) and has {unfinished}: wait for one to end", retry_after=1)


def _unfinished(token: ApiToken) -> int:
    return Request.objects.filter(api_token=token, status__in=UNFINISHED).count()


# -- open streams -----------------------------------------------------------------------------------
def _is_token(owner) -> bool:
    return hasattr(owner, "token_hash")


def _streams_key(owner) -> str:
    return f"fd:limits:streams:{owner.pk}" if _is_token(owner) else f"fd:limits:streams:user:{owner.pk}"


def open_stream(owner) -> str:
    """Takes a stream slot of ``owner`` (an API token, or the user of a page's stream); returns its id.
    ``RateLimited`` when all ``FD_MAX_STREAMS_PER_TOKEN`` are taken."""
    limit, key, slot = settings.FD_MAX_STREAMS_PER_TOKEN, _streams_key(owner), uuid.uuid4().hex
    now = time.time()
    redis = get_redis()
    with redis.pipeline() as pipe:  # MULTI/EXEC: lapse the dead, take a slot, count
        pipe.zremrangebyscore(key, "-inf", now)
        pipe.zadd(key, {slot: now + STREAM_LEASE_S})
        pipe.expire(key, int(STREAM_LEASE_S) * 2)
        pipe.zcard(key)
        held = pipe.execute()[-1]
    if held > limit:
        redis.zrem(key, slot)
        who = "this API token has" if _is_token(owner) else "you have"
        raise RateLimited(f"{who} {limit} streams open (FD_MAX_STREAMS_PER_TOKEN): close one first",
                          retry_after=1)
    return slot


def renew_stream(owner, slot: str) -> bool:
    """Renews the slot while ``owner`` may still stream: a token not revoked or expired since, a user
    still active. Returns False (and lets the slot go) when it may not. When the database or the
    console's Redis cannot be asked (an outage), the stream goes on and the next renewal asks again:
    a stream rides out an outage, and the slot lapses by itself if it is never renewed."""
    try:
        if not _still_allowed(owner):
            close_stream(owner, slot)
            return False
        key, redis = _streams_key(owner), get_redis()
        redis.zadd(key, {slot: time.time() + STREAM_LEASE_S}, xx=True)
        redis.expire(key, int(STREAM_LEASE_S) * 2)
    except (DatabaseError, RedisError) as exc:
        log.warning("could not renew a stream slot (asked again in %d s): %s", STREAM_RENEW_S, exc)
    return True


def _still_allowed(owner) -> bool:
    fresh = type(owner).objects.filter(pk=owner.pk).first()
    if fresh is None:
        return False
    return fresh.refusal() is None if _is_token(owner) else fresh.is_active


def close_stream(owner, slot: str) -> None:
    get_redis().zrem(_streams_key(owner), slot)


def _close_quietly(owner, slot: str) -> None:
    try:
        close_stream(owner, slot)
    except Exception as exc:  # nobody may be left to tell (the caller was cancelled): say it here
        log.warning("a stream slot could not be given back (it lapses by itself): %s", exc)


_releasing: set[asyncio.Future] = set()  # slot releases under way (see ``StreamSlot.release``)


class StreamSlot:
    """A stream slot of ``owner`` (an API token; a user for a page's stream; None: unlimited): ``take``
    it before the stream answers, pass its events through ``kept`` (which renews it as they flow, and
    ends the stream once the token is revoked or expired, or the user deactivated), ``release`` it when
    the stream ends. A slot never released lapses after ``STREAM_LEASE_S``."""

    def __init__(self, owner) -> None:
        self.owner, self.slot, self.renewed = owner, None, 0.0

    async def take(self) -> Self:
        if self.owner is not None:
            self.slot = await sync_to_async(open_stream, thread_sensitive=False)(self.owner)
            self.renewed = time.monotonic()
        return self

    async def release(self) -> None:
        """Gives the slot back, even from a response being cancelled: a client that leaves as soon as it
        has read the last event (the openai SDK at ``[DONE]``) makes Django cancel the response while
        its stream ends, and a release cancelled half-way would hold the slot until it lapsed. So the
        call runs in a task of its own that the caller's cancellation does not stop. When the
        console's Redis does not answer, or the event loop stops before the call is made (the console
        shutting down), the slot lapses by itself (``STREAM_LEASE_S``)."""
        if self.slot is None:
            return
        slot, self.slot = self.slot, None
        close = sync_to_async(_close_quietly, thread_sensitive=False)
        closing = asyncio.ensure_future(close(self.owner, slot))
        _releasing.add(closing)  # held until done: the loop keeps only weak references to tasks
        closing.add_done_callback(_releasing.discard)
        await asyncio.shield(closing)

    async def kept(self, events: AsyncIterator[T]) -> AsyncIterator[T]:
        """``events`` (closed with this iterator), renewing the slot every ``STREAM_RENEW_S``; they stop
        when the owner may no longer stream."""
        async with aclosing(events):
            async for event in events:
                if self.slot is not None and time.monotonic() - self.renewed > STREAM_RENEW_S:
                    self.renewed = time.monotonic()
                    # channels' wrapper: the connection it opens goes back (to the pool, on PostgreSQL)
                    renew = database_sync_to_async(renew_stream, thread_sensitive=False)
                    if not await renew(self.owner, self.slot):
                        self.slot = None  # let go already
                        return
                yield event
