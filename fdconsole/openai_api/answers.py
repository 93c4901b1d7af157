"""A submitted request's answer in OpenAI's shapes: whole once it finished, or streamed as chunks.

Both read the request's events once through ``fdconsole.api.stream.request_events`` (every token
exactly once, by index, then the end, across a Redis that restarts or pauses), as the native stream
does; a streamed answer in its batches, each batch one write. A request that ends without its answer
(expired, failed) is an error: before the first streamed byte a plain JSON error with its status,
later one ``data: {"error": ...}`` event, then ``data: [DONE]``. A cancelled request ends with
finish_reason ``abort``. A client that goes away does not cancel its request: it may come back with
the same ``request_id`` or ``Idempotency-Key`` and read it again.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import aclosing

from django.http import HttpResponse, JsonResponse

from fdconsole.api.stream import (
    DoneEvent,
    ErrorEvent,
    KeepAliveEvent,
    RequestEvent,
    TokenEvent,
    comment,
    event_stream_response,
    request_event_batches,
    request_events,
)
from fdconsole.errors import GenerationFailed
from fdconsole.inference.limits import StreamSlot
from fdconsole.inference.models import Request
from fdconsole.openai_api.http import fd_error_body
from fdconsole.openai_api.schemas import (
    Answer,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
    CompletionChunk,
    Delta,
    FinishReason,
    Usage,
)
from scheduler.errors import FdError
from scheduler.status import RequestStatus

DONE = "data: [DONE]\n\n"


class Shape(ABC):
    """How one endpoint writes a request's answer: whole, and as chunks."""

    id_prefix = ""

    def __init__(self, row: Request) -> None:
        self.id = self.id_prefix + row.request_id
        self.created = int(row.created_at.timestamp())
        self.model = row.topic.name

    @abstractmethod
    def whole(self, text: str, finish_reason: FinishReason, usage: Usage) -> Answer:
        """The answer when the request ends, as one JSON body."""

    def opening(self) -> Answer | None:
        """The chunk before the first token's, if the shape has one."""
        return None

    @abstractmethod
    def token(self, text: str) -> Answer:
        """The chunk of one token's text."""

    @abstractmethod
    def finish(self, finish_reason: FinishReason) -> Answer:
        """The chunk that carries the finish reason."""

    @abstractmethod
    def usage(self, usage: Usage) -> Answer:
        """The usage chunk (``choices`` empty), sent only when the client asked for it."""


class CompletionShape(Shape):
    id_prefix = "cmpl-"

    def whole(self, text: str, finish_reason: FinishReason, usage: Usage) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model, usage=usage,
                          choices=[CompletionChoice(text=text, finish_reason=finish_reason)])

    def token(self, text: str) -> CompletionChunk:
        return self._chunk([CompletionChoice(text=text, finish_reason=None)])

    def finish(self, finish_reason: FinishReason) -> CompletionChunk:
        return self._chunk([CompletionChoice(text="", finish_reason=finish_reason)])

    def usage(self, usage: Usage) -> CompletionChunk:
        return self._chunk([], usage)

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionChunk:
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices,
                               usage=usage)


class ChatShape(Shape):
    id_prefix = "chatcmpl-"

    def whole(self, text: str, finish_reason: FinishReason, usage: Usage) -> ChatCompletion:
        return ChatCompletion(id=self.id, created=self.created, model=self.model, usage=usage,
                              choices=[ChatChoice(message=AssistantMessage(content=text),
                                                  finish_reason=finish_reason)])

    def opening(self) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(delta=Delta(role="assistant", content=""), finish_reason=None)])

    def token(self, text: str) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(delta=Delta(content=text), finish_reason=None)])

    def finish(self, finish_reason: FinishReason) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(delta=Delta(), finish_reason=finish_reason)])

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        return self._chunk([], usage)

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices,
                                   usage=usage)


# -- the end of a request ---------------------------------------------------------------------------
def finish_reason(row: Request) -> FinishReason:
    """Why a final request stopped; ``GenerationFailed`` when it ended without its answer. (On the event
    loop: only the row's own fields, no relation that would query the database.)"""
    if row.status == RequestStatus.FINISHED:
        return "length" if row.finish_reason == "length" else "stop"
    if row.status == RequestStatus.CANCELLED:
        return "abort"
    if row.status == RequestStatus.EXPIRED:
        raise GenerationFailed(503, "expired", f"request '{row.request_id}' expired: no node of its topic "
                               "took it within the topic's scheduler_ttl")
    raise GenerationFailed(500, row.error_code or "failed",
                           f"request '{row.request_id}' failed: {row.error_message or 'no reason given'}")


def usage_of(row: Request) -> Usage:
    completion_tokens = len(row.output_token_ids)
    return Usage(prompt_tokens=row.prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=row.prompt_tokens + completion_tokens)


