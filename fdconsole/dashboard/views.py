"""Console pages. Every page but the login page requires a logged-in user."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from fdconsole.inference.models import Request
from fdconsole.nodes.models import Node
from fdconsole.nodes.status import describe_nodes
from fdconsole.topics.models import Topic


@login_required
def home(request: HttpRequest) -> HttpResponse:
    nodes = list(Node.objects.select_related("topic"))
    try:
        described = describe_nodes(nodes)
        redis_error = None
    except Exception as exc:  # the page still lists what the database knows when Redis is down
        described = [
            {"name": n.name, "topic": n.topic.name, "role": n.role, "state": "unknown"} for n in nodes
        ]
        redis_error = str(exc)
    context = {
        "topics": Topic.objects.all(),
        "nodes": described,
        "redis_error": redis_error,
        "recent_requests": Request.objects.select_related("topic")[:10],
    }
    return render(request, "home.html", context)


def not_found(request: HttpRequest, exception=None) -> HttpResponse:
    if request.path.startswith(("/api/", "/v1/")):
        return JsonResponse({"error": {"code": "not_found", "message": f"no such endpoint: {request.path}"}},
                            status=404)
    return render(request, "404.html", status=404)


def server_error(request: HttpRequest) -> HttpResponse:
    if request.path.startswith(("/api/", "/v1/")):
        return JsonResponse({"error": {"code": "server_error", "message": "internal error"}}, status=500)
    return render(request, "500.html", status=500)
