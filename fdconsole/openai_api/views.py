"""The OpenAI-compatible endpoints (``/v1/``): thin, as the native API's. Each view is the one of an
``Endpoint`` of ``schemas.ENDPOINTS``, which says its method, path and body; ``urls`` routes them."""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from fdconsole.api.http import bearer_user
from fdconsole.api.schemas import REPLAYED_HEADER
from fdconsole.api.views import idempotency_key
from fdconsole.errors import UnknownModel
from fdconsole.inference.limits import StreamSlot
from fdconsole.inference.models import Request
from fdconsole.openai_api.answers import ChatShape, CompletionShape, Shape, streamed_answer, whole_answer
from fdconsole.openai_api.http import error_response, fd_error_response, openai_endpoint
from fdconsole.openai_api.schemas import (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    MODEL,
    MODELS,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    ModelList,
)
from fdconsole.openai_api.submission import model_cards, start_request
from scheduler.errors import FdError


@openai_endpoint(MODELS)
async def models(request: HttpRequest, user) -> JsonResponse:
    cards = await sync_to_async(model_cards)()
    return JsonResponse(ModelList(data=cards).model_dump(mode="json"))


@openai_endpoint(MODEL)
async def model_detail(request: HttpRequest, user, model: str) -> JsonResponse:
    cards = await sync_to_async(model_cards)(model)
    if not cards:
        raise UnknownModel(f"The model '{model}' does not exist or has no enabled node", field="model")
    return JsonResponse(cards[0].model_dump(mode="json"))


@openai_endpoint(COMPLETIONS)
async def completions(request: HttpRequest, user, body: CompletionRequest) -> HttpResponse:
    return await generate(CompletionShape, body, request)


@openai_endpoint(CHAT_COMPLETIONS)
async def chat_completions(request: HttpRequest, user, body: ChatCompletionRequest) -> HttpResponse:
    return await generate(ChatShape, body, request)


async def generate(shape: type[Shape], body: GenerationRequest, request: HttpRequest) -> HttpResponse:
    """The answer of the request ``body`` makes, or, for a retry of one already made (its request_id or
    Idempotency-Key again, with the same content), of that one: whole, or streamed from its start."""
    token = request.api_token
    key = idempotency_key(request)
    # An answer holds its connection until the request ends: its stream slot is taken first, so that a
    # 429 for too many open streams never leaves a request running that nobody reads.
    slot = await StreamSlot(token).take()
    try:
        submitted = await sync_to_async(start_request)(body, token.user, token, key)
    except BaseException:
        await slot.release()
        raise
    response = await answer(shape(submitted.row), submitted.row, body, slot)
    if submitted.replayed:
        response[REPLAYED_HEADER] = "true"
    return response


async def answer(shape: Shape, row: Request, body: GenerationRequest, slot: StreamSlot) -> HttpResponse:
    """``row``'s answer as ``body`` asks for it, holding ``slot`` until it ends (a streamed one's: until
    its stream does)."""
    if body.stream:
        try:
            return await streamed_answer(shape, row, body.include_usage, slot)  # releases it
        except BaseException:
            await slot.release()
            raise
    try:
        return await whole_answer(shape, row, slot)
    finally:
        await slot.release()


@csrf_exempt  # a bearer-token API: an unknown URL is a 404 in OpenAI's shape, whatever the method
async def unknown_url(request: HttpRequest, rest: str) -> JsonResponse:
    try:
        await sync_to_async(bearer_user)(request)  # first: without a token, nothing is told
    except FdError as exc:
        return fd_error_response(exc)
    return error_response(404, "unknown_url", f"Invalid URL ({request.method} {request.path})")


VIEWS = {MODELS: models, MODEL: model_detail, COMPLETIONS: completions, CHAT_COMPLETIONS: chat_completions}
