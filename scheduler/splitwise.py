"""Splitwise (PD-separated) mode: placement, load charges and the handoff (``lua/splitwise.lua``).

Placement happens inside ``submit``: a prefill (or mixed) node and a decode node chosen from the live
nodes' roles by load (prompt tokens in flight on prefill and mixed nodes, requests in flight on
decode nodes), least loaded at random among the best two; with only mixed nodes alive one mixed node
does it all; with no eligible node the request waits in the topic's pending list, and the reaper
places it once one is live (or it expires by its TTL). The prefill node writes the KV cache
(``gpu_worker.kv_transfer``) and hands the request over; the decode node continues. A node silent for
``scheduler_expire_period`` leaves the registry, and its queue goes back to placement.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from scheduler import keys, scripts
from scheduler.scripts import ScriptCall

if TYPE_CHECKING:
    from scheduler.store import RequestStore


def hand_off(store: RequestStore, topic: str, uid: str, lease: str, num_bytes: int, ms: float) -> bool:
    """The prefill node is done (KV cache written, first token streamed): the request moves to its
    decode node's queue. False when the lease is no longer the caller's."""
    return bool(store.run(scripts.HAND_OFF.call(topic, uid=uid, lease=lease, num_bytes=num_bytes,
                                                ms=f"{ms:.3f}")))


def place_pending_call(topic: str, limit: int = 500) -> ScriptCall:
    """Place up to ``limit`` requests that wait for an eligible node (reply: how many were placed)."""
    return scripts.PLACE_PENDING.call(topic, rand=random.random(), limit=limit)


def upkeep_call(topic: str, limit: int = 1000) -> ScriptCall:
    """Drop expired nodes (their queues back to placement, at most ``limit`` requests) and release
    leaked load (reply: how many requests moved)."""
    return scripts.SPLITWISE_UPKEEP.call(topic, rand=random.random(), limit=limit)


def pd_load(store: RequestStore, topic: str, node: str) -> int:
    """A node's splitwise load: prompt tokens in flight (prefill, mixed) or requests (decode)."""
    return int(store.redis.hget(keys.pd_load(topic), node) or 0)
