"""Failover: a running request whose node stopped renewing its lease goes back to the front of a
queue and resumes there after the tokens already streamed (``lua/failover.lua``).

Where it goes: in local mode back to its home node; in global mode to its home node when that is
alive, else the least loaded live node; in splitwise mode to a live node of the role of the phase it
was in (its load charge moves along), else it waits for its node. A node that comes back under its
old name before its leases ran out takes its requests back at once (``reclaim``).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from scheduler import scripts
from scheduler.liveness import DEAD_AFTER_S
from scheduler.scripts import ScriptCall

if TYPE_CHECKING:
    from scheduler.store import RequestStore


def recover_call(topic: str, limit: int = 500) -> ScriptCall:
    """Requeue up to ``limit`` running requests whose lease ran out (reply: see ``recovered``)."""
    return scripts.RECOVER.call(topic, limit=limit, dead_after=DEAD_AFTER_S, rand=random.random())


def recovered(reply: Any) -> list[tuple[str, str]]:
    """``recover_call``'s reply: (uid, node it went to) pairs."""
    return [(uid.decode(), node.decode()) for uid, node in reply]


def recover(store: RequestStore, topic: str, limit: int = 500) -> list[tuple[str, str]]:
    """Requeue running requests whose lease ran out; returns (uid, node it went to) pairs."""
    return recovered(store.run(recover_call(topic, limit)))


def reclaim(store: RequestStore, topic: str, node: str) -> list[str]:
    """A node starting under its old name takes back the requests it held when it died."""
    return [uid.decode() for uid in store.run(scripts.RECLAIM.call(topic, node=node))]
