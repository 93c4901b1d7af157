"""Console pages. Every page but the login page requires a logged-in user.

The live pages render what is known at load time (so they read well without JavaScript) and then
follow the WebSocket feed (``consumers.LiveConsumer``). Forms go through the same services as the API:
``submit_request`` for requests, ``fdconsole.topics.services.change_topic`` for the configuration, so
a value refused in one place is refused everywhere with the same message. Token ids are shown and made
with the model of their topic or request (``gpu_worker.model_source.load_tokenizer``); the submit form's
chat box renders messages through that model's chat template into ``prompt_token_ids``.
"""

from __future__ import annotations

import json

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST
from redis.exceptions import RedisError

from fdconsole.dashboard.pulse import describe_live
from fdconsole.errors import Forbidden, ModelUnavailable, TopicRedisUnavailable, UnknownObject
from fdconsole.inference.access import request_for, request_to_cancel, visible_requests
from fdconsole.inference.models import Request, model_tokenizer
from fdconsole.inference.submit import chat_prompt_ids, submit_request
from fdconsole.inference.sync import cancel_request, sync_request
from fdconsole.nodes.models import Node
from fdconsole.redis_conn import get_topic_store, topic_redis_errors, topic_url
from fdconsole.topics import access as topic_access
from fdconsole.topics.models import MODEL_HELP, Topic
from fdconsole.topics.services import change_topic, get_topic
from scheduler.config import PARAMETERS, PARAMETERS_BY_NAME, PASSWORD_MASK
from scheduler.connection import CONNECTION_FIELDS, describe
from scheduler.errors import FdError, InvalidRequest
from scheduler.status import RequestStatus

PAGE_SIZE = 50
FORM_DEFAULTS = {"prompt": "", "max_tokens": "64", "temperature": "0", "top_p": "1", "top_k": "0", "seed": "",
                 "node": "", "input": "prompt"}
CHAT_ROLES = ("system", "user", "assistant")
CHAT_DEFAULT = [{"role": "system", "content": ""}, {"role": "user", "content": ""}]


def _described(topics: list[Topic], nodes: list[Node]) -> tuple[list[dict], dict[str, str]]:
    """The nodes (in their order) with their live state, and per topic whose Redis did not answer in
    time the error: its nodes then show what the database knows. A Redis that does not answer delays
    the page by ``pulse.STALL_S`` at most."""
    members: dict[str, list[Node]] = {topic.name: [] for topic in topics}
    for node in nodes:
        members.get(node.topic.name, []).append(node)  # a topic made since ``topics`` was read: next time
    live = describe_live(topics, members)
    rows = {row["name"]: row for update in live.values() for row in update["nodes"]}
    errors = {name: update["error"] for name, update in live.items() if update.get("error")}
    return [rows[node.name] for node in nodes if node.name in rows], errors


def _topic_or_404(name: str) -> Topic:
    try:
        return get_topic(name)
    except UnknownObject as exc:
        raise Http404(exc.message) from None


def _request_or_404(user, request_id: str, cancel: bool = False) -> Request:
    """The request when ``user`` may see it (and cancel it, when ``cancel``); 404 when they may not see
    it, as for one that does not exist; PermissionDenied (403) when they may see it but not cancel it."""
    try:
        return request_to_cancel(user, request_id) if cancel else request_for(user, request_id)
    except UnknownObject as exc:
        raise Http404(exc.message) from None
    except Forbidden as exc:
        raise PermissionDenied(exc.message) from None


# -- live pages -------------------------------------------------------------------------------------
@login_required
def home(request: HttpRequest) -> HttpResponse:
    topics = list(Topic.objects.order_by("name"))
    nodes, errors = _described(topics, list(Node.objects.select_related("topic").order_by("name")))
    counts = {t.name: sum(1 for n in nodes if n["topic"] == t.name) for t in topics}
    return render(request, "home.html", {
        "topics": [{"topic": t, "nodes": counts[t.name], "redis": describe(topic_url(t)),
                    "error": errors.get(t.name)} for t in topics],
        "nodes": nodes, "redis_errors": list(errors.values()), "live_url": "/ws/cluster/",
        "recent_requests": visible_requests(request.user)[:10],
    })


