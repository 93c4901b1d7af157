"""What a node process runs with: its topic and name, its store, its resident engine, the requests
it holds, and the hooks that tell its host application (the console's database) what happened.

One runtime per process, installed by ``gpu_worker.node.NodeWorker`` before its first claim; a job
(``gpu_worker.jobs.run_request``) finds it with ``current_runtime``, so no job ever loads the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scheduler.store import Claim, RequestStore

UNKNOWN = "unknown"  # the admin state of a node that has not read it since it started: it claims nothing


@dataclass
class NodeHooks:
    """What the node tells its host application (the console's database) about its work."""

    on_changed: Callable[[str, list[str]], None] = lambda topic, uids: None  # these requests' states moved
    on_ran: Callable[[str, int, int], None] = lambda node, ran, stolen: None  # ran so many, so many stolen
    on_expired: Callable[[str, list[str]], None] = lambda topic, uids: None  # the reaper ended these
    # enabled, draining or disabled; raises when it cannot be read (the node then keeps what it knew)
    admin_state: Callable[[str], str] = lambda node: "enabled"


@dataclass
class NodeRuntime:
    topic: str
    name: str
    role: str
    store: RequestStore
    engine: Any  # gpu_worker.batch_engine.BatchEngine (or a stand-in), loaded once
    hooks: NodeHooks = field(default_factory=NodeHooks)
    held: dict[str, Claim] = field(default_factory=dict)  # uid -> claim of the requests it runs
    # draining: finishes its own queue, steals nothing; disabled or UNKNOWN: claims nothing. A node's
    # worker reads it before its first claim (gpu_worker.node.AdminStatePoller).
    admin_state: str = "enabled"
    token_delay_s: float = 0.0  # a pause after each step that streamed tokens (demos, failover tests)
    loop: Any = None  # gpu_worker.serving.StepLoop, set by the node's worker

    @property
    def may_claim(self) -> bool:
        return self.admin_state in ("enabled", "draining")  # fails closed: any other state claims nothing

    @property
    def may_steal(self) -> bool:
        return self.admin_state == "enabled"

    @property
    def leases(self) -> dict[str, str]:
        return {uid: claim.lease for uid, claim in list(self.held.items())}


_runtime: NodeRuntime | None = None


def install_runtime(runtime: NodeRuntime) -> None:
    global _runtime
    _runtime = runtime


def current_runtime() -> NodeRuntime:
    if _runtime is None:
        raise RuntimeError("no node runtime installed: jobs run only inside `manage.py fdnode`")
    return _runtime
