from django.apps import AppConfig


class DashboardConfig(AppConfig):
    name = "fdconsole.dashboard"
    label = "dashboard"

    def ready(self) -> None:
        from fdconsole.dashboard import signals

        signals.connect()  # a user's logout, deactivation or deletion closes their WebSockets
