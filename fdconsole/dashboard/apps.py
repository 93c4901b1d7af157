from django.apps import AppConfig


class DashboardConfig(AppConfig):
    name = "fdconsole.dashboard"
    label = "dashboard"
