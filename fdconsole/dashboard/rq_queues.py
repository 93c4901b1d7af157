"""django-rq's views list the queues named in ``settings.RQ_QUEUES``; node queues come and go with the
Node table, so the list is rebuilt from it before each /rq/ page (django-rq reads it on every call).

A node queue is the scheduler's: its scripts keep each node's load score equal to its queue's length
and every waiting request in the topic's waiting set. django-rq's write actions (delete, requeue,
enqueue, stop, empty, clear failed, bulk actions: every view but the reading ones) change the queue
behind the scripts' back, so on node queues they are refused with where to go instead: cancel a
request from its page or the API, drain or disable a node in the admin. The console's own
``default`` queue keeps every action. The pages list every user's requests, so staff also need
``inference.view_all_requests`` to see them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, HttpResponseForbidden
from django.shortcuts import render
from django.urls import Resolver404, resolve

from fdconsole.database_unavailable import unavailable_response
from fdconsole.nodes.models import Node
from fdconsole.redis_conn import topic_url
from scheduler import keys
from scheduler.connection import url_with_client_options

log = logging.getLogger(__name__)

# django-rq's views that only read; any other (delete, requeue, enqueue, stop, empty, clear failed, bulk
# actions, and whatever a later django-rq adds) is a write, refused on node queues.
READ_VIEWS = frozenset({"home", "home_json", "metrics", "jobs", "queue_details", "finished_jobs",
                        "failed_jobs", "scheduled_jobs", "started_jobs", "deferred_jobs", "job_detail",
                        "result_detail", "workers", "worker_details", "scheduler_jobs",
                        "cron_scheduler_detail", "cron_job_detail"})
# Its pages list every user's requests (ids, statuses, results): staff need this permission too.
VIEW_PERMISSION = "inference.view_all_requests"


def node_queues() -> dict[str, dict[str, str]]:
    """The console's default queue, and each node's queue in its topic's Redis."""
    queues = {"default": {"URL": url_with_client_options(settings.FD_REDIS_URL),
                          "SERIALIZER": "rq.serializers.JSONSerializer"}}
    for node in Node.objects.select_related("topic").order_by("topic__name", "name"):
        queues[keys.node_queue_name(node.topic.name, node.name)] = {  # with timeouts: no page hangs
            "URL": url_with_client_options(topic_url(node.topic)),
            "SERIALIZER": "rq.serializers.JSONSerializer",
        }
    return queues


class NodeQueuesMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        try:
            refusal = self.refusal(request)
        except (OperationalError, InterfaceError) as exc:  # the database is down: a 503, as for any view
            log.warning("database unavailable for %s %s: %s", request.method, request.path, exc)
            return unavailable_response(request.path)
        return refusal or self.get_response(request)

    def refusal(self, request: HttpRequest) -> HttpResponse | None:
        """What answers an /rq/ request instead of django-rq (settings.RQ_QUEUES made the node queues)."""
        if request.path.startswith("/rq/"):
            user = request.user
            if user.is_authenticated and user.is_staff and not user.has_perm(VIEW_PERMISSION):
                return HttpResponseForbidden(f"The rq pages show every user's requests: they need the "
                                             f"permission {VIEW_PERMISSION}.", content_type="text/plain")
            settings.RQ_QUEUES = node_queues()
            return refuse_node_queue_writes(request)
        return None


def refuse_node_queue_writes(request: HttpRequest) -> HttpResponse | None:
    """A 409 page for a django-rq write action on a node queue (its confirmation page included)."""
    try:
        match = resolve(request.path_info)
    except Resolver404:
        return None
    if match.url_name in READ_VIEWS or not (request.user.is_authenticated and request.user.is_staff):
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
