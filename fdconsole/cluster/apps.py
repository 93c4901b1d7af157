from django.apps import AppConfig


class ClusterConfig(AppConfig):
    """Running the cluster: the fdcluster, fdnode and fdbench commands and what they need."""

    name = "fdconsole.cluster"
    label = "cluster"
