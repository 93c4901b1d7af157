"""The API's edges: JSON errors, JSON bodies, bearer-token authentication."""

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
from fdconsole.errors import ApiError
from scheduler.errors import FdError, ScriptError

log = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str, field: str | None = None) -> JsonResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if field:
        body["field"] = field
    return JsonResponse({"error": body}, status=status)


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


def api_view(methods: tuple[str, ...]) -> Callable:
    """Token auth, method check and error mapping for a sync API view ``view(request, user, ...)``."""

    def decorate(view: Callable) -> Callable:
        @csrf_exempt
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
            try:
                # Authenticate first: a caller without a valid token learns nothing, not even the methods.
                user = bearer_user(request)
                if request.method not in methods:
                    raise ApiError(405, "method_not_allowed",
                                   f"{request.method} is not allowed here; use {', '.join(methods)}")
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
