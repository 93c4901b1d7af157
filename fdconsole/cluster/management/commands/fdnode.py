"""``manage.py fdnode``: run one node of a topic (an rq worker with the model resident)."""

from __future__ import annotations

import logging
import socket

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from fdconsole.cluster.hooks import database_hooks
from fdconsole.inference.reconcile import Reconciler
from fdconsole.nodes.models import Node
from fdconsole.redis_conn import get_topic_store, topic_url
from fdconsole.topics.services import ensure_node, ensure_topic
from scheduler.connection import describe
from scheduler.errors import ConfigError

log = logging.getLogger("fdnode")


class Command(BaseCommand):
    help = "Run one node: an rq worker bound to node NAME of topic TOPIC, with the model kept loaded."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--topic", default="default", help="topic to serve (created when missing)")
        parser.add_argument("--name", required=True, help="node name, unique across the console")
        parser.add_argument("--role", choices=Node.Role.values, default=None,
                            help="node role (default: the record's, else mixed)")
        parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: FD_DEVICE)")
        parser.add_argument("--burst", action="store_true", help="run the queued work, then exit")
        parser.add_argument("--fixed-work-ms", type=float, default=None,
                            help="benchmarks: replace the model by a stand-in taking this long per request")

    def handle(self, *args, **options) -> None:
        from gpu_worker.node import NodeWorker
        from gpu_worker.runtime import NodeRuntime

        try:
            topic = ensure_topic(options["topic"])
            node = ensure_node(options["name"], topic, options["role"], options["device"])
        except ConfigError as exc:
            raise CommandError(exc.message) from None
        engine = self.engine(node, options["fixed_work_ms"])
        Node.objects.filter(pk=node.pk).update(host=socket.gethostname(), last_started_at=timezone.now())
        # The topic's Redis: its scheduler keys and the node's rq queue live there, side by side.
        runtime = NodeRuntime(topic=topic.name, name=node.name, role=node.role, store=get_topic_store(topic),
                              engine=engine, hooks=database_hooks(),
                              token_delay_s=settings.FD_TOKEN_DELAY_MS / 1000)
        model = getattr(getattr(engine, "engine", None), "model_name", "none")
        capacity = getattr(engine, "describe", lambda: "fixed work")()
        log.info("node %s of topic %s ready on %s (role %s, model %s, %s; Redis at %s)", node.name,
                 topic.name, engine.device, node.role, model, capacity, describe(topic_url(topic)))
        # Rows the database has in flight are compared with Redis by one process of the cluster at a time:
        # a node takes over when no console runs. A burst run ends with its queue: it leaves that to others.
        reconciler = None if options["burst"] else Reconciler()
        if reconciler:
            reconciler.start()
        try:
            NodeWorker(runtime).work(burst=options["burst"], logging_level=settings.LOGGING["root"]["level"])
        finally:
            if reconciler:
                reconciler.stop()
        log.info("node %s stopped", node.name)

    def engine(self, node: Node, fixed_work_ms: float | None):
        """The batching engine over the model on the node's device, loaded once, with the node's
        capacity (or the benchmarks' fixed-work stand-in)."""
        if fixed_work_ms is not None:
            from gpu_worker.fixed_work import FixedWorkEngine

            return FixedWorkEngine(fixed_work_ms / 1000)
        from gpu_worker.batch_engine import BatchEngine
        from gpu_worker.capacity import CapacityError
        from gpu_worker.engine import Engine

        device = node.device if node.device != "auto" else settings.FD_DEVICE
        model = node.topic.model
        try:
            engine = Engine(device=device, model=model, dtype=settings.FD_DTYPE or None)
        except ValueError as exc:  # a device, dtype or checkpoint it cannot serve: it does not join
            raise CommandError(f"node {node.name} cannot serve model {model!r} of topic {node.topic.name} "
                               f"on device {device!r}: {exc}") from None
        if engine.device.type == "cpu" and settings.FD_TORCH_THREADS > 0:
            import torch

            torch.set_num_threads(settings.FD_TORCH_THREADS)
        try:
            return BatchEngine(engine, node.capacity())
        except CapacityError as exc:
            raise CommandError(f"node {node.name}'s capacity: {exc}") from None
