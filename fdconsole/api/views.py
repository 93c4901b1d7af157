"""REST endpoints of ``/api/v1/`` (see shared/CONTRACT.md); thin: each is declared by its endpoints of
``schemas.ENDPOINTS``, gets its body validated by their model, and calls the services."""

from __future__ import annotations

import logging

from django.db import IntegrityError, connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET
from pydantic import BaseModel

from fdconsole.api.http import api_view
from fdconsole.api.schemas import (
    CANCEL_REQUEST,
    CREATE_TOPIC,
    GET_NODE,
    GET_REQUEST,
    GET_TOPIC,
    IDEMPOTENCY_KEY,
    LIST_NODES,
    LIST_TOPICS,
    READ_ONLY_TOPIC_FIELDS,
    REPLAYED_HEADER,
    SUBMIT,
    UPDATE_TOPIC,
    given,
)
from fdconsole.embedded_redis import eviction_risk
from fdconsole.errors import ApiError, UnknownObject
from fdconsole.inference.access import request_for, request_to_cancel
from fdconsole.inference.models import Request
from fdconsole.inference.submit import submit_or_replay
from fdconsole.inference.sync import cancel_request, sync_request
from fdconsole.nodes.models import Node
from fdconsole.nodes.status import describe_nodes
from fdconsole.redis_conn import console_redis_answers, get_redis, topic_redis_errors
from fdconsole.topics.models import Topic
from fdconsole.topics.services import change_topic, create_topic, get_topic
from scheduler.config import NAME_RE
from scheduler.errors import ConfigError, InvalidRequest
from scheduler.messages import SubmissionBody


# -- requests ---------------------------------------------------------------------------------------
@api_view(SUBMIT)
def topic_requests(request: HttpRequest, user, topic: str, body: SubmissionBody) -> JsonResponse:
    """202 with the request; a retry of a submission already made (the same request_id or
    Idempotency-Key, the same content, the same user) is 202 with that request as it is now."""
    key = idempotency_key(request)
    row = get_topic(topic)
    with topic_redis_errors(row):
        submitted = submit_or_replay(row, body, user, request.api_token, key)
        answer = sync_request(submitted.row) if submitted.replayed else submitted.row
    response = JsonResponse(answer.as_api(), status=202)
    if submitted.replayed:
        response[REPLAYED_HEADER] = "true"
    return response


def idempotency_key(request: HttpRequest) -> str:
    """The request's ``Idempotency-Key`` header: "" when it has none; ``InvalidRequest`` naming the header
    when it is not 1-255 printable ASCII characters. (Both APIs' submissions take it.)"""
    value = request.headers.get(IDEMPOTENCY_KEY.name)
    if value is None:
        return ""
    if not IDEMPOTENCY_KEY.matches(value):
        raise InvalidRequest(f"{IDEMPOTENCY_KEY.name} must be 1-255 printable ASCII characters",
                             field=IDEMPOTENCY_KEY.name)
    return value


@api_view(GET_REQUEST, CANCEL_REQUEST)
def request_detail(request: HttpRequest, user, request_id: str) -> JsonResponse:
    row = request_to_cancel(user, request_id) if request.method == "DELETE" else request_for(user, request_id)
    with topic_redis_errors(row.topic):
        if request.method == "DELETE":
            return _cancel(row, "read" in request.api_token.scope_set)
        return JsonResponse(sync_request(row).as_api())


def _cancel(row: Request, may_read: bool) -> JsonResponse:
    """The request object after the cancel; only its id and status for a token without the read scope
    (a submit-only token cancels, it does not read outputs)."""
    row = cancel_request(row)
    body = row.as_api() if may_read else {"request_id": row.request_id, "status": row.status}
    return JsonResponse(body, status=200 if row.is_final else 202)


# -- topics -----------------------------------------------------------------------------------------
def topic_object(topic: Topic) -> dict:
    config = topic.config
    return {"name": topic.name, "model": topic.model, **config.as_dict(mask_password=True),
            "nodes": list(topic.nodes.order_by("name").values_list("name", flat=True)),
            "created_at": topic.created_at.isoformat().replace("+00:00", "Z"),
            "updated_at": topic.updated_at.isoformat().replace("+00:00", "Z")}


@api_view(LIST_TOPICS, CREATE_TOPIC)
def topics(request: HttpRequest, user, body: BaseModel | None = None) -> JsonResponse:
    if body is None:
        return JsonResponse({"topics": [topic_object(t) for t in Topic.objects.prefetch_related("nodes")]})
    name = body.name
    if Topic.objects.filter(name=name).exists():
        raise ApiError(409, "duplicate_topic", f"topic '{name}' already exists", "name")
    try:
        topic = create_topic(name, given(body, leave_out=("name",)), user=user)
    except IntegrityError:  # created meanwhile by another request
        raise ApiError(409, "duplicate_topic", f"topic '{name}' already exists", "name") from None
    return JsonResponse(topic_object(topic), status=201)


@api_view(GET_TOPIC, UPDATE_TOPIC)
def topic_detail(request: HttpRequest, user, topic: str, body: BaseModel | None = None) -> JsonResponse:
    row = get_topic(topic)
    if body is not None:
        if "name" in body.model_fields_set and body.name != row.name:
            raise ConfigError("a topic cannot be renamed", field="name")
        # less GET's read-only fields, which a client may send back with its edits
        row = change_topic(row, given(body, leave_out=READ_ONLY_TOPIC_FIELDS), user=user)
    return JsonResponse(topic_object(row))


# -- nodes ------------------------------------------------------------------------------------------
@api_view(LIST_NODES)
def nodes(request: HttpRequest, user) -> JsonResponse:
    rows = list(Node.objects.select_related("topic"))
    return JsonResponse({"nodes": describe_nodes(rows)})


@api_view(GET_NODE)
def node_detail(request: HttpRequest, user, name: str) -> JsonResponse:
    row = Node.objects.select_related("topic").filter(name=name).first() if NAME_RE.match(name) else None
    if row is None:
        raise UnknownObject(f"no node '{name}'", field="name")
    return JsonResponse(describe_nodes([row])[0])


# -- health -----------------------------------------------------------------------------------------
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """Public: names what failed and nothing more (an error's text can carry hosts, users or worse);
    the detail goes to the log."""
    failed = []
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM django_migrations LIMIT 1")  # it answers, with our tables
    except Exception as exc:  # any database failure is a failed check
        secret = connection.settings_dict.get("PASSWORD")
        detail = str(exc).replace(secret, "***") if secret else str(exc)
        logging.getLogger(__name__).warning("healthz: the database did not answer: %s", detail)
        failed.append("database")
    if not console_redis_answers():  # logs why, the password masked
        failed.append("redis")
    if failed:
        return JsonResponse({"status": "unavailable", "failed": failed}, status=503)
    answer = {"status": "ok", "database": "ok", "redis": "ok"}
    risk = eviction_risk(get_redis())
    if risk:  # it answers, but could drop queued requests when its memory runs out
        answer["warnings"] = [f"redis: {risk}"]
    return JsonResponse(answer)
