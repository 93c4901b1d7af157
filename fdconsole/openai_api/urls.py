"""``/v1/``: each endpoint of the registry (``schemas.ENDPOINTS``) at its path; anything else is an
OpenAI-shaped 404."""

import re

from django.urls import path, re_path

from fdconsole.openai_api import views
from fdconsole.openai_api.schemas import ENDPOINTS, Endpoint


def route(endpoint: Endpoint) -> str:
    """``/v1/models/{model}`` -> ``models/<str:model>`` (below the ``v1/`` include)."""
    return re.sub(r"\{(\w+)\}", r"<str:\1>", endpoint.path.removeprefix("/v1/"))


urlpatterns = [
    *(path(route(endpoint), views.VIEWS[endpoint], name=f"openai-{endpoint.name}") for endpoint in ENDPOINTS),
    re_path(r"^(?P<rest>.*)$", views.unknown_url, name="openai-unknown-url"),
]
