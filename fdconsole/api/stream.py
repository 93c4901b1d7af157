"""``GET /api/v1/requests/{id}/stream``: Server-Sent Events of a request's tokens, then ``done``.

The output stream in Redis keeps every entry, so a client that connects before, during or after the
generation reads it from the start and gets every token exactly once (deduplicated by index), then one
``done`` event carrying the final request object. After Redis has let the stream go, the tokens are
replayed from the database.

``request_events`` is that reading on its own, as plain events (a token, the end, an error, a pause
long enough for a keep-alive): the native stream here and the OpenAI-compatible API
(``fdconsole.openai_api``) each format it their own way.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from redis.exceptions import RedisError

from fdconsole.api.http import bearer_token, fd_error_response, method_not_allowed, require_scope
from fdconsole.api.schemas import STREAM_REQUEST
from fdconsole.errors import ApiError, ModelUnavailable, TopicRedisUnavailable
from fdconsole.inference.access import request_for
from fdconsole.inference.limits import StreamSlot
from fdconsole.inference.models import Request
from fdconsole.inference.sync import sync_request
from fdconsole.redis_conn import topic_url
from gpu_worker.tokenizer import text_stream
from scheduler.errors import FdError
from scheduler.store import AsyncOutputReader

POLL_MS = 500  # how often a waiting stream re-checks the request (lazy TTL eviction, lost requests)
KEEPALIVE_S = 15.0
MAX_STREAM_S = 6 * 3600  # a bound on one connection; clients reconnect and read again from the start


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, delivered once, in order (``index`` counts from 0)."""

    index: int
    token_id: int
    text: str


@dataclass(frozen=True)
class DoneEvent:
    """The request reached its final status; ``row`` is brought up to date. Always the last event.

    ``text`` is what the end itself released after the last token's text: text held back as a
    possible start of a stop string, or an unfinished character, when end of text or a cancel came
    (``gpu_worker.stop``). The token texts and it join into ``row.output_text``."""

    row: Request
    text: str = ""


@dataclass(frozen=True)
class ErrorEvent:
    """The stream cannot go on (the topic's Redis is gone, the model's tokenizer cannot be loaded). Always
    the last event."""

    error: FdError


@dataclass(frozen=True)
class KeepAliveEvent:
    """Nothing happened for ``KEEPALIVE_S``: a chance to tell the client (and proxies) the stream lives."""


RequestEvent = TokenEvent | DoneEvent | ErrorEvent | KeepAliveEvent


def off_thread(func):
    """``func`` in a pool thread with its own database connection: many streams read and sync at
    once instead of queueing behind every request on Django's one thread for sync code. (Only once
    streaming: the token and the row are checked first on Django's thread, as any view's.)"""
    return database_sync_to_async(func, thread_sensitive=False)


async def stream_request(request: HttpRequest, request_id: str) -> HttpResponse:
    try:
        token = await sync_to_async(bearer_token)(request)  # the token first: without one, nothing is told
        if request.method != "GET":
            return method_not_allowed(request.method, ("GET",))
        require_scope(token, STREAM_REQUEST.scope)
        row = await sync_to_async(request_for)(token.user, request_id)
        slot = await StreamSlot(token).take()  # released when the stream ends (sse_events)
    except FdError as exc:
        return fd_error_response(exc)
    except RedisError as exc:  # the console's own, where stream slots are kept
        return fd_error_response(ApiError(503, "redis_unavailable", f"Redis did not answer: {exc}"))
    return sse_response(row, slot)


def sse_response(row: Request, slot: StreamSlot | None = None) -> StreamingHttpResponse:
    """The event stream of ``row``, unbuffered (the API's and the request page's), holding the API
    token's stream ``slot`` (taken) until it ends."""
    return event_stream_response(sse_events(row, slot or StreamSlot(None)))


