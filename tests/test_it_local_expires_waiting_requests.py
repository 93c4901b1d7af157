"""A request still waiting ``scheduler_ttl`` seconds after its put is evicted with an "expired" result.

A fake clock drives time, so nothing sleeps. The regressions: FastDeploy evicted only when the queue
was over max_size (never, since put refuses that, and not at all with max_size=-1) and removed the
wrong ids.
"""

from scheduler.config import SchedulerConfig
from scheduler.interface.in_process import InProcessScheduler
from scheduler.messages import Request


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def req(request_id: str) -> Request:
    return Request(request_id, [1, 2, 3])


def scheduler(clock: FakeClock, *, ttl: int = 100, max_size: int = -1) -> InProcessScheduler:
    return InProcessScheduler(SchedulerConfig(scheduler_ttl=ttl, scheduler_max_size=max_size), clock=clock)


def take_all(s: InProcessScheduler) -> list[str]:
    return [r.request_id for r in s.get_requests(10_000, 16, 0, 10_000, batch=100)]


def test_eviction_runs_with_an_unbounded_queue() -> None:
    clock = FakeClock()
    s = scheduler(clock, max_size=-1)
    s.put_requests([req("a")])
    clock.now += 100
    assert s.evict_expired() == ["a"]
    assert s.stats()["waiting"] == 0


def test_eviction_runs_when_the_queue_is_not_full() -> None:
    clock = FakeClock()
    s = scheduler(clock, max_size=10)
    s.put_requests([req("a"), req("b")])
    clock.now += 150
    assert s.evict_expired() == ["a", "b"]


def test_exactly_the_expired_ids_are_removed() -> None:
    clock = FakeClock()
    s = scheduler(clock)
    s.put_requests([req("a"), req("b")])
    clock.now += 50
    s.put_requests([req("c"), req("d"), req("e")])
    clock.now += 60  # a, b waited 110 s; c, d, e 60 s
    assert s.evict_expired() == ["a", "b"]
    assert take_all(s) == ["c", "d", "e"]


def test_the_origin_gets_an_expired_final_result() -> None:
    clock = FakeClock()
    s = scheduler(clock)
    s.put_requests([req("a"), req("b")])
    clock.now += 100
    results = s.get_results()
    assert list(results) == ["a", "b"]
    (final,) = results["a"]
    assert final.finished and final.finish_reason == "expired"
    assert final.error is not None and final.error["code"] == "expired"
    assert "scheduler_ttl=100" in final.error["message"]
    assert s.get_results() == {}  # delivered once, then forgotten
    assert s.put_requests([req("a")]) == [("a", None)]  # its id may be reused


def test_a_request_younger_than_ttl_stays() -> None:
    clock = FakeClock()
    s = scheduler(clock)
    s.put_requests([req("a")])
    clock.now += 99.9
    assert s.evict_expired() == []
    assert take_all(s) == ["a"]


def test_get_requests_never_hands_out_an_expired_request() -> None:
    clock = FakeClock()
    s = scheduler(clock)
    s.put_requests([req("old")])
    clock.now += 80
    s.put_requests([req("new")])
    clock.now += 20
    assert take_all(s) == ["new"]
    assert s.get_results()["old"][0].finish_reason == "expired"


def test_expired_requests_never_block_a_put() -> None:
    clock = FakeClock()
    s = scheduler(clock, max_size=2)
    s.put_requests([req("a"), req("b")])
    clock.now += 100
    assert s.put_requests([req("c"), req("d")]) == [("c", None), ("d", None)]


def test_running_requests_do_not_expire() -> None:
    clock = FakeClock()
    s = scheduler(clock)
    s.put_requests([req("a")])
    assert take_all(s) == ["a"]
    clock.now += 10_000
    assert s.evict_expired() == []
    assert s.get_results() == {}
    assert s.stats()["running"] == 1


def test_a_shorter_ttl_applies_to_requests_already_waiting() -> None:
    clock = FakeClock()
    s = scheduler(clock, ttl=900)
    s.put_requests([req("a")])
    clock.now += 30
    s.put_requests([req("b")])
    clock.now += 30  # a waited 60 s, b 30 s
    s.apply_config(SchedulerConfig(scheduler_ttl=45))
    assert s.stats()["waiting"] == 1  # evicted by apply_config itself, not only by the next call
    assert list(s.get_results()) == ["a"]
    assert take_all(s) == ["b"]
