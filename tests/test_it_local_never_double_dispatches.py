"""Each request is handed out once, whatever finishes, is cancelled or runs concurrently around it.

The regression: FastDeploy kept a read cursor into a list of ids and moved it back whenever any id
was removed, so finishing or cancelling a request that was never handed out re-dispatched another.
"""

import sys
import threading

from scheduler.config import SchedulerConfig
from scheduler.interface.in_process import InProcessScheduler
from scheduler.messages import Request, Result


def req(request_id: str) -> Request:
    return Request(request_id, [1, 2, 3, 4])


def get(s: InProcessScheduler, batch: int) -> list[str]:
    return [r.request_id for r in s.get_requests(10_000, 16, 0, 100_000, batch=batch)]


def test_finishing_a_never_handed_out_request_does_not_re_dispatch_another() -> None:
    s = InProcessScheduler(SchedulerConfig())
    s.put_requests([req("a"), req("b"), req("c")])
    assert get(s, 1) == ["a"]
    s.put_results([Result.failure("c", "aborted", "the client went away")])  # c was never handed out
    assert list(s.get_results()) == ["c"]
    assert get(s, 10) == ["b"]  # not "a" again, and "b" not skipped
    assert get(s, 10) == []


def test_cancelling_a_never_handed_out_request_does_not_re_dispatch_another() -> None:
    s = InProcessScheduler(SchedulerConfig())
    s.put_requests([req("a"), req("b"), req("c"), req("d")])
    assert get(s, 2) == ["a", "b"]
    assert s.cancel("c")
    s.get_results()
    assert get(s, 10) == ["d"]
    assert get(s, 10) == []


def test_finishing_a_handed_out_request_does_not_skip_the_next() -> None:
    s = InProcessScheduler(SchedulerConfig())
    s.put_requests([req("a"), req("b"), req("c")])
    assert get(s, 1) == ["a"]
    s.put_results([Result("a", index=0, token_id=5, finished=True, finish_reason="stop")])
    s.get_results()
    assert get(s, 10) == ["b", "c"]


def race(num_requests: int,
         num_threads: int) -> tuple[InProcessScheduler, list[list[str]], list[BaseException]]:
    """Engines poll get_requests from several threads while a producer puts; what did each get?"""
    s = InProcessScheduler(SchedulerConfig())
    handed_out: list[list[str]] = [[] for _ in range(num_threads)]
    errors: list[BaseException] = []
    start = threading.Barrier(num_threads + 1)
    all_put = threading.Event()

    def engine(slot: int) -> None:
        start.wait()
        try:
            for _ in range(1_000_000):  # bounded, in case a bug keeps the queue from draining
                got = get(s, 3)
                handed_out[slot].extend(got)
                if not got and all_put.is_set() and s.stats()["waiting"] == 0:
                    return
        except Exception as error:  # a race shows up as an exception in some thread: report it
            errors.append(error)

    threads = [threading.Thread(target=engine, args=(i,)) for i in range(num_threads)]
    for thread in threads:
        thread.start()
    start.wait()
    for i in range(0, num_requests, 50):
        s.put_requests([req(f"r{j}") for j in range(i, i + 50)])
    all_put.set()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    return s, handed_out, errors


def test_concurrent_get_requests_hand_out_each_request_exactly_once() -> None:
    num_requests = 2000
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often so that an unguarded section would interleave
    try:
        rounds = [race(num_requests, num_threads=8) for _ in range(3)]
    finally:
        sys.setswitchinterval(switch_interval)
    for s, handed_out, errors in rounds:
        assert errors == []
        everything = [request_id for part in handed_out for request_id in part]
        assert len(everything) == num_requests
        assert sorted(everything) == sorted(f"r{j}" for j in range(num_requests))  # each exactly once
        for part in handed_out:  # each engine got its share in put order
            assert part == sorted(part, key=lambda request_id: int(request_id[1:]))
        assert s.stats()["running"] == num_requests and s.stats()["waiting"] == 0
