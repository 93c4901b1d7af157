"""fdconsole: the Django project (settings, URLs, ASGI) and its apps, one per domain."""
