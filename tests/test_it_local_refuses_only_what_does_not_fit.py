"""A put answers for exactly its own requests: the ones that fit are queued, the rest say why not."""

from scheduler.config import SchedulerConfig
from scheduler.interface.in_process import InProcessScheduler
from scheduler.messages import Request, Result


def req(request_id: str, prompt_len: int = 4) -> Request:
    return Request(request_id, list(range(prompt_len)))


def scheduler(max_size: int = -1) -> InProcessScheduler:
    return InProcessScheduler(SchedulerConfig(scheduler_max_size=max_size))


def take_all(s: InProcessScheduler) -> list[str]:
    return [r.request_id for r in s.get_requests(10_000, 16, 0, 10_000, batch=100)]


def test_the_requests_that_fit_are_accepted_and_the_rest_get_queue_full() -> None:
    s = scheduler(max_size=2)
    answers = s.put_requests([req("a"), req("b"), req("c"), req("d")])
    full = "queue full (scheduler_max_size=2)"
    assert answers == [("a", None), ("b", None), ("c", full), ("d", full)]
    assert take_all(s) == ["a", "b"]


def test_answers_cover_exactly_the_requests_passed_in_their_order() -> None:
    s = scheduler(max_size=2)
    assert s.put_requests([req("a")]) == [("a", None)]
    answers = s.put_requests([req("x"), req("a"), req("y")])
    assert answers == [("x", None), ("a", "duplicate request id 'a'"),
                       ("y", "queue full (scheduler_max_size=2)")]


def test_max_size_bounds_waiting_requests_only() -> None:
    s = scheduler(max_size=1)
    assert s.put_requests([req("a")]) == [("a", None)]
    assert take_all(s) == ["a"]  # "a" is running now, so the queue has room again
    assert s.put_requests([req("b")]) == [("b", None)]
    assert s.stats()["waiting"] == 1 and s.stats()["running"] == 1


def test_unbounded_queue_accepts_everything() -> None:
    s = scheduler(max_size=-1)
    answers = s.put_requests([req(f"r{i}") for i in range(5000)])
    assert all(error is None for _, error in answers)
    assert s.stats()["waiting"] == 5000


def test_duplicate_ids_are_refused_while_waiting_running_or_undelivered() -> None:
    s = scheduler()
    s.put_requests([req("a")])
    assert s.put_requests([req("a")]) == [("a", "duplicate request id 'a'")]  # waiting
    take_all(s)
    assert s.put_requests([req("a")]) == [("a", "duplicate request id 'a'")]  # running
    s.put_results([Result("a", index=0, token_id=1, finished=True, finish_reason="length")])
    assert s.put_requests([req("a")]) == [("a", "duplicate request id 'a'")]  # final not taken yet


def test_an_id_may_be_reused_once_its_final_result_was_taken() -> None:
    s = scheduler()
    s.put_requests([req("a")])
    take_all(s)
    s.put_results([Result("a", index=0, token_id=1, finished=True, finish_reason="stop")])
    assert list(s.get_results()) == ["a"]
    assert s.put_requests([req("a")]) == [("a", None)]


def test_a_duplicate_inside_one_put_is_refused() -> None:
    s = scheduler()
    assert s.put_requests([req("a"), req("a")]) == [("a", None), ("a", "duplicate request id 'a'")]
    assert take_all(s) == ["a"]


def test_any_printable_id_is_accepted() -> None:
    s = scheduler()
    ids = ["a#b", "x:y/z", "spaces are fine", "ünïcødé"]
    assert s.put_requests([req(i) for i in ids]) == [(i, None) for i in ids]
    assert take_all(s) == ids
