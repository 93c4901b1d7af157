"""ASGI entry point: HTTP through Django, WebSocket through Channels (session-authenticated)."""

import os

from django.conf import settings
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fdconsole.settings")
if not settings.configured:  # this module loads them: the process is an ASGI server (daphne)
    # Tells the settings to keep no database connection between requests, as Django advises under
    # ASGI (a pool instead, on PostgreSQL); see DATABASES in fdconsole/settings.py.
    os.environ["FD_ASGI"] = "1"
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs Django set up first)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from fdconsole.bounded_input import BodyLimit, MessageLimit, bound_daphne  # noqa: E402
from fdconsole.dashboard.routing import websocket_urlpatterns  # noqa: E402

# Request bodies and WebSocket messages are bounded before anything buffers them whole: where daphne
# reads the socket, and again around each application (fdconsole/bounded_input.py).
bound_daphne(settings.FD_MAX_BODY_BYTES)

application = ProtocolTypeRouter({
    "http": BodyLimit(django_asgi_app, settings.FD_MAX_BODY_BYTES),
    "websocket": MessageLimit(
        AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns)))
    ),
})
