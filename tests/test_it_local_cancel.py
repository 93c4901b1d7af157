"""cancel() ends a waiting request at once and marks a running one for its runner to stop."""

from scheduler.config import SchedulerConfig
from scheduler.interface.in_process import InProcessScheduler
from scheduler.messages import Request, Result


def req(request_id: str) -> Request:
    return Request(request_id, [1, 2, 3])


def get(s: InProcessScheduler, batch: int = 10) -> list[str]:
    return [r.request_id for r in s.get_requests(1000, 16, 0, 1000, batch=batch)]


def test_a_waiting_request_leaves_the_queue_with_a_cancelled_result() -> None:
    s = InProcessScheduler(SchedulerConfig())
    s.put_requests([req("a"), req("b")])
    assert s.cancel("a") is True
    assert s.stats()["waiting"] == 1
    (final,) = s.get_results()["a"]
    assert final.finished and final.finish_reason == "cancelled"
    assert final.error is not None and final.error["code"] == "cancelled"
    assert get(s) == ["b"]


def test_a_running_request_is_marked_and_its_final_result_is_cancelled() -> None:
    s = InProcessScheduler(SchedulerConfig())
    s.put_requests([req("a"), req("b")])
    assert get(s) == ["a", "b"]
    s.put_results([Result("a", index=0, token_id=9)])
    assert s.is_cancelled("a") is False
    assert s.cancel("a") is True
    assert s.is_cancelled("a") is True and s.is_cancelled("b") is False
    s.put_results([Result("a", index=1, token_id=9)])  # made before the runner noticed: not wanted
    assert [r.token_id for r in s.get_results()["a"]] == [9]
    s.put_results([Result("a", index=2, token_id=9, finished=True, finish_reason="length")])
    (final,) = s.get_results()["a"]
    assert final.finished and final.finish_reason == "cancelled" and final.error["code"] == "cancelled"
    assert s.stats()["running"] == 1  # only "b"


def test_a_cancelled_running_id_cannot_be_reused_until_the_runner_finished() -> None:
    s = InProcessScheduler(SchedulerConfig())
    s.put_requests([req("a")])
    get(s)
    s.cancel("a")
    assert s.put_requests([req("a")]) == [("a", "duplicate request id 'a'")]
    s.put_results([Result.failure("a", "aborted", "stopped")])
    s.get_results()
    assert s.is_cancelled("a") is False
    assert s.put_requests([req("a")]) == [("a", None)]


def test_unknown_finished_or_already_cancelled_requests_answer_false() -> None:
    s = InProcessScheduler(SchedulerConfig())
    assert s.cancel("nope") is False
    s.put_requests([req("a"), req("b"), req("c")])
    get(s, batch=2)
    s.put_results([Result("a", index=0, token_id=1, finished=True, finish_reason="stop")])
    assert s.cancel("a") is False  # finished, final result not taken yet
    s.get_results()
    assert s.cancel("a") is False  # forgotten
    assert s.cancel("b") is True and s.cancel("b") is False
    assert s.cancel("c") is True and s.cancel("c") is False


def test_a_cancelled_waiting_request_is_never_handed_out() -> None:
    s = InProcessScheduler(SchedulerConfig())
    s.put_requests([req("a"), req("b"), req("c")])
    s.cancel("b")
    assert get(s) == ["a", "c"]
    assert get(s) == []