@login_required
def topic_page(request: HttpRequest, topic: str) -> HttpResponse:
    row = _topic_or_404(topic)
    nodes, errors = _described([row], list(row.nodes.select_related("topic").order_by("name")))
    return render(request, "topic.html", {
        "topic": row, "nodes": nodes, "redis_error": errors.get(row.name),
        "live_url": f"/ws/topics/{row.name}/",
    })


# -- configuration ----------------------------------------------------------------------------------
@login_required
def topic_config(request: HttpRequest, topic: str) -> HttpResponse:
    row = _topic_or_404(topic)
    errors: dict[str, str] = {}
    submitted: dict[str, str] = {}
    if request.method == "POST":
        # A field the form did not send (one shown read-only) keeps its value.
        submitted = {p.name: request.POST[p.name] for p in PARAMETERS if p.name in request.POST}
        if "model" in request.POST:  # a form without the field keeps the model
            submitted["model"] = request.POST["model"]
        changes = _changed_fields(row, submitted)
        try:
            change_topic(row, changes, user=request.user, from_text=True)
        except TopicRedisUnavailable as exc:
            errors["__all__"] = f"Nothing was saved: {exc.message}"
        except FdError as exc:
            errors[exc.field or "__all__"] = exc.message
        else:
            if changes:
                names = ", ".join(sorted(changes))
                serves = (f" Nodes of '{row.name}' serve model {changes['model']} from their next start."
                          if "model" in changes else "")
                messages.success(request, f"Saved {names}: applied to the running nodes of '{row.name}' "
                                          f"from their next scheduling step; no restart needed.{serves}")
            else:
                messages.info(request, "Nothing changed.")
            return redirect("topic_config", topic=row.name)
    editable = _editable(request.user)
    return render(request, "topic_config.html", {
        "topic": row, "fields": _config_fields(row, submitted, errors, editable),
        "form_error": errors.get("__all__"), "editable": editable,
        "model": {"value": submitted.get("model", row.model), "error": errors.get("model"),
                  "help": MODEL_HELP, "readonly": not editable["change"]},
        "permissions": {"change": topic_access.CHANGE, "redis": topic_access.CHANGE_REDIS},
        "scheduler_names": PARAMETERS_BY_NAME["scheduler_name"].scopes,
    }, status=400 if errors else 200)


def _changed_fields(row: Topic, submitted: dict[str, str]) -> dict[str, str]:
    """Only what the user changed: an untouched password field (shown masked) keeps the password."""
    current = {"model": row.model, **row.config.as_dict()}
    changed = {}
    for name, text in submitted.items():
        if name == "scheduler_password" and text == PASSWORD_MASK:
            continue
        if text.strip() != _as_text(current[name]):
            changed[name] = text.strip()
    return changed


def _as_text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _editable(user) -> dict[str, bool]:
    """Which parts of a topic's configuration ``user`` may change (the rest is shown read-only)."""
    change, redis = user.has_perm(topic_access.CHANGE), user.has_perm(topic_access.CHANGE_REDIS)
    return {"change": change, "redis": redis, "any": change or redis}


def _config_fields(row: Topic, submitted: dict[str, str], errors: dict[str, str],
                   editable: dict[str, bool]) -> list[dict]:
    current = row.config.as_dict()
    fields = []
    for param in PARAMETERS:
        value = submitted.get(param.name, _as_text(current[param.name]))
        if param.name == "scheduler_password":  # never sent back, not even as just typed
            typed = submitted.get(param.name)
            value = PASSWORD_MASK if (typed if typed is not None else current[param.name]) else ""
        fields.append({
            "name": param.name, "value": value, "help": param.help, "unit": param.unit,
            "scopes": param.scopes, "applies": row.scheduler_name in param.scopes,
            "kind": param.kind.__name__, "error": errors.get(param.name),
            "default": _as_text(param.default), "is_default": current[param.name] == param.default,
            "readonly": not editable["redis" if param.name in CONNECTION_FIELDS else "change"],
        })
    return fields


