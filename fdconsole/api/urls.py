from django.urls import path

from fdconsole.api import stream, views

urlpatterns = [
    path("topics", views.topics, name="api-topics"),
    path("topics/<str:topic>", views.topic_detail, name="api-topic"),
    path("topics/<str:topic>/requests", views.topic_requests, name="api-topic-requests"),
    # Request ids may hold any printable character, '/' included: the stream route is matched first.
    path("requests/<path:request_id>/stream", stream.stream_request, name="api-request-stream"),
    path("requests/<path:request_id>", views.request_detail, name="api-request"),
    path("nodes", views.nodes, name="api-nodes"),
    path("nodes/<str:name>", views.node_detail, name="api-node"),
]
