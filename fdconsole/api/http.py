"""The API's edges: JSON errors, JSON bodies validated by their endpoint's model, bearer-token
authentication."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from redis.exceptions import RedisError

from fdconsole.api.models import ApiToken
from fdconsole.api.schemas import Endpoint
from fdconsole.errors import ApiError
from scheduler.errors import FdError, InvalidRequest, ScriptError
from scheduler.validation import validated

log = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str, field: str | None = None) -> JsonResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if field:
        body["field"] = field
    return JsonResponse({"error": body}, status=status)


def method_not_allowed(method: str, allowed: tuple[str, ...]) -> JsonResponse:
    """405, with the ``Allow`` header that RFC 9110 asks of it."""
    use = ", ".join(allowed)
    response = error_response(405, "method_not_allowed", f"{method} is not allowed here; use {use}")
    response["Allow"] = use
    return response


def bearer_user(request: HttpRequest):
    """The user of the request's bearer token; raises ApiError(401) when missing or bad."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "missing bearer token: send 'Authorization: Bearer <token>'")
    user = ApiToken.authenticate(token.strip())
    if user is None:
        raise ApiError(401, "unauthorized", "invalid or revoked API token")
    return user


def json_body(request: HttpRequest) -> Any:
    try:
        raw = request.body
    except RequestDataTooBig:
        raise ApiError(413, "too_large", "the request body is too large") from None
    if not raw.strip():
        raise ApiError(400, "invalid", "the request body is empty; send a JSON object")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "invalid_json", "the request body is not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from None
    try:
        # JSON's "\ud800" escapes can name a lone surrogate, which no database or encoder takes later.
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ApiError(400, "invalid_json", "the request body is not valid JSON: it holds an unpaired "
                       "surrogate escape (\\ud800-\\udfff), which is not Unicode text") from None
    return data


def api_view(*endpoints: Endpoint) -> Callable:
    """Token auth, method check, body validation and error mapping for a sync API view ``view(request,
    user, ...)`` that serves ``endpoints`` (one per method, of ``schemas.ENDPOINTS``). An endpoint with a
    request model gets its JSON body validated by it, once, here: the view takes it as ``body``."""
    by_method = {endpoint.method: endpoint for endpoint in endpoints}

    def decorate(view: Callable) -> Callable:
        @csrf_exempt
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
            try:
                # Authenticate first: a caller without a valid token learns nothing, not even the methods.
                user = bearer_user(request)
                endpoint = by_method.get(request.method)
                if endpoint is None:
                    return method_not_allowed(request.method, tuple(by_method))
                if endpoint.request_model is not None:
                    kwargs["body"] = validated(endpoint.request_model, json_body(request), InvalidRequest)
                return view(request, user, *args, **kwargs)
            except FdError as exc:  # ours, named: each carries its status
                return error_response(exc.status, exc.code, exc.message, exc.field)
            except ScriptError:  # a bug, or Redis refusing a command: the log says where, not the client
                log.exception("a scheduler script failed")
                return error_response(500, "server_error",
                                      "a scheduler script failed; the server log says where")
            except RedisError as exc:
                log.warning("Redis unavailable: %s", exc)
                return error_response(503, "redis_unavailable", f"Redis did not answer: {exc}")

        return wrapper

    return decorate
