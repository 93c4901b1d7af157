from django.apps import AppConfig


class TopicsConfig(AppConfig):
    name = "fdconsole.topics"
    label = "topics"
