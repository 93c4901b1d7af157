"""WSGI entry point (HTTP only; the live pages need ASGI, see asgi.py)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fdconsole.settings")
application = get_wsgi_application()
