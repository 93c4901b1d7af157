"""FastDeploy's scheduler interface (``put_requests``, ``get_requests``, ``put_results``,
``get_results``), as an engine in one process uses it: the variants are sibling modules behind
``Scheduler``, chosen by ``create_scheduler`` from the configuration.

- ``in_process.InProcessScheduler`` (``scheduler_name`` local): one FIFO queue in memory with Local's
  rules (max size, TTL, the KV-block and token budgets of ``get_requests``).
- ``over_redis.GlobalScheduler`` and ``over_redis.SplitwiseScheduler``: one node of a topic over Redis,
  through the same scripts the console's cluster runs on (``scheduler.store``).
"""

from __future__ import annotations

from typing import Any

from scheduler.config import SchedulerConfig
from scheduler.errors import ConfigError
from scheduler.interface.base import Scheduler
from scheduler.interface.in_process import InProcessScheduler
from scheduler.interface.over_redis import GlobalScheduler, SplitwiseScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {
    "local": InProcessScheduler, "global": GlobalScheduler, "splitwise": SplitwiseScheduler,
}


def create_scheduler(config: SchedulerConfig, **kwargs: Any) -> Scheduler:
    """The scheduler named by ``config.scheduler_name``."""
    try:
        cls = SCHEDULERS[config.scheduler_name]
    except KeyError:
        raise ConfigError(
            f"scheduler '{config.scheduler_name}' is not available yet", field="scheduler_name"
        ) from None
    return cls(config, **kwargs)


__all__ = ["GlobalScheduler", "InProcessScheduler", "Scheduler", "SplitwiseScheduler", "create_scheduler"]
