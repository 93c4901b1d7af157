"""The OpenAI-compatible API's edges: errors in OpenAI's shape, and ``openai_endpoint``, which gives each
view its authenticated user and its body validated by the endpoint's request model.

Errors are ``{"error": {"message", "type", "param", "code"}}``: every ``FdError`` keeps its status and
code (``field`` becomes ``param``); invalid input is 400 ``invalid_request_error``, never 422; a 429 or
503 says when to come back in ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from redis.exceptions import RedisError

from fdconsole.api.http import as_fd_error, bearer_token, json_body, require_scope, with_retry_after
from fdconsole.openai_api.schemas import Endpoint
from scheduler.errors import FdError, InvalidRequest, ScriptError
from scheduler.validation import deepest_errors, models_in, param_of

ERROR_TYPES = {403: "permission_error", 429: "rate_limit_error"}  # else invalid_request_error / server_error
CODES = {"unauthorized": "invalid_api_key"}  # ours -> OpenAI's, where OpenAI has its own


def error_body(status: int, code: str | None, message: str, param: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status) or ("server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": CODES.get(code, code)}}


def fd_error_body(exc: FdError) -> dict[str, Any]:
    return error_body(exc.status, exc.code, exc.message, exc.field)


def error_response(status: int, code: str | None, message: str, param: str | None = None,
                   retry_after: int | None = None) -> JsonResponse:
    response = JsonResponse(error_body(status, code, message, param), status=status)
    if status == 409:  # a name taken by another submission: the same call again cannot succeed, though
        response["x-should-retry"] = "false"  # OpenAI's SDKs retry a 409 (their lock timeouts) unless told
    return with_retry_after(response, retry_after)


def fd_error_response(exc: FdError) -> JsonResponse:
    return error_response(exc.status, exc.code, exc.message, exc.field, getattr(exc, "retry_after", None))


def openai_endpoint(endpoint: Endpoint) -> Callable:
    """An async view ``view(request, user, *args[, body])`` of ``endpoint``: bearer token, method, and
    the JSON body validated by ``endpoint.request_model`` (passed as ``body``); any error in OpenAI's
    shape."""

    def decorate(view: Callable) -> Callable:
        @csrf_exempt
        @wraps(view)
        async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            try:
                token = await sync_to_async(bearer_token)(request)  # first: without one, nothing is told
                if request.method != endpoint.method:
                    response = error_response(405, "method_not_allowed",
                                              f"{request.method} is not allowed here; use {endpoint.method}")
                    response["Allow"] = endpoint.method  # as RFC 9110 asks of a 405
                    return response
                require_scope(token, endpoint.scope)
                user = token.user
                if endpoint.request_model is not None:
                    kwargs["body"] = validated(endpoint.request_model, json_body(request))
                return await view(request, user, *args, **kwargs)
            except (FdError, ScriptError, RedisError) as exc:
                return fd_error_response(as_fd_error(exc))

        return wrapper

    return decorate


# -- validation errors ------------------------------------------------------------------------------
def validated(model: type[BaseModel], data: Any) -> Any:
    """``data`` as ``model``; ``InvalidRequest`` naming the parameter at fault otherwise."""
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_request(model, exc) from None


def invalid_request(model: type[BaseModel], exc: ValidationError) -> InvalidRequest:
    """The first parameter at fault, as a path (``messages[0].content[0].type``), with what is wrong and
    its field's description. Where a value matched no member of a union, each member reports an error:
    the deepest ones (those that got furthest) are told, joined by "or", a broken constraint before a
    mere type mismatch."""
    loc, at_loc = deepest_errors(model, exc)
    # A value of one member's type that breaks that member's constraint: the other members' type
    # mismatches ("a valid list" for a string too short) would only blur what is wrong.
    at_loc = [e for e in at_loc if not e["type"].endswith("_type")] or at_loc
    messages = list(dict.fromkeys(message_of(e) for e in at_loc))
    message = messages[0] + "".join(" or " + m.removeprefix("Input should be ") for m in messages[1:])
    param = param_of(loc)
    info = field_info(model, [part for part in loc if isinstance(part, str)])
    if info is not None and info.description:
        message = f"{message.rstrip('.')}. {info.description}"
    return InvalidRequest(f"{param}: {message}", field=param)


def message_of(error: dict[str, Any]) -> str:
    return error["msg"].removeprefix("Value error, ")


def field_info(model: type[BaseModel], names: list[str]) -> FieldInfo | None:
    """The field at the path ``names`` (field names only) from ``model``, through the models it nests."""
    info, models = None, [model]
    for name in names:
        info = next((m.model_fields[name] for m in models if name in m.model_fields), None)
        if info is None:
            return None
        models = list(models_in(info.annotation))
    return info
