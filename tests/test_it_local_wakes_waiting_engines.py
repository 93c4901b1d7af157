"""An engine or an origin can block until there is work or a result, instead of polling."""

import threading
import time
from collections.abc import Callable

from scheduler.config import SchedulerConfig
from scheduler.interface.in_process import InProcessScheduler
from scheduler.messages import Request, Result

TIMEOUT_S = 10.0


def seconds_until_woken(wait: Callable[[float], bool], wake: Callable[[], object]) -> float:
    """Start a waiter, let it block, wake it, and return how long its wait took (it must say True)."""
    answers: list[bool] = []
    started = time.monotonic()
    waiter = threading.Thread(target=lambda: answers.append(wait(TIMEOUT_S)))
    waiter.start()
    time.sleep(0.05)  # not a clock: only lets the waiter reach its wait before the wake-up
    wake()
    waiter.join(timeout=2 * TIMEOUT_S)
    assert answers == [True]
    return time.monotonic() - started


def test_wait_for_requests_times_out_on_an_empty_queue_and_sees_a_waiting_one() -> None:
    s = InProcessScheduler(SchedulerConfig())
    assert s.wait_for_requests(0.01) is False
    s.put_requests([Request("a", [1])])
    assert s.wait_for_requests(0) is True


def test_a_put_wakes_an_engine_waiting_for_requests() -> None:
    s = InProcessScheduler(SchedulerConfig())
    elapsed = seconds_until_woken(s.wait_for_requests, lambda: s.put_requests([Request("a", [1])]))
    assert elapsed < TIMEOUT_S / 2  # woken by the put, not by its own timeout


def test_a_result_wakes_an_origin_waiting_for_results() -> None:
    s = InProcessScheduler(SchedulerConfig())
    s.put_requests([Request("a", [1])])
    s.get_requests(10, 16, 0, 10)
    assert s.wait_for_results(0.01) is False
    result = Result("a", index=0, token_id=1)
    elapsed = seconds_until_woken(s.wait_for_results, lambda: s.put_results([result]))
    assert elapsed < TIMEOUT_S / 2
    assert s.get_results() == {"a": [result]}
