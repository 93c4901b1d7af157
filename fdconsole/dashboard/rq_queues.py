"""django-rq's views list the queues named in ``settings.RQ_QUEUES``; node queues come and go with the
Node table, so the list is rebuilt from it before each /rq/ page (django-rq reads it on every call).

A node queue is the scheduler's: its scripts keep each node's load score equal to its queue's length
and every waiting request in the topic's waiting set. django-rq's write actions (delete, requeue,
enqueue, stop, empty, bulk actions) change the queue behind the scripts' back, so on node queues they
are refused with where to go instead: cancel a request from its page or the API, drain or disable a
node in the admin. The console's own ``default`` queue keeps every action.
"""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import Resolver404, resolve

from fdconsole.nodes.models import Node
from fdconsole.redis_conn import topic_url
from scheduler import keys

WRITE_VIEWS = frozenset({"delete_job", "requeue_job", "enqueue_job", "stop_job", "clear", "requeue_all",
                         "confirm_action", "actions"})


def node_queues() -> dict[str, dict[str, str]]:
    """The console's default queue, and each node's queue in its topic's Redis."""
    queues = {"default": {"URL": settings.FD_REDIS_URL, "SERIALIZER": "rq.serializers.JSONSerializer"}}
    for node in Node.objects.select_related("topic").order_by("topic__name", "name"):
        queues[keys.node_queue_name(node.topic.name, node.name)] = {
            "URL": topic_url(node.topic), "SERIALIZER": "rq.serializers.JSONSerializer",
        }
    return queues


class NodeQueuesMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path.startswith("/rq/"):
            settings.RQ_QUEUES = node_queues()
            refusal = refuse_node_queue_writes(request)
            if refusal is not None:
                return refusal
        return self.get_response(request)


def refuse_node_queue_writes(request: HttpRequest) -> HttpResponse | None:
    """A 409 page for a django-rq write action on a node queue (its confirmation page included)."""
    try:
        match = resolve(request.path_info)
    except Resolver404:
        return None
    if match.url_name not in WRITE_VIEWS or not (request.user.is_authenticated and request.user.is_staff):
        return None  # reads, and anyone django-rq itself turns away
    from django_rq.settings import get_queues_list

    queues = get_queues_list()
    index = match.kwargs.get("queue_index", -1)
    if not 0 <= index < len(queues) or queues[index]["name"] == "default":
        return None
    from fdconsole.inference.models import Request

    job_id = match.kwargs.get("job_id")
    context = {"queue": queues[index]["name"], "action": match.url_name.replace("_", " "),
               "job_request": Request.objects.filter(uid=job_id).first() if job_id else None}
    return render(request, "rq_refused.html", context, status=409)