# -- requests ---------------------------------------------------------------------------------------
@login_required
def request_list(request: HttpRequest) -> HttpResponse:
    rows = visible_requests(request.user).order_by("-created_at")
    # A NUL can name nothing here, and PostgreSQL refuses it in a query with an error: dropped.
    filters = {key: request.GET.get(key, "").replace("\x00", "").strip()
               for key in ("topic", "status", "node")}
    if filters["topic"]:
        rows = rows.filter(topic__name=filters["topic"])
    if filters["status"]:
        rows = rows.filter(status=filters["status"])
    if filters["node"]:
        node = filters["node"]
        rows = rows.filter(home_node=node) | rows.filter(executed_by=node)
    page = Paginator(rows, PAGE_SIZE).get_page(request.GET.get("page"))
    query = "&".join(f"{k}={v}" for k, v in filters.items() if v)
    return render(request, "requests.html", {
        "page": page, "filters": filters, "query": query,
        "statuses": [status.value for status in RequestStatus],
        "topics": Topic.objects.order_by("name").values_list("name", flat=True),
        "nodes": Node.objects.order_by("name").values_list("name", flat=True),
    })


@login_required
def request_new(request: HttpRequest) -> HttpResponse:
    topics = list(Topic.objects.order_by("name"))
    asked = request.GET.get("topic", "").replace("\x00", "")  # PostgreSQL refuses a NUL in a query
    form = {"topic": asked or (topics[0].name if topics else ""), **FORM_DEFAULTS}
    chat = CHAT_DEFAULT
    error = None
    if request.method == "POST":
        form.update({key: request.POST.get(key, "").strip() for key in form})
        form["prompt"] = request.POST.get("prompt", "")  # the prompt as typed, spaces included
        form["topic"] = form["topic"].replace("\x00", "")  # looked up below: no NUL (PostgreSQL)
        chat = _chat_messages(request)
        try:
            row = _submit_form(form, chat, request.user)
        except FdError as exc:
            error = {"field": exc.field, "message": exc.message}
            if form["input"] == "chat" and exc.field in ("prompt", "prompt_token_ids"):
                error["field"] = "chat"  # the prompt the chat rendered into: the chat is what to change
        except RedisError as exc:
            error = {"field": None, "message": f"Redis did not answer, the request was not queued: {exc}"}
        else:
            return redirect("request_detail", request_id=row.request_id)
    nodes = Node.objects.filter(topic__name=form["topic"]).order_by("name").values_list("name", flat=True)
    templates = _chat_templates(topics)
    selected = next((t for t in topics if t.name == form["topic"]), None)
    return render(request, "request_new.html", {
        "form": form, "topics": [{"topic": t, "chat": templates[t.model]} for t in topics], "nodes": nodes,
        "chat": chat, "chat_roles": CHAT_ROLES, "error": error,
        "known_fields": ("topic", "chat", *FORM_DEFAULTS),
        "model": selected.model if selected else "", "chat_available": selected and templates[selected.model],
    }, status=400 if error else 200)


def _chat_messages(request: HttpRequest) -> list[dict[str, str]]:
    """The chat box's messages as typed (role and content of each row, in order)."""
    roles, contents = request.POST.getlist("chat_role"), request.POST.getlist("chat_content")
    return [{"role": role, "content": content} for role, content in zip(roles, contents, strict=False)]


def _submit_form(form: dict[str, str], chat: list[dict[str, str]], user) -> Request:
    topic = get_topic(form["topic"])
    if form["input"] == "chat":
        return submit_request(topic, _submission(form, prompt_token_ids=_chat_prompt(topic, chat)), user)
    return submit_request(topic, _submission(form), user)


def _chat_prompt(topic: Topic, chat: list[dict[str, str]]) -> list[int]:
    """The token ids of ``chat`` rendered through the topic's model's chat template, which writes the
    special tokens (BOS included) itself: encoded without adding any."""
    messages = [m for m in chat if m["content"].strip()]
    if not messages:
        raise InvalidRequest("chat: write at least one message", field="chat")
    return chat_prompt_ids(topic, messages, "chat")


