"""A changed configuration takes effect without a restart; stats and reset tell and clear the truth."""

import pytest

from scheduler.config import SchedulerConfig
from scheduler.errors import ConfigError
from scheduler.interface.in_process import InProcessScheduler
from scheduler.messages import Request, Result


def reqs(*request_ids: str) -> list[Request]:
    return [Request(request_id, [1]) for request_id in request_ids]


def test_a_larger_max_size_admits_more_at_once() -> None:
    s = InProcessScheduler(SchedulerConfig(scheduler_max_size=1))
    assert s.put_requests(reqs("a", "b"))[1] == ("b", "queue full (scheduler_max_size=1)")
    s.apply_config(SchedulerConfig(scheduler_max_size=3))
    assert s.put_requests(reqs("b", "c")) == [("b", None), ("c", None)]
    assert s.stats()["max_size"] == 3


def test_a_smaller_max_size_keeps_what_waits_and_refuses_new_puts() -> None:
    s = InProcessScheduler(SchedulerConfig())
    s.put_requests(reqs("a", "b", "c"))
    s.apply_config(SchedulerConfig(scheduler_max_size=2))
    assert s.stats()["waiting"] == 3
    assert s.put_requests(reqs("d")) == [("d", "queue full (scheduler_max_size=2)")]


def test_a_new_ttl_is_reported() -> None:
    s = InProcessScheduler(SchedulerConfig())
    s.apply_config(SchedulerConfig(scheduler_ttl=60))
    assert s.stats()["ttl"] == 60


def test_switching_to_another_scheduler_in_place_is_refused() -> None:
    s = InProcessScheduler(SchedulerConfig())
    with pytest.raises(ConfigError) as caught:
        s.apply_config(SchedulerConfig(scheduler_name="global"))
    assert caught.value.field == "scheduler_name"
    assert s.config.scheduler_name == "local"


def test_stats_count_waiting_and_running() -> None:
    s = InProcessScheduler(SchedulerConfig(scheduler_max_size=10, scheduler_ttl=30))
    s.put_requests(reqs("a", "b", "c"))
    s.get_requests(100, 16, 0, 100, batch=2)
    assert s.stats() == {"scheduler": "local", "waiting": 1, "running": 2, "max_size": 10, "ttl": 30}


def test_reset_forgets_every_request_and_result() -> None:
    s = InProcessScheduler(SchedulerConfig())
    s.put_requests(reqs("a", "b"))
    s.get_requests(100, 16, 0, 100, batch=1)
    s.put_results([Result("a", index=0, token_id=1)])
    s.reset()
    assert s.stats()["waiting"] == 0 and s.stats()["running"] == 0
    assert s.get_results() == {}
    assert s.get_requests(100, 16, 0, 100, batch=5) == []
    s.put_results([Result("a", index=1, token_id=1)])  # a late result for a forgotten request
    assert s.get_results() == {}
    assert s.put_requests(reqs("a")) == [("a", None)]