def event_stream_response(chunks: AsyncIterator[str]) -> StreamingHttpResponse:
    """A ``text/event-stream`` response of ``chunks``, sent as they come (no proxy buffering)."""
    response = StreamingHttpResponse(chunks, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def token_event(event: TokenEvent) -> str:
    return sse("token", {"index": event.index, "token_id": event.token_id, "text": event.text})


async def sse_events(row: Request, slot: StreamSlot) -> AsyncIterator[str]:
    try:
        async with aclosing(request_events(row)) as events:
            async for event in slot.kept(events):
                if isinstance(event, TokenEvent):
                    yield token_event(event)
                elif isinstance(event, DoneEvent):
                    yield await off_thread(done_event)(event.row)
                elif isinstance(event, ErrorEvent):
                    yield sse("error", event.error.as_dict())
                else:
                    yield ": keep-alive\n\n"
    finally:
        await slot.release()


async def request_events(row: Request) -> AsyncIterator[RequestEvent]:
    """Every token of ``row`` exactly once, in order, then one ``DoneEvent`` (or an ``ErrorEvent``),
    whenever it is called: before, during or after the generation; a ``KeepAliveEvent`` after each
    ``KEEPALIVE_S`` without news. Ends without a final event only after ``MAX_STREAM_S``."""
    url = topic_url(row.topic)
    reader = AsyncOutputReader(url)
    topic = row.topic.name
    after, delivered, streamed = "0-0", -1, []
    started = last_sent = time.monotonic()
    try:
        while time.monotonic() - started < MAX_STREAM_S:
            events = await reader.read(topic, row.uid, after, POLL_MS)
            for event in events:
                after = event.entry_id
                if event.kind == "token" and event.index > delivered:
                    delivered = event.index
                    streamed.append(event.text)
                    yield TokenEvent(event.index, event.token_id, event.text)
                elif event.kind == "done":
                    yield await off_thread(ended)(row, "".join(streamed))
                    return
            if events:
                last_sent = time.monotonic()
                continue
            row = await off_thread(sync_request)(row)
            if row.is_final and not await reader.exists(topic, row.uid):
                for replayed in await off_thread(replayed_events)(row, delivered):
                    yield replayed
                return
            if time.monotonic() - last_sent > KEEPALIVE_S:
                last_sent = time.monotonic()
                yield KeepAliveEvent()
    except RedisError as exc:  # reading the stream, or bringing the row up to date
        yield ErrorEvent(TopicRedisUnavailable.of(topic, url, exc))
    finally:
        await reader.close()


def ended(row: Request, streamed: str) -> DoneEvent:
    """The ``DoneEvent`` of ``row`` (brought up to date) after the token texts ``streamed``."""
    row = sync_request(row)
    return DoneEvent(row, released_text(row, streamed))


def released_text(row: Request, streamed: str) -> str:
    """What ``row``'s end released after the text its tokens ``streamed`` (see ``DoneEvent``): the rest
    of its output text; "" when that cannot be decoded any more (the ``done`` event says why)."""
    try:
        output_text = row.output_text
    except ModelUnavailable:
        return ""
    return output_text[len(streamed):] if output_text.startswith(streamed) else ""


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
    chunks = []
    for event in replayed_events(row, delivered):
        if isinstance(event, TokenEvent):
            chunks.append(token_event(event))
        elif isinstance(event, DoneEvent):
            chunks.append(done_event(event.row))
        else:
            chunks.append(sse("error", event.error.as_dict()))
    return chunks


def replayed_events(row: Request, delivered: int) -> list[RequestEvent]:
    """The tokens after index ``delivered`` of a final request whose Redis stream has expired, decoded
    again with its model's tokenizer, then its ``DoneEvent``; one ``ErrorEvent`` when that tokenizer
    cannot be loaded any more. The texts join into ``row.output_text`` exactly."""
    try:
        stream = text_stream(row.tokenizer, (row.sampling or {}).get("stop") or ())
        output_text = row.output_text
    except ModelUnavailable as exc:
        return [ErrorEvent(exc)]
    events: list[RequestEvent] = []
    emitted = 0
    last = len(row.output_token_ids) - 1 if row.finish_reason == "length" else None
    for index, token_id in enumerate(row.output_token_ids):
        # The pieces the node streamed (the same decoder, the same stop strings; at max_tokens the last
        # token carried the flush), as slices of the output text so that they never run past it.
        piece = stream.push(token_id)
        text = output_text[emitted:] if index == last else output_text[emitted:emitted + len(piece)]
        emitted += len(text)
        if index > delivered:
            events.append(TokenEvent(index, token_id, text))
    events.append(DoneEvent(row, output_text[emitted:]))
    return events
