"""Global mode: work stealing and re-homing (``lua/stealing.lua``).

A node whose own queue is empty steals inside its claim (``RequestStore.claim`` with ``may_steal``):
from the most loaded nodes at or above ``scheduler_min_load_score``, randomly among the top three, up
to half the victim's queue and half its own batch, in the same atomic step that moves the load
scores. The queue of a node that died (no heartbeat for ``DEAD_AFTER_S``) is not left to rot: the
reaper re-homes it, request by request, onto the least loaded live nodes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scheduler import scripts
from scheduler.liveness import DEAD_AFTER_S
from scheduler.scripts import ScriptCall

if TYPE_CHECKING:
    from scheduler.store import RequestStore


def rehome_call(topic: str, limit: int = 1000) -> ScriptCall:
    """Move up to ``limit`` requests from dead nodes' queues to live ones (reply: how many moved)."""
    return scripts.REHOME.call(topic, dead_after=DEAD_AFTER_S, limit=limit)


def rehome(store: RequestStore, topic: str, limit: int = 1000) -> int:
    """Move the queues of dead nodes to live ones; returns how many requests moved."""
    return int(store.run(rehome_call(topic, limit)))
