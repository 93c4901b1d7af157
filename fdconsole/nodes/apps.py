from django.apps import AppConfig


class NodesConfig(AppConfig):
    name = "fdconsole.nodes"
    label = "nodes"
