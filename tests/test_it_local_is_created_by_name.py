"""create_scheduler builds a scheduler by name and refuses, with a named error, one not built yet."""

import pytest

from scheduler.config import SchedulerConfig, parse_config
from scheduler.errors import ConfigError
from scheduler.interface import create_scheduler
from scheduler.interface.in_process import InProcessScheduler


def test_local_is_created_from_the_default_config() -> None:
    s = create_scheduler(SchedulerConfig())
    assert isinstance(s, InProcessScheduler)
    assert s.stats() == {"scheduler": "local", "waiting": 0, "running": 0, "max_size": -1, "ttl": 900}


def test_the_clock_is_passed_through() -> None:
    s = create_scheduler(parse_config({"scheduler_ttl": 5}), clock=lambda: 42.0)
    assert isinstance(s, InProcessScheduler) and s.clock() == 42.0


def test_global_is_created_over_redis(redis_conn) -> None:
    from scheduler.interface import GlobalScheduler

    s = create_scheduler(parse_config({"scheduler_name": "global", "scheduler_topic": "g"}), redis=redis_conn)
    assert isinstance(s, GlobalScheduler) and s.stats()["scheduler"] == "global"
    s.close()


def test_splitwise_is_created_over_redis(redis_conn) -> None:
    from scheduler.interface import SplitwiseScheduler

    config = parse_config({"scheduler_name": "splitwise", "scheduler_topic": "s"})
    s = create_scheduler(config, redis=redis_conn)
    assert isinstance(s, SplitwiseScheduler) and s.stats()["scheduler"] == "splitwise"
    s.close()


@pytest.mark.parametrize("name", ["nonsense"])
def test_an_unavailable_scheduler_is_a_config_error_naming_the_field(name: str) -> None:
    config = SchedulerConfig(scheduler_name=name)  # bypasses parse_config on purpose for "nonsense"
    with pytest.raises(ConfigError) as caught:
        create_scheduler(config)
    assert caught.value.field == "scheduler_name"
    assert caught.value.message == f"scheduler '{name}' is not available yet"
