from django.urls import path

from fdconsole.dashboard import consumers

websocket_urlpatterns = [
    path("ws/cluster/", consumers.ClusterConsumer.as_asgi()),
]