def stream_ended() -> GenerationFailed:
    return GenerationFailed(504, "stream_timeout", "the request did not end within this connection's "
                            "time; ask again with its request_id to read on")


# -- whole ------------------------------------------------------------------------------------------
async def whole_answer(shape: Shape, row: Request, slot: StreamSlot | None = None) -> JsonResponse:
    """Wait for the request to end; its whole answer, or the error it ended with. The API token's
    stream ``slot`` is renewed while it waits (its caller releases it)."""
    texts = []
    async with aclosing((slot or StreamSlot(None)).kept(request_events(row))) as events:
        async for event in events:
            if isinstance(event, TokenEvent):
                texts.append(event.text)
            elif isinstance(event, DoneEvent):
                answer = shape.whole("".join(texts) + event.text, finish_reason(event.row),
                                     usage_of(event.row))
                return JsonResponse(answer.model_dump(mode="json"))
            elif isinstance(event, ErrorEvent):
                raise event.error
    raise stream_ended()


# -- streamed ---------------------------------------------------------------------------------------
async def streamed_answer(shape: Shape, row: Request, include_usage: bool,
                          slot: StreamSlot | None = None) -> HttpResponse:
    """The answer as Server-Sent Events of chunks, what each read found in one write (as the native
    stream). Waits for the first token (or the end) before answering, so that a request that ends
    without any answer is a plain error with its status. The API token's stream ``slot`` (taken) is
    released when the answer ends."""
    slot = slot or StreamSlot(None)
    batches = slot.kept(request_event_batches(row))
    try:
        first = await first_batch(batches)
        if isinstance(first[0], ErrorEvent):
            raise first[0].error
        if isinstance(first[0], DoneEvent):
            finish_reason(first[0].row)  # raises when it ended without an answer
    except BaseException:
        await batches.aclose()
        await slot.release()
        raise
    return event_stream_response(released_after(chunks(shape, first, batches, include_usage), slot))


async def released_after(pieces: AsyncIterator[str], slot: StreamSlot) -> AsyncIterator[str]:
    try:
        async with aclosing(pieces):
            async for piece in pieces:
                yield piece
    finally:
        await slot.release()


async def first_batch(batches: AsyncIterator[list[RequestEvent]]) -> list[RequestEvent]:
    """The first batch's events that are not keep-alives (waiting drops those: nothing is sent yet)."""
    async for batch in batches:
        events = [event for event in batch if not isinstance(event, KeepAliveEvent)]
        if events:
            return events
    raise stream_ended()


async def chunks(shape: Shape, first: list[RequestEvent], batches: AsyncIterator[list[RequestEvent]],
                 include_usage: bool) -> AsyncIterator[str]:
    """The answer's SSE text, one piece per batch of events, ``first`` the first batch."""
    async with aclosing(batches):
        opening = shape.opening()
        pieces = [data(opening, include_usage)] if opening is not None else []
        batch: list[RequestEvent] | None = first
        while batch is not None:
            for event in batch:
                if isinstance(event, TokenEvent):
                    pieces.append(data(shape.token(event.text), include_usage))
                elif isinstance(event, KeepAliveEvent):
                    pieces.append(comment(event.note))
                else:  # the end: its last chunks, or the error it ended with
                    pieces.extend(ending(shape, event, include_usage) if isinstance(event, DoneEvent)
                                  else [error_data(event.error)])
                    yield "".join([*pieces, DONE])
                    return
            yield "".join(pieces)
            pieces = []
            batch = await anext(batches, None)
        yield error_data(stream_ended()) + DONE


def ending(shape: Shape, done: DoneEvent, include_usage: bool) -> list[str]:
    """The last chunks: the text the end released (if any), the finish reason, the usage if asked."""
    row = done.row
    try:
        reason = finish_reason(row)
    except GenerationFailed as exc:
        return [error_data(exc)]
    chunks = [data(shape.token(done.text), include_usage)] if done.text else []
    chunks.append(data(shape.finish(reason), include_usage))
    if include_usage:
        chunks.append(data(shape.usage(usage_of(row)), usage=True))
    return chunks


def data(chunk: Answer, usage: bool = False) -> str:
    """One ``data:`` event; its ``usage`` field only when ``usage`` (the client asked for usage: OpenAI's
    chunks then carry ``"usage": null`` but the last, and none otherwise), and a chat delta with only
    what it changes (``{}`` on the finish chunk, as OpenAI's)."""
    body = chunk.model_dump(mode="json", exclude=None if usage else {"usage"})
    for choice in body["choices"]:
        if "delta" in choice:
            choice["delta"] = {key: value for key, value in choice["delta"].items() if value is not None}
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def error_data(exc: FdError) -> str:
    return f"data: {json.dumps(fd_error_body(exc), separators=(',', ':'))}\n\n"