def _chat_templates(topics: list[Topic]) -> dict[str, bool]:
    """For each model of ``topics``: whether it has a chat template (False when it cannot be loaded)."""
    available = {}
    for model in {t.model for t in topics}:
        try:
            available[model] = bool(model_tokenizer(model, "the submit form").chat_template)
        except ModelUnavailable:
            available[model] = False
    return available


def _submission(form: dict[str, str], prompt_token_ids: list[int] | None = None) -> dict:
    """The API's request body from the form's text fields (numbers parsed here, checked by the API's
    own validation), so the browser and REST clients get the same errors. ``prompt_token_ids``, when
    given (the chat box's), replace the prompt."""
    body: dict = ({"prompt": form["prompt"]} if prompt_token_ids is None
                  else {"prompt_token_ids": prompt_token_ids})
    for name, parse in (("max_tokens", int), ("temperature", float), ("top_p", float), ("top_k", int),
                        ("seed", int)):
        text = form[name]
        if text == "":
            continue
        try:
            body[name] = parse(text)
        except ValueError:
            raise InvalidRequest(f"{name} must be a number, not '{text}'", field=name) from None
    if form["node"]:
        body["node"] = form["node"]
    return body


@login_required
def request_detail(request: HttpRequest, request_id: str) -> HttpResponse:
    row = _request_or_404(request.user, request_id)
    try:
        row = sync_request(row, get_topic_store(row.topic))
    except (RedisError, TopicRedisUnavailable):
        pass  # the database's copy is shown; the stream says when Redis is back
    try:
        api, prompt_text, model_note = row.as_api(), row.tokenizer.decode(row.prompt_token_ids), None
    except ModelUnavailable as exc:  # the page shows what it can, and says why the text is missing
        api, prompt_text, model_note = row.as_api(decode=False), None, exc.message
    return render(request, "request_detail.html", {
        "req": row, "api_json": json.dumps(api, indent=2, ensure_ascii=False),
        "output_text": api["output_text"], "prompt_text": prompt_text, "model_note": model_note,
    })


@login_required
async def request_stream(request: HttpRequest, request_id: str) -> HttpResponse:
    """The request's tokens as Server-Sent Events for the detail page (session login, not a token)."""
    from asgiref.sync import sync_to_async

    from fdconsole.api.stream import sse_response
    from fdconsole.inference.limits import RateLimited, StreamSlot

    user = await request.auser()
    row = await sync_to_async(_request_or_404)(user, request_id)
    try:
        slot = await StreamSlot(user).take()  # a user's page streams are bounded as a token's are
    except RateLimited as exc:
        return HttpResponse(exc.message, status=429, headers={"Retry-After": str(exc.retry_after)},
                            content_type="text/plain")
    except RedisError:
        return HttpResponse("Redis did not answer", status=503, content_type="text/plain")
    return sse_response(row, slot)


@login_required
@require_POST
def request_cancel(request: HttpRequest, request_id: str) -> HttpResponse:
    row = _request_or_404(request.user, request_id, cancel=True)
    try:
        with topic_redis_errors(row.topic):
            cancel_request(row)
    except TopicRedisUnavailable as exc:
        messages.error(request, f"Not cancelled: {exc.message}")
    else:
        messages.info(request, f"Request {row.request_id} is {row.status}.")
    return redirect(reverse("request_detail", kwargs={"request_id": row.request_id}))


# -- errors -----------------------------------------------------------------------------------------
def not_found(request: HttpRequest, exception=None) -> HttpResponse:
    if request.path.startswith(("/api/", "/v1/")):
        return JsonResponse({"error": {"code": "not_found", "message": f"no such endpoint: {request.path}"}},
                            status=404)
    return render(request, "404.html", status=404)


def server_error(request: HttpRequest) -> HttpResponse:
    if request.path.startswith(("/api/", "/v1/")):
        return JsonResponse({"error": {"code": "server_error", "message": "internal error"}}, status=500)
    return render(request, "500.html", status=500)
