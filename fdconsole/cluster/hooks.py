"""How a node (or the console's reaper) keeps the database up to date: NodeHooks backed by the ORM."""

from __future__ import annotations

import logging

from django.db import close_old_connections, transaction
from django.db.models import F

from fdconsole.inference.sync import sync_uids
from fdconsole.nodes.models import Node
from gpu_worker.runtime import NodeHooks

log = logging.getLogger(__name__)


def _guarded(func):
    """Database trouble must not stop generation: the API re-syncs from Redis on read."""

    def wrapper(*args):
        close_old_connections()
        try:
            func(*args)
        except Exception:  # the database is a copy; Redis stays the authority
            log.exception("database update failed in %s", func.__name__)

    wrapper.__name__ = func.__name__
    return wrapper


@_guarded
def sync_many(topic: str, uids: list[str]) -> None:
    with transaction.atomic():  # one commit for the lot: a busy node ends many requests a second
        sync_uids(topic, uids)


@_guarded
def count_runs(node: str, ran: int, stolen: int) -> None:
    counters = {"requests_run": F("requests_run") + ran}
    if stolen:
        counters["requests_stolen"] = F("requests_stolen") + stolen
    Node.objects.filter(name=node).update(**counters)


def admin_state(node: str) -> str:
    """What the console's admin says the node may do (enable, drain, disable take effect within a
    heartbeat); "enabled" for a node without a record (``fdnode`` makes one before the node starts).

    Raises what the database raised when it cannot be asked: the node then keeps the state it last read,
    and claims nothing before its first read (``gpu_worker.node.AdminStatePoller``), so that a disabled
    node stays disabled through an outage."""
    close_old_connections()  # a connection an outage broke is dropped here, and the next read reconnects
    return Node.objects.filter(name=node).values_list("admin_state", flat=True).first() or "enabled"


def database_hooks() -> NodeHooks:
    return NodeHooks(on_changed=sync_many, on_ran=count_runs, on_expired=sync_many, admin_state=admin_state)
