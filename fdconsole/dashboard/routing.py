from django.urls import path

from fdconsole.dashboard import consumers

websocket_urlpatterns = [
    path("ws/cluster/", consumers.LiveConsumer.as_asgi()),
    path("ws/topics/<str:topic>/", consumers.LiveConsumer.as_asgi()),
]
