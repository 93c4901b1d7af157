"""The API's edges: JSON errors, JSON bodies validated by their endpoint's model, bearer-token
authentication."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
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


RETRY_AFTER_S = {429: 1, 503: 5}  # a full queue drains in about a second; a node or Redis takes longer


def error_response(status: int, code: str, message: str, field: str | None = None,
                   retry_after: int | None = None) -> JsonResponse:
    """The API's error answer; a 429 or 503 says when to come back in ``Retry-After``."""
    body: dict[str, Any] = {"code": code, "message": message}
    if field:
        body["field"] = field
    return with_retry_after(JsonResponse({"error": body}, status=status), retry_after)


def with_retry_after(response: JsonResponse, retry_after: int | None = None) -> JsonResponse:
    """``response`` (an error) with ``Retry-After``: ``retry_after``, else its status's default."""
    retry_after = retry_after or RETRY_AFTER_S.get(response.status_code)
    if retry_after:
        response["Retry-After"] = str(retry_after)
    return response


def fd_error_response(exc: FdError) -> JsonResponse:
    return error_response(exc.status, exc.code, exc.message, exc.field, getattr(exc, "retry_after", None))


def as_fd_error(exc: FdError | ScriptError | RedisError) -> FdError:
    """What a view's failure is answered as, in either API's shape: ours as they are (each carries its
    status); a script that failed (a bug, or Redis refusing a command) a 500 whose detail goes to the
    log, not the client; Redis not answering a 503."""
    if isinstance(exc, FdError):
        return exc
    if isinstance(exc, ScriptError):
        log.exception("a scheduler script failed")
        return ApiError(500, "server_error", "a scheduler script failed; the server log says where")
    log.warning("Redis unavailable: %s", exc)
    return ApiError(503, "redis_unavailable", f"Redis did not answer: {exc}")


def method_not_allowed(method: str, allowed: tuple[str, ...]) -> JsonResponse:
    """405, with the ``Allow`` header that RFC 9110 asks of it."""
    use = ", ".join(allowed)
    response = error_response(405, "method_not_allowed", f"{method} is not allowed here; use {use}")
    response["Allow"] = use
    return response


def bearer_token(request: HttpRequest) -> ApiToken:
    """The live API token of the request's ``Authorization: Bearer`` header (also kept as
    ``request.api_token``); raises ApiError(401) when missing, unknown, revoked or expired."""
    header = request.headers.get("Authorization", "")
    scheme, _, plain = header.partition(" ")
    if scheme.lower() != "bearer" or not plain.strip():
        raise ApiError(401, "unauthorized", "missing bearer token: send 'Authorization: Bearer <token>'")
    token = ApiToken.find(plain.strip())
    if token is None:
        raise ApiError(401, "unauthorized", "invalid API token")
    refusal = token.refusal()
    if refusal is not None:
        raise ApiError(401, "unauthorized", refusal)
    token.touch()
    request.api_token = token
    return token


def bearer_user(request: HttpRequest):
    """The user of the request's live bearer token (see ``bearer_token``)."""
    return bearer_token(request).user


def require_scope(token: ApiToken, scope: str) -> None:
    """ApiError(403) naming ``scope`` when ``token`` was not given it."""
    if scope not in token.scope_set:
        raise ApiError(403, "insufficient_scope", f"this call needs an API token with the '{scope}' scope; "
                       f"this one has {', '.join(sorted(token.scope_set))}", "scope")


def json_body(request: HttpRequest) -> Any:
    try:
        raw = request.body
    except RequestDataTooBig:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        raise ApiError(413, "too_large", f"the request body is larger than {limit} bytes (FD_MAX_BODY_BYTES)"
                       ) from None
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
                token = bearer_token(request)
                endpoint = by_method.get(request.method)
                if endpoint is None:
                    return method_not_allowed(request.method, tuple(by_method))
                require_scope(token, endpoint.scope)
                if endpoint.request_model is not None:
                    kwargs["body"] = validated(endpoint.request_model, json_body(request), InvalidRequest)
                return view(request, token.user, *args, **kwargs)
            except (FdError, ScriptError, RedisError) as exc:
                return fd_error_response(as_fd_error(exc))

        return wrapper

    return decorate
