from django.apps import AppConfig


class ApiConfig(AppConfig):
    name = "fdconsole.api"
    label = "api"
    verbose_name = "API"
