"""django-rq's views list the queues named in ``settings.RQ_QUEUES``; node queues come and go with the
Node table, so the list is rebuilt from it before each /rq/ page (django-rq reads it on every call)."""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse

from fdconsole.nodes.models import Node
from fdconsole.redis_conn import topic_url
from scheduler import keys


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
        return self.get_response(request)
