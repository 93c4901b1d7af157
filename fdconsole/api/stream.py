"""``GET /api/v1/requests/{id}/stream``: Server-Sent Events of a request's tokens, then ``done``.

The output stream in Redis keeps every entry, so a client that connects before, during or after the
generation reads it from the start and gets every token exactly once (deduplicated by index), then one
``done`` event carrying the final request object. After Redis has let the stream go, the tokens are
replayed from the database.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from redis.exceptions import RedisError

from fdconsole.api.http import bearer_user, error_response
from fdconsole.errors import ApiError, ModelUnavailable, TopicRedisUnavailable, UnknownObject
from fdconsole.inference.models import Request
from fdconsole.inference.submit import get_request_row
from fdconsole.inference.sync import sync_request
from fdconsole.redis_conn import topic_url
from scheduler.store import AsyncOutputReader

POLL_MS = 500  # how often a waiting stream re-checks the request (lazy TTL eviction, lost requests)
KEEPALIVE_S = 15.0
MAX_STREAM_S = 6 * 3600  # a bound on one connection; clients reconnect and read again from the start


def off_thread(func):
    """``func`` in a pool thread with its own database connection: many streams read and sync at
    once instead of queueing behind every request on Django's one thread for sync code. (Only once
    streaming: the token and the row are checked first on Django's thread, as any view's.)"""
    return database_sync_to_async(func, thread_sensitive=False)


async def stream_request(request: HttpRequest, request_id: str) -> HttpResponse:
    try:
        await sync_to_async(bearer_user)(request)  # the token first: without one, nothing is told
        if request.method != "GET":
            raise ApiError(405, "method_not_allowed", f"{request.method} is not allowed here; use GET")
        row = await sync_to_async(get_request_row)(request_id)
    except (ApiError, UnknownObject) as exc:
        return error_response(exc.status, exc.code, exc.message, exc.field)
    return sse_response(row)


def sse_response(row: Request) -> StreamingHttpResponse:
    """The event stream of ``row``, unbuffered (the API's and the request page's)."""
    response = StreamingHttpResponse(sse_events(row), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def sse_events(row: Request) -> AsyncIterator[str]:
    url = topic_url(row.topic)
    reader = AsyncOutputReader(url)
    topic = row.topic.name
    after, delivered = "0-0", -1
    started = last_sent = time.monotonic()
    try:
        while time.monotonic() - started < MAX_STREAM_S:
            try:
                events = await reader.read(topic, row.uid, after, POLL_MS)
            except RedisError as exc:
                yield sse("error", TopicRedisUnavailable.of(topic, url, exc).as_dict())
                return
            for event in events:
                after = event.entry_id
                if event.kind == "token" and event.index > delivered:
                    delivered = event.index
                    yield sse("token", {"index": event.index, "token_id": event.token_id, "text": event.text})
                elif event.kind == "done":
                    row = await off_thread(sync_request)(row)
                    yield await off_thread(done_event)(row)
                    return
            if events:
                last_sent = time.monotonic()
                continue
            row = await off_thread(sync_request)(row)
            if row.is_final and not await reader.exists(topic, row.uid):
                for chunk in replay_from_database(row, delivered):
                    yield chunk
                return
            if time.monotonic() - last_sent > KEEPALIVE_S:
                last_sent = time.monotonic()
                yield ": keep-alive\n\n"
    finally:
        await reader.close()


def done_event(row: Request) -> str:
    """The ``done`` event with the final request object; an ``error`` event instead when its text cannot
    be decoded (the request's model is gone from this host)."""
    try:
        return sse("done", row.as_api())
    except ModelUnavailable as exc:
        return sse("error", exc.as_dict())


def replay_from_database(row: Request, delivered: int) -> list[str]:
    """Token and done events of a finished request whose Redis stream has expired, decoded with the
    request's model's tokenizer; one ``error`` event when that cannot be loaded any more."""
    try:
        decoder = row.tokenizer.stream_decoder()
        output_text = row.output_text
    except ModelUnavailable as exc:
        return [sse("error", exc.as_dict())]
    chunks, emitted = [], 0
    last = len(row.output_token_ids) - 1
    for index, token_id in enumerate(row.output_token_ids):
        text = decoder.push(token_id)
        if index == last:  # the last token carried the decoder's flush: the rest of the output text
            text = output_text[emitted:]
        emitted += len(text)
        if index > delivered:
            chunks.append(sse("token", {"index": index, "token_id": token_id, "text": text}))
    chunks.append(done_event(row))
    return chunks
