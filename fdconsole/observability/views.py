"""``GET /metrics``: the Prometheus exposition, behind the API's bearer tokens."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from fdconsole.api.http import bearer_token, error_response, require_scope
from fdconsole.errors import ApiError
from fdconsole.observability.collector import ClusterCollector

REGISTRY = CollectorRegistry(auto_describe=False)  # private: nothing of this process's own is exposed
REGISTRY.register(ClusterCollector())


@csrf_exempt
def metrics(request: HttpRequest) -> HttpResponse:
    """Every topic's metrics, read from Redis now (Prometheus text, or OpenMetrics when asked for).
    ``Authorization: Bearer <token>`` as on ``/api/v1/`` (Prometheus: ``authorization`` or
    ``bearer_token_file`` in the scrape config); 401 without a valid one."""
    try:
        token = bearer_token(request)  # first: without a valid token, nothing is told, not even the methods
        require_scope(token, "read")
    except ApiError as exc:
        response = error_response(exc.status, exc.code, exc.message)
        response["WWW-Authenticate"] = "Bearer"
        return response
    if request.method not in ("GET", "HEAD"):
        return error_response(405, "method_not_allowed", f"{request.method} is not allowed here; use GET")
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encode(REGISTRY), content_type=content_type)
