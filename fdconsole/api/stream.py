"""``GET /api/v1/requests/{id}/stream``: Server-Sent Events of a request's tokens, then ``done``.

The output stream in Redis keeps every entry, so a client that connects before, during or after the
generation reads it from the start and gets every token exactly once (deduplicated by index), then one
``done`` event carrying the final request object. After Redis has let the stream go, the tokens are
replayed from the database.

Each ``token`` event carries its index as its SSE ``id``, and ``done`` the id ``done``: a client that
reconnects with ``Last-Event-ID: N`` (what a browser's EventSource sends), or asks with
``?last_event_id=N``, gets the tokens after index N only; after ``done``, only ``done`` again.

``request_events`` is that reading on its own, as plain events (a token, the end, an error, a pause
long enough for a keep-alive): the native stream here and the OpenAI-compatible API
(``fdconsole.openai_api``) each format it their own way. It follows token indexes, never Redis entry
ids, so it rides out a Redis that restarts, loses the stream and gets it again (see there).
``request_event_batches`` is the same reading in batches, as each read found them: both streams (this
one and the OpenAI API's) send a batch as one chunk, so that a reader that is behind (it connected
late, the answer is replayed from the database, the console is busy) catches up in one write, not one
per token down Django's response, the ASGI middleware and the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from redis.exceptions import RedisError

from fdconsole.api.http import bearer_token, fd_error_response, method_not_allowed, require_scope
from fdconsole.api.schemas import LAST_EVENT_ID, LAST_EVENT_ID_QUERY, STREAM_REQUEST
from fdconsole.errors import ApiError, ModelUnavailable, TopicRedisUnavailable
from fdconsole.inference.access import request_for
from fdconsole.inference.limits import StreamSlot
from fdconsole.inference.models import Request
from fdconsole.inference.sync import sync_request
from fdconsole.redis_conn import topic_url
from gpu_worker.tokenizer import text_stream
from scheduler.errors import FdError, InvalidRequest
from scheduler.store import AsyncOutputReader, OutputEvent

POLL_MS = 500  # how often a waiting stream re-checks the request (lazy TTL eviction, lost requests)
KEEPALIVE_S = 15.0
MAX_STREAM_S = 6 * 3600  # a bound on one connection; clients reconnect and resume (Last-Event-ID)
REDIS_ANSWER_S = 3.0  # a Redis call not answered this long after its own wait counts as failed
REDIS_OUTAGE_S = 600.0  # how long a stream that delivered a token waits for its Redis to answer again
RETRY_S, MAX_RETRY_S = 0.1, 2.0  # the delays between tries while Redis does not answer
WAITING_NOTE_S = 2.0  # a "waiting for Redis" keep-alive at most this often while it does not
WAITING_FOR_REDIS = "waiting for Redis"
DONE_ID = "done"  # the SSE id of the done event; resuming after it resumes after every token
AFTER_EVERY_TOKEN = sys.maxsize
T = TypeVar("T")
log = logging.getLogger(__name__)


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
    """Nothing happened for ``KEEPALIVE_S``, or Redis does not answer (``note``): a chance to tell the
    client (and proxies) the stream lives, as an SSE comment."""

    note: str = "keep-alive"


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
        resume_after = last_event_index(request)
        row = await sync_to_async(request_for)(token.user, request_id)
        slot = await StreamSlot(token).take()  # released when the stream ends (sse_events)
    except FdError as exc:
        return fd_error_response(exc)
    except RedisError as exc:  # the console's own, where stream slots are kept
        return fd_error_response(ApiError(503, "redis_unavailable", f"Redis did not answer: {exc}"))
    return sse_response(row, slot, resume_after)


def last_event_index(request: HttpRequest) -> int:
    """The last token index the client holds: its ``Last-Event-ID`` header (what an EventSource sends
    when it reconnects, so it wins over the URL it reconnects to), else its ``?last_event_id``; -1 when
    neither, ``AFTER_EVERY_TOKEN`` after ``done``. ``InvalidRequest`` naming the one that is neither an
    index nor ``done``."""
    for param, value in ((LAST_EVENT_ID, request.headers.get(LAST_EVENT_ID.name)),
                         (LAST_EVENT_ID_QUERY, request.GET.get(LAST_EVENT_ID_QUERY.name))):
        if value is None:
            continue
        if not param.matches(value):
            raise InvalidRequest(f"{param.name} must be the id of an event of this stream: a token index "
                                 f"(0, 1, ...) or '{DONE_ID}'", field=param.name)
        return AFTER_EVERY_TOKEN if value == DONE_ID else int(value)
    return -1


def sse_response(row: Request, slot: StreamSlot | None = None,
                 resume_after: int = -1) -> StreamingHttpResponse:
    """The event stream of ``row`` after token index ``resume_after``, unbuffered (the API's and the
    request page's), holding the API token's stream ``slot`` (taken) until it ends."""
    return event_stream_response(sse_events(row, slot or StreamSlot(None), resume_after))


def event_stream_response(chunks: AsyncIterator[str]) -> StreamingHttpResponse:
    """A ``text/event-stream`` response of ``chunks``, sent as they come (no proxy buffering)."""
    response = StreamingHttpResponse(chunks, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


def sse(event: str, data: dict, event_id: int | str | None = None) -> str:
    """One event; its ``id`` (last: clients that read the first two lines as event and data still do)."""
    tail = f"id: {event_id}\n" if event_id is not None else ""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n{tail}\n"


def token_event(event: TokenEvent) -> str:
    return sse("token", {"index": event.index, "token_id": event.token_id, "text": event.text}, event.index)


def comment(note: str) -> str:
    """An SSE comment line (clients ignore it; it keeps the connection and its proxies alive)."""
    return f": {note}\n\n"


async def sse_events(row: Request, slot: StreamSlot, resume_after: int = -1) -> AsyncIterator[str]:
    """The stream's chunks: the events of each batch (``request_event_batches``) in one."""
    try:
        async with aclosing(request_event_batches(row, resume_after)) as batches:
            async for batch in slot.kept(batches):
                pieces = []
                for event in batch:
                    if isinstance(event, TokenEvent):
                        pieces.append(token_event(event))
                    elif isinstance(event, DoneEvent):
                        pieces.append(await off_thread(done_event)(event.row))
                    elif isinstance(event, ErrorEvent):
                        pieces.append(sse("error", event.error.as_dict()))
                    else:
                        pieces.append(comment(event.note))
                yield "".join(pieces)
    finally:
        await slot.release()


async def request_events(row: Request, resume_after: int = -1) -> AsyncIterator[RequestEvent]:
    """``request_event_batches``' events one by one."""
    async with aclosing(request_event_batches(row, resume_after)) as batches:
        async for batch in batches:
            for event in batch:
                yield event


async def request_event_batches(row: Request, resume_after: int = -1) -> AsyncIterator[list[RequestEvent]]:
    """Every token of ``row`` after index ``resume_after`` exactly once, in order, then one ``DoneEvent``
    (or an ``ErrorEvent``), whenever it is called: before, during or after the generation; a
    ``KeepAliveEvent`` after each ``KEEPALIVE_S`` without news. Ends without a final event only after
    ``MAX_STREAM_S``. In batches, never empty: what each read found (of Redis, or of the database).

    It follows token indexes, never the output stream's entry ids: a stream that vanished or was made
    again (Redis restarted and the request was queued again from its row, its tokens streamed again
    first) is read again from its start, each index still delivered once. Once the client holds a
    token, a Redis that stops answering is waited for (``waiting for Redis`` keep-alives, retries with
    a backoff) up to ``REDIS_OUTAGE_S``, or until the database says the request ended; before that, it
    is one ``ErrorEvent`` at once (nothing to resume from: the client asks again)."""
    # Read once: bringing the row up to date (off this thread) may drop its cached topic, and the
    # database is not to be asked from here.
    topic, url = row.topic.name, topic_url(row.topic)
    reader = AsyncOutputReader(url)
    cursor = OutputCursor(resume_after)
    outage: RedisOutage | None = None
    started = last_sent = time.monotonic()
    while time.monotonic() - started < MAX_STREAM_S:
        try:
            events, final = await next_events(reader, row, topic, cursor)
        except (RedisError, TimeoutError) as exc:  # reading the stream, or bringing the row up to date
            outage = outage or RedisOutage()
            if cursor.delivered < 0 or outage.lasted_s() > REDIS_OUTAGE_S:
                yield [ErrorEvent(TopicRedisUnavailable.of(topic, url, no_answer(exc)))]
                return
            ended_row = await off_thread(final_row)(row)  # the database may know the end meanwhile
            if ended_row is not None:
                yield await off_thread(replayed_events)(ended_row, cursor.delivered)
                return
            if outage.note_due():
                last_sent = time.monotonic()
                yield [KeepAliveEvent(WAITING_FOR_REDIS)]
            await asyncio.sleep(outage.next_delay_s())
            continue
        outage = None
        if events:
            yield events
        if final:
            return
        if events:
            last_sent = time.monotonic()
        elif time.monotonic() - last_sent > KEEPALIVE_S:
            last_sent = time.monotonic()
            yield [KeepAliveEvent()]


class OutputCursor:
    """Where a reader is in a request's output, by token index: the texts of indexes 0, 1, ... read so
    far (in order, sent or not), the client's own position ``resume_after``, and ``after``, the last
    entry read (a position in this stream only: a stream made again restarts its ids)."""

    def __init__(self, resume_after: int = -1) -> None:
        self.resume_after = resume_after
        self.texts: list[str] = []
        self.after = "0-0"

    @property
    def delivered(self) -> int:
        """The last index the client holds (-1: none)."""
        return max(self.resume_after, len(self.texts) - 1)

    def take(self, entry: OutputEvent) -> TokenEvent | None:
        """The token event of ``entry`` when it is the next index and the client lacks it; None when it
        is read already, or sent before (``resume_after``). An index past the next means entries were
        missed (the stream was made again under ids below ``after``): ``GapInStream``."""
        if entry.index > len(self.texts):
            self.restart()
            raise GapInStream(entry.index)
        self.after = entry.entry_id
        if entry.index < len(self.texts):
            return None
        self.texts.append(entry.text)
        if entry.index <= self.resume_after:
            return None
        return TokenEvent(entry.index, entry.token_id, entry.text)

    def restart(self) -> None:
        """Read the stream again from its start (indexes read before are skipped)."""
        self.after = "0-0"


class GapInStream(Exception):
    """An output entry came before the ones between it and the last index read."""


class RedisOutage:
    """A run of Redis calls that failed: since when, the delay before the next try (doubling from
    ``RETRY_S`` up to ``MAX_RETRY_S``), and when the client was last told (``WAITING_NOTE_S``)."""

    def __init__(self) -> None:
        self.began = time.monotonic()
        self.delay_s = RETRY_S
        self.noted = -math.inf

    def lasted_s(self) -> float:
        return time.monotonic() - self.began

    def note_due(self) -> bool:
        if time.monotonic() - self.noted < WAITING_NOTE_S:
            return False
        self.noted = time.monotonic()
        return True

    def next_delay_s(self) -> float:
        delay, self.delay_s = self.delay_s, min(self.delay_s * 2, MAX_RETRY_S)
        return delay


async def next_events(reader: AsyncOutputReader, row: Request, topic: str,
                      cursor: OutputCursor) -> tuple[list[RequestEvent], bool]:
    """One read of the request's output stream (waiting up to ``POLL_MS`` for news): the events it
    brings, and whether they end the stream. With no news, the row is brought up to date: a final one
    whose stream Redis let go ends with the database's tokens, and a stream that lost the last entry
    read (it vanished, or was made again) is read again from its start. Redis errors and
    ``TimeoutError`` (no answer within ``REDIS_ANSWER_S``) go to the caller."""
    entries = await answered(reader.read(topic, row.uid, cursor.after, POLL_MS), POLL_MS / 1000)
    events: list[RequestEvent] = []
    for entry in entries:
        if entry.kind == "done":
            return events + await answered(off_thread(ended)(row, cursor)), True
        try:
            token = cursor.take(entry)
        except GapInStream:
            await asyncio.sleep(POLL_MS / 1000)  # what is missing may still be being written
            return events, False
        if token is not None:
            events.append(token)
    if entries:
        return events, False
    await answered(off_thread(sync_request)(row))
    if row.is_final and not await answered(reader.exists(topic, row.uid)):
        return await off_thread(replayed_events)(row, cursor.delivered), True
    if cursor.after != "0-0" and not await answered(reader.has_entry(topic, row.uid, cursor.after)):
        cursor.restart()
    return events, False


def no_answer(exc: Exception) -> Exception:
    """``exc``, or what a timeout says when it says nothing."""
    return exc if str(exc) else TimeoutError(f"no answer within {REDIS_ANSWER_S:g} s")


async def answered(call: Awaitable[T], blocking_s: float = 0.0) -> T:
    """``call``'s result; ``TimeoutError`` when Redis takes ``REDIS_ANSWER_S`` longer than ``blocking_s``
    (the time the call itself may wait), as a paused or unreachable Redis does."""
    return await asyncio.wait_for(call, blocking_s + REDIS_ANSWER_S)


def final_row(row: Request) -> Request | None:
    """``row`` as the database has it now, when it is final there; else None."""
    fresh = Request.objects.select_related("topic").filter(pk=row.pk).first()
    return fresh if fresh is not None and fresh.is_final else None


def ended(row: Request, cursor: OutputCursor) -> list[RequestEvent]:
    """The end of ``row`` (brought up to date) after the tokens ``cursor`` read: its ``DoneEvent``, after
    the tokens the client lacks that the stream did not carry (it was made again without them)."""
    row = sync_request(row)
    if len(row.output_token_ids) > len(cursor.texts):
        return replayed_events(row, cursor.delivered)
    return [DoneEvent(row, released_text(row, "".join(cursor.texts)))]


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
        return sse("done", row.as_api(), DONE_ID)
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
