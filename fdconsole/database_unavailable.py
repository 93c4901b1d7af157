"""While the database is down, what needs it answers 503 (come back in a few seconds) rather than 500.

Nodes keep generating through an outage (Redis is their working state) and the reconciler writes their
ends to the rows once the database is back (``fdconsole.inference.reconcile``); the console cannot
authenticate a caller, accept a request or show a page without the database, and says so: in each
API's error shape, with ``Retry-After``, and as a short page for the web UI. The error is logged as
a warning, once per request, without a traceback: it is the outage, not a bug.
"""

from __future__ import annotations

import logging

from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse

from fdconsole.api import http as api_http
from fdconsole.openai_api import http as openai_http

log = logging.getLogger(__name__)
CODE = "database_unavailable"
MESSAGE = "the database is unavailable; requests already accepted go on running, try this again shortly"
RETRY_AFTER_S = 5
PAGE = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Unavailable · fdconsole"
        "</title></head><body><h1>The database is unavailable</h1><p>Requests already accepted go on "
        "running on the nodes. This page comes back when the database does: try again in a few seconds."
        "</p></body></html>")


class DatabaseUnavailableMiddleware:
    """Turns a view's ``OperationalError``/``InterfaceError`` (no connection, the server gone away) into
    503 ``database_unavailable``."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not isinstance(exception, OperationalError | InterfaceError):
            return None
        log.warning("database unavailable for %s %s: %s", request.method, request.path, exception)
        response = unavailable_response(request.path)
        response._has_been_logged = True  # Django's own "Service Unavailable" error line would repeat it
        return response


def unavailable_response(path: str) -> HttpResponse:
    """The 503 of ``path``: OpenAI's error shape under /v1/, ours under /api/ and /metrics, else a page."""
    if path.startswith("/v1/"):
        return openai_http.error_response(503, CODE, MESSAGE, retry_after=RETRY_AFTER_S)
    if path.startswith(("/api/", "/metrics", "/healthz")):
        return api_http.error_response(503, CODE, MESSAGE, retry_after=RETRY_AFTER_S)
    response = HttpResponse(PAGE, status=503)
    response["Retry-After"] = str(RETRY_AFTER_S)
    return response
